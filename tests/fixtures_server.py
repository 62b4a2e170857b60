"""Fixtures: a real Granian server on loopback (own data dir, N workers, fixed/tiny/real model), accounts, keys.

`serve(...)` starts `python -m granian --interface rsgi cheapest.server:app` as a subprocess and waits for
/readyz; its stdout (the per-request log lines) goes to a file the test can read.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cheapest.store import Store

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
# The fixed-output engine plugin (tests/fixed_engine.py), importable by the server's workers.
FIXED_BACKEND = "fixed_engine:load"


def server_env(data: Path, backend: str = "fixed") -> dict[str, str]:
    """The environment of a server process: this one's without CHEAPEST_* settings, plus the data directory,
    the engine backend ("fixed" is the test plugin) and tests/ on PYTHONPATH for that plugin."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHEAPEST_", "GRANIAN_"))}
    env.update({
        "CHEAPEST_DATA_DIR": str(data),
        "CHEAPEST_MODEL_BACKEND": FIXED_BACKEND if backend == "fixed" else backend,
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS), env.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    env: dict[str, str]
    stdout_path: Path
    stderr_path: Path
    workers: int
    keys: list[tuple[str, str]] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def request_log(self) -> list[dict[str, object]]:
        """The JSON request lines on the server's stdout (anything else there fails the parse on purpose)."""
        lines = self.stdout_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def output(self) -> str:
        return self.stdout_path.read_text() + self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cheapest.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=60, check=False)

    def open_store(self) -> Store:
        """The store this server uses, opened from its own settings (LMDB in its data dir, or PostgreSQL)."""
        from cheapest.config import load_settings
        from cheapest.store import open_configured_store

        return open_configured_store(load_settings(self.env).store)

    def create_account(self, email: str | None = None, plan: str | None = None) -> tuple[str, str]:
        """An account through the store (same code as the CLI) -> (account_id, mk)."""
        from cheapest.store import accounts
        from cheapest.store.secrets import load_pepper

        store = self.open_store()
        try:
            account, mk = accounts.create_account(
                store, email or f"user{time.monotonic_ns()}@example.test", plan or "free",
                load_pepper(self.data_dir, self.env.get("CHEAPEST_KEY_PEPPER", "")))
        finally:
            store.close()
        return account.id, mk

    def create_key(self, mk: str, **body: object) -> dict[str, object]:
        r = httpx.post(self.base_url + "/api/keys", json={"name": "test", **body},
                       headers={"Authorization": f"Bearer {mk}"}, timeout=10)
        assert r.status_code == 201, r.text
        return dict(r.json())


def start_server(tmp: Path, *, workers: int = 1, backend: str = "fixed", model_dir: Path | None = None,
                 extra_env: dict[str, str] | None = None, ready_timeout: float = 120.0,
                 data_dir: Path | None = None, interface: str = "rsgi", ready_path: str = "/readyz") -> ServerProcess:
    data = data_dir or tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = server_env(data, backend)
    env["CHEAPEST_USAGE_FLUSH_INTERVAL"] = "0.2"
    if model_dir is not None:
        env["CHEAPEST_MODEL_DIR"] = str(model_dir)
    env.update(extra_env or {})
    out, err = tmp / "server.stdout", tmp / "server.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:  # the child keeps its own copies
        proc = subprocess.Popen(
            [sys.executable, "-m", "granian", "--interface", interface, "--host", "127.0.0.1", "--port", str(port),
             "--workers", str(workers), "--no-ws", "cheapest.server:app"],
            env=env, cwd=tmp, stdout=stdout, stderr=stderr, start_new_session=True,
        )
    server = ServerProcess(proc, port, data, env, out, err, workers)
    wait_ready(server, ready_timeout, ready_path)
    return server


def wait_ready(server: ServerProcess, timeout: float = 120.0, path: str = "/readyz") -> None:
    """Until `path` (/readyz: every model; /readyz?model=ID: that one) answers 200 (the process dying or the time
    running out fails with its output)."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.output()[-3000:]}")
        try:
            if httpx.get(server.base_url + path, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop(signal.SIGKILL)
            raise RuntimeError(f"server not ready in {timeout}s:\n{server.output()[-3000:]}")
        time.sleep(0.1)
    if server.workers > 1:  # every worker must be up before tests count on all of them
        time.sleep(0.5)


def serve_cli(tmp: Path, env: dict[str, str], port: int, *args: str, data: Path | None = None,
              workers: int = 1) -> ServerProcess:
    """`cheapest serve ARGS` (the operator's command) in `tmp` with `env`, once it is ready."""
    out, err = tmp / "server.stdout", tmp / "server.stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "cheapest.cli", "serve", *args], env=env, cwd=tmp,
                                stdout=stdout, stderr=stderr, start_new_session=True)
    server = ServerProcess(proc, port, data or tmp / "data", env, out, err, workers)
    wait_ready(server, 60)
    return server


@pytest.fixture
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def make(**kw: object) -> ServerProcess:
        s = start_server(tmp_path_factory.mktemp("server"), **kw)  # type: ignore[arg-type]
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def fixed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One worker, the instant fixed engine; shared by the fast API tests (each uses its own account)."""
    s = start_server(tmp_path_factory.mktemp("fixed-server"))
    yield s
    s.stop()


@dataclass
class ApiAccount:
    server: ServerProcess
    account_id: str
    mk: str
    sk: str
    key_id: str


@pytest.fixture
def api_account(fixed_server: ServerProcess) -> ApiAccount:
    """A fresh account on the shared fixed server: its management key and one inference key."""
    account_id, mk = fixed_server.create_account()
    key = fixed_server.create_key(mk)
    return ApiAccount(fixed_server, account_id, mk, str(key["key"]), str(key["id"]))


_CLIENTS: list[object] = []


def sdk(base_url: str, api_key: str) -> "openai.OpenAI":  # type: ignore[name-defined]  # noqa: F821
    """An official `openai` client (no retries) that the `sdk_clients` fixture closes after the test."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    _CLIENTS.append(client)
    return client


@pytest.fixture
def sdk_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()  # type: ignore[attr-defined]


def worker_pid(server: ServerProcess, client: httpx.Client) -> int:
    """Which worker serves this connection (the fixed test backend's process route)."""
    r = client.get(server.base_url + "/_test/process")
    assert r.status_code == 200, r.text
    return int(r.json()["pid"])


def on_every_worker(server: ServerProcess, check: Callable[[httpx.Client], None], rounds: int = 40) -> set[int]:
    """Run `check` on fresh connections until every worker has run it at least twice; returns the pids."""
    seen: dict[int, int] = {}
    for _ in range(rounds):
        with httpx.Client(timeout=10) as c:
            pid = worker_pid(server, c)
            check(c)
        seen[pid] = seen.get(pid, 0) + 1
        if len(seen) == server.workers and min(seen.values()) >= 2:
            break
    assert len(seen) == server.workers, f"connections reached only {seen}"
    return set(seen)
