"""Data retention: usage older than 90 days becomes anonymous aggregates; deleted accounts are purged.

`run_retention(store, now)` is one pass: `cheapest retention run` calls it, and `PeriodicRetention` calls it
inside the server. Every step is idempotent and exact under concurrency (each usage row is deleted in the same
store transaction that adds it to its day's aggregate), so two passes at once would be harmless - but they
would be wasted work, so passes take an flock on `<data>/retention.lock`, and the file records when the last
pass ran: of N workers checking every minute, one runs the job per interval and the others skip.

`now` is always passed in (tests drive the clock); nothing here sleeps to wait for time to pass.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec

from cheapest.privacy.deletion import purge_deleted_accounts
from cheapest.store import Store
from cheapest.vocabulary import DAY, HOUR

log = logging.getLogger("cheapest.retention")

USAGE_KEPT = 90 * DAY  # the privacy policy: "Aggregated and anonymized after 90 days"
LOCK_NAME = "retention.lock"


class RetentionReport(msgspec.Struct, frozen=True):
    ran_at: int
    usage_cutoff: int  # usage rows of hours before this were rolled up
    usage_rows_rolled_up: int
    accounts_purged: int


def usage_cutoff(now: float) -> int:
    """Rows whose whole hour ended 90 days or more before `now`: hour < cutoff."""
    return int(now - USAGE_KEPT) // HOUR * HOUR


def run_retention(store: Store, now: float) -> RetentionReport:
    purged = purge_deleted_accounts(store, now)
    cutoff = usage_cutoff(now)
    rolled = store.roll_up_usage(cutoff)
    return RetentionReport(ran_at=int(now), usage_cutoff=cutoff, usage_rows_rolled_up=rolled,
                           accounts_purged=len(purged))


@contextmanager
def retention_lock(data_dir: str | os.PathLike[str], blocking: bool) -> Iterator[int | None]:
    """The lock file's descriptor while held; None (non-blocking) when another process holds it."""
    path = Path(data_dir) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _last_run(fd: int) -> float:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return float(os.read(fd, 64).decode() or 0)
    except ValueError:
        return 0.0


def _record_run(fd: int, now: float) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, repr(float(now)).encode(), 0)


def run_locked(store: Store, data_dir: str | os.PathLike[str], now: float, *, interval: float = 0.0,
               blocking: bool = True) -> RetentionReport | None:
    """One pass under the lock, if none ran in the last `interval` seconds (by `now`). None when skipped."""
    with retention_lock(data_dir, blocking) as fd:
        if fd is None:
            return None  # another worker is running it
        last = _last_run(fd)
        if 0 <= now - last < interval:
            return None
        report = run_retention(store, now)
        _record_run(fd, now)
        return report


class PeriodicRetention:
    """The in-server job: each worker checks every min(interval, 60 s); one of them runs each interval."""

    def __init__(self, store: Store, data_dir: str | os.PathLike[str], interval: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.data_dir = data_dir
        self.interval = interval
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cheapest-retention", daemon=True)
            self._thread.start()

    def check(self) -> RetentionReport | None:
        report = run_locked(self.store, self.data_dir, self.clock(), interval=self.interval, blocking=False)
        if report is not None:  # counts only: ids are not needed to operate the job
            log.info("retention: %d usage rows rolled up, %d accounts purged", report.usage_rows_rolled_up,
                     report.accounts_purged)
        return report

    def _run(self) -> None:
        period = min(self.interval, 60.0)
        while not self._stop.wait(period):
            try:
                self.check()
            except Exception as exc:
                log.error("retention run failed: %s", type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
