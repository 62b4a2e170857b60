"""The host's metrics directory: every worker's values in prometheus-client's multiprocess files, so one scrape on
any worker (or on `cheapest serve`'s own metrics port) reads the whole host.

Layout: `counter_<proc>.db`, `histogram_<proc>.db`, `gauge_<mode>_<proc>.db` (the library's names, read by its
`MultiProcessCollector`), where `<proc>` is `<pid>-<start time>` so a reused pid never writes into a dead
worker's file; `server` names the server the files belong to; `lock` serialises the bookkeeping. The directory is
owner-only (0700, files 0600) and holds metadata only: series names, bounded labels, numbers.

Why values are buffered: the library's multiprocess value writes the mmap under a lock on every increment, about
six times the cost of a plain locked add, several times per request. Here an increment only adds to a float (under
one lock per process); a thread copies changed values into the files every SYNC_INTERVAL, and a scrape copies its
own process's at once. A worker killed outright loses at most that interval of increments.

Why no environment variable: the library's own multiprocess mode is switched on by PROMETHEUS_MULTIPROC_DIR;
this service reads configuration in config.py only, so the directory comes from Settings and the value class is
installed in the process (`prometheus_client.values.ValueClass`, which the library reads whenever a series or a
labelled child is created).

Server start and worker restarts: the first process of a new server (a different parent process, or `cheapest
serve` itself) empties the directory; a worker that starts later under the same server keeps its peers' counts.
A worker that shuts down cleanly removes its live gauges (`mark_process_dead`); one found dead with its live
gauges still there (killed, crashed) is reaped by the next worker start or scrape, and counted.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import mark_process_dead

SYNC_INTERVAL = 0.5  # seconds between copies of a process's changed values into its files
LIVE_PREFIX = "gauge_livesum_"  # every worker holds one (the `cheapest_workers` gauge): how the dead are found


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat after the command name (whose parentheses may hold spaces); None without it."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(b")") + 2:].split()


def process_ident(pid: int | None = None) -> str:
    """`<pid>-<start time in clock ticks>` on Linux (unique for the machine's uptime), else the bare pid."""
    pid = os.getpid() if pid is None else pid
    fields = _stat_fields(pid)
    return f"{pid}-{int(fields[19])}" if fields is not None else str(pid)


def alive(ident: str) -> bool:
    """Whether the process an ident names still runs (a zombie does not; a reused pid is another process)."""
    pid, _, start = ident.partition("-")
    fields = _stat_fields(int(pid))
    if start:
        return fields is not None and fields[0] not in (b"Z", b"X") and fields[19] == start.encode()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def prepare(directory: Path, server: str) -> None:
    """Create the directory owner-only; empty it when its files belong to another server than `server`."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    with _locked(directory):
        marker = directory / "server"
        try:
            current = marker.read_text()
        except FileNotFoundError:
            current = ""
        if current != server:
            for old in directory.glob("*.db"):
                old.unlink(missing_ok=True)
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(server)


def reap(directory: Path, is_alive: Callable[[str], bool] = alive) -> int:
    """Mark every worker that died without shutting down as dead (its live gauges leave the sums); how many."""
    found = 0
    with _locked(directory):
        for live in directory.glob(LIVE_PREFIX + "*.db"):
            ident = live.name[len(LIVE_PREFIX):-3]
            if not is_alive(ident):
                mark_process_dead(ident, str(directory))
                found += 1
    return found


class BufferedValue:
    """One sample's value in this process (the library's value protocol); written to the files by `sync`."""

    __slots__ = ("value", "written", "key", "prefix")
    _owner: ClassVar[ProcessValues]
    _lock: ClassVar[threading.Lock]  # the owner's, here to save a lookup per increment

    def __init__(self, typ: str, metric_name: str, name: str, labelnames: Any, labelvalues: Any, help_text: str,
                 multiprocess_mode: str = "", **kwargs: Any) -> None:
        self.prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        self.key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self.value = 0.0
        self.written: float | None = None  # never written: even a zero is, so the child shows up
        self._owner.values.append(self)

    def inc(self, amount: float) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def set_exemplar(self, exemplar: Any) -> None:
        return None

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> None:
        return None


class ProcessValues:
    """This process's values and files in `directory`, from `install()` until `close()`."""

    def __init__(self, directory: Path, ident: str | None = None) -> None:
        self.directory = directory
        self.ident = ident or process_ident()
        self.lock = threading.Lock()
        self.values: list[BufferedValue] = []
        self._files: dict[str, MmapedDict] = {}
        self._sync_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        for old in directory.glob(f"*_{self.ident}.db"):  # an earlier start in this same process
            old.unlink()

    def install(self) -> None:
        """Series and children created from now on keep their values here."""
        values.ValueClass = type("BufferedValue", (BufferedValue,), {"_owner": self, "_lock": self.lock,
                                                                     "__slots__": ()})

    def start(self) -> None:
        self.sync()
        self._thread = threading.Thread(target=self._run, name="cheapest-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(SYNC_INTERVAL):
            self.sync()

    def sync(self) -> None:
        """Copy every value that changed since the last copy into this process's files."""
        with self._sync_lock:
            if self._closed:
                return
            for v in list(self.values):
                value = v.value
                if value != v.written:
                    self._file(v.prefix).write_value(v.key, value, 0.0)
                    v.written = value

    def _file(self, prefix: str) -> MmapedDict:
        f = self._files.get(prefix)
        if f is None:
            path = self.directory / f"{prefix}_{self.ident}.db"
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))  # owner-only before the library opens it
            f = self._files[prefix] = MmapedDict(str(path))
        return f

    def close(self) -> None:
        """Last copy, then this process's live gauges leave the sums (a clean exit is not a crash)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()
        self._thread = None
        with self._sync_lock:
            self._closed = True
            for f in self._files.values():
                f.close()
            self._files.clear()
        with _locked(self.directory):
            mark_process_dead(self.ident, str(self.directory))
