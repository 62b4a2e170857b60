"""Workers that hold request text: no core dumps (RLIMIT_CORE = 0, not dumpable), and logs carry metadata only."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from fixtures_server import ServerProcess, free_port, serve_cli, server_env
from fixtures_server import on_every_worker, worker_pid

MODEL = "SmolLM2-135M-Instruct"
REQUEST_LOG_FIELDS = {"ts", "key_id", "model", "status", "prompt_tokens", "completion_tokens", "latency_ms", "stream"}


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def core_limit(pid: int) -> tuple[str, str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line.split()[4:6]
            return soft, hard
    raise AssertionError("no core limit line")


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@pytest.fixture
def core_dumps_allowed() -> Iterator[None]:
    """Let this process and its children dump core (the shell default here is 0, which would prove nothing):
    a worker must turn dumps off itself."""
    old = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, old)


def test_every_worker_turns_core_dumps_off(core_dumps_allowed: None,
                                           server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(workers=2)
    assert core_limit(server.proc.pid) == ("unlimited", "unlimited")  # the master inherited "allowed"

    def hardened(c: httpx.Client) -> None:
        info = c.get(server.base_url + "/_test/process").json()
        assert info["rlimit_core"] == [0, 0] and info["dumpable"] == 0  # prctl(PR_GET_DUMPABLE) in the worker
        assert core_limit(info["pid"]) == ("0", "0")  # and the kernel's view from outside

    pids = on_every_worker(server, hardened)
    assert pids <= set(children(server.proc.pid))


def test_crashing_worker_leaves_no_core_file(core_dumps_allowed: None,
                                             server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory()
    cwd = server.data_dir.parent  # the server's working directory: where core_pattern "core" would write
    with httpx.Client(timeout=10) as c:
        pid = worker_pid(server, c)
        # The worker holds a request's text in memory at the moment it crashes.
        c.post(server.v1 + "/completions", json={"model": MODEL, "prompt": "CANARY-core-7f3a"},
               headers={"Authorization": "Bearer sk_invalid"})
    os.kill(pid, signal.SIGSEGV)
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # a core file, if any, is written before the parent can reap the child
    cores = [p for d in (cwd, server.data_dir) for p in d.iterdir() if p.name.startswith("core")]
    assert cores == []
    # Control: an ordinary process in the same directory with the same limits does leave a core file, so the
    # check above can see one when there is one.
    control = subprocess.Popen(["sleep", "30"], cwd=cwd)
    time.sleep(0.1)
    control.send_signal(signal.SIGSEGV)
    control.wait()
    made = [p for p in cwd.iterdir() if p.name.startswith("core")]
    for p in made:
        p.unlink()
    if Path("/proc/sys/kernel/core_pattern").read_text().strip().startswith("core"):
        assert made, "the control process left no core file: this check cannot see cores here"


@pytest.mark.slow
def test_real_model_worker_turns_core_dumps_off(core_dumps_allowed: None, tiny_model_dir: Path,
                                                server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(backend="onnx", model_dir=tiny_model_dir)
    workers = children(server.proc.pid)
    assert workers
    for pid in workers:
        assert core_limit(pid) == ("0", "0")
    # The test-only process route does not exist outside the fixed test backend.
    assert httpx.get(server.base_url + "/_test/process", timeout=10).status_code == 404


def _tcp_peers(pid: int) -> set[str]:
    """Remote IPv4/IPv6 addresses of the process's TCP sockets (from its fds and its namespace's tables)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                peers.add(cols[2].split(":")[0])
    return peers


LOOPBACK_OR_NONE = {"00000000", "0100007F", "00000000000000000000000000000000",
                    "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.slow
def test_real_model_workers_talk_to_nobody_but_the_client(tiny_model_dir: Path,
                                                          server_factory: Callable[..., ServerProcess]) -> None:
    """Prompts never leave the host: while the real model answers, every TCP socket of every worker is the
    listener or a loopback client connection - no third-party provider, no telemetry."""
    server = server_factory(backend="onnx", model_dir=tiny_model_dir, extra_env={"CHEAPEST_MODEL_THREADS": "1"})
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    model = httpx.get(server.v1 + "/models", headers={"Authorization": f"Bearer {sk}"}).json()["data"][0]["id"]
    workers = children(server.proc.pid)
    seen: set[str] = set()
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {sk}"}) as c:
        for i in range(3):
            with c.stream("POST", server.v1 + "/completions",
                          json={"model": model, "prompt": f"hello {i}", "max_tokens": 24, "stream": True}) as s:
                for n, _ in enumerate(s.iter_lines()):
                    if n % 4 == 0:
                        for pid in workers:
                            seen |= _tcp_peers(pid)
    assert "0100007F" in seen  # the client's loopback connection was observed
    assert seen <= LOOPBACK_OR_NONE, seen


def _serve_cli(tmp: Path, *args: str) -> ServerProcess:
    data = tmp / "data"
    data.mkdir()
    port = free_port()
    return serve_cli(tmp, server_env(data), port, "--port", str(port), *args)


def test_access_log_and_request_log_carry_metadata_only(tmp_path: Path) -> None:
    canary = "CANARY-accesslog-5d1e"
    server = _serve_cli(tmp_path, "--access-log")
    try:
        _, mk = server.create_account()
        sk = str(server.create_key(mk)["key"])
        auth = {"Authorization": f"Bearer {sk}"}
        body = {"model": MODEL, "messages": [{"role": "user", "content": canary}], "max_tokens": 2}
        assert httpx.post(f"{server.v1}/chat/completions?note={canary}", json=body, headers=auth).status_code == 200
        assert httpx.get(f"{server.v1}/models?after={canary}", headers=auth).status_code == 200
        assert httpx.post(f"{server.v1}/completions?x={canary}", content=b'{"prompt": "' + canary.encode(),
                          headers=auth).status_code == 400
        assert httpx.get(f"{server.base_url}/api/keys?limit=1&{canary}=1",
                         headers={"Authorization": f"Bearer {mk}"}).status_code == 200
        deadline = time.monotonic() + 10
        while server.output().count("/v1/") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()
    text = server.output()
    access = [line for line in text.splitlines() if '"POST /v1/' in line or '"GET /' in line]
    assert any('"POST /v1/chat/completions HTTP/1.1" 200' in line for line in access), text[-2000:]
    assert any('"POST /v1/completions HTTP/1.1" 400' in line for line in access)
    assert canary not in text and "?" not in "".join(access)
    lines = server.request_log()
    assert len(lines) >= 4
    for line in lines:
        assert set(line) == REQUEST_LOG_FIELDS
        assert line["model"] in (None, MODEL)
