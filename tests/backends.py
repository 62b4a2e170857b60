"""Real PostgreSQL and Redis servers for tests and benchmarks, from Debian's packages (`make test` installs them).

Each runs in a temporary directory on a loopback port and is stopped (and its directory removed) at the end.
PostgreSQL refuses to run as root, and CI runs as root: then the server runs as `nobody` (setpriv), in a
directory that user owns under the system temp dir (pytest's own temp dirs are private to root). Durability is
off (fsync, synchronous_commit): these are throwaway clusters, and it keeps the suite fast on a 2-core box.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if not found:
        raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql; `make test` does it)")
    return Path(found[-1]).parent


def _as_unprivileged() -> tuple[list[str], int | None, int | None]:
    """The command prefix that drops root (and the uid/gid to own files), or nothing when not root."""
    if os.geteuid() != 0:
        return [], None, None
    user = pwd.getpwnam("nobody")
    return (["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"], user.pw_uid,
            user.pw_gid)


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen in {timeout}s:\n{log.read_text()[-2000:]}")


class _Server:
    """A server process of ours in a temporary directory."""

    root: Path
    proc: subprocess.Popen[bytes] | None

    def _stop(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._stop(signal.SIGTERM)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)



class PostgresServer(_Server):
    """One throwaway cluster; `database()` makes a fresh, migrated database from a template in ~0.1 s."""

    USER = "cheapest"

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="cheapest-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.prefix, uid, gid = _as_unprivileged()
        if uid is not None:
            os.chown(self.root, uid, gid or -1)
        self.proc: subprocess.Popen[bytes] | None = None
        self._count = 0
        subprocess.run([*self.prefix, str(self.bin / "initdb"), "-D", str(self.data), "-U", self.USER,
                        "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, cwd=self.root)
        self.start()
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE template_cheapest")
        from cheapest.store.postgres.schema import migrate

        with psycopg.connect(self.url("template_cheapest"), autocommit=True) as conn:
            migrate(conn)

    def url(self, database: str) -> str:
        return f"postgresql://{self.USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        # The log is opened by the server's own user, so it goes to a file it owns: its stderr.
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log, stderr=log, cwd=self.root, start_new_session=True)
        _wait_port(self.port, self.proc, self.log, "postgres")
        deadline = time.monotonic() + 30
        while True:  # listening is not yet accepting: wait for a real connection
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def database(self) -> str:
        """A fresh database with the schema applied; returns its URL."""
        self._count += 1
        name = f"t{os.getpid()}_{self._count}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template_cheapest")
        return self.url(name)

    def drop(self, url: str) -> None:
        """Drop a database made by `database()` (its remaining connections are ended), keeping the cluster small."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        """SIGINT: PostgreSQL's fast shutdown (clients disconnected, clean)."""
        self._stop(signal.SIGINT)

    def restart(self) -> None:
        self.stop()
        self.start()


class RedisServer(_Server):
    """One throwaway redis-server (Valkey's `valkey-server` works the same), with an append-only file so that a
    restart keeps its state as production's would, and so the privacy tests have its files to search."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server") or shutil.which("valkey-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server; `make test` does it)")
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="cheapest-redis-"))
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
                 "--appendonly", "yes", "--save", "", "--daemonize", "no"],
                stdout=log, stderr=log, start_new_session=True)
        _wait_port(self.port, self.proc, self.log, "redis-server")

    def flush(self) -> None:
        """Forget every key (between tests that share the server)."""
        import redis

        with redis.Redis.from_url(self.url) as r:
            r.flushall()

