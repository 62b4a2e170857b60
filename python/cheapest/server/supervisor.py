"""`cheapest serve`'s process supervision: a worker that dies is replaced, the others never stop serving.

Granian runs the workers; with `respawn_failed_workers` its master starts a new worker in the place of one that
exited unexpectedly, while the survivors go on accepting from the shared socket. Granian's own guard against a
crash loop, though, stops the WHOLE server when one worker fails twice within 5.5 s - every healthy worker with
it, so a request that crashes its worker twice would be an outage. `SupervisedServer` keeps Granian's respawn and
replaces that guard with `CrashLoop`: each crash is logged with the count in the last minute, and respawns back
off (0 s for the first crash in a minute, then 0.5 s doubling up to 30 s), so a worker that cannot start costs
at most one attempt every 30 s, while the server stays up on the workers that can.

A killed worker takes its in-flight requests with it; what they generated is metered up to the last usage
flush (store/metering.py), so at most one flush interval of usage is lost.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

from granian.server import Server

log = logging.getLogger("cheapest.server")

WINDOW_S = 60.0
FIRST_DELAY_S = 0.5
MAX_DELAY_S = 30.0


class CrashLoop:
    """Worker crashes of one server: how long to wait before the next respawn."""

    def __init__(self, window: float = WINDOW_S, first: float = FIRST_DELAY_S, most: float = MAX_DELAY_S) -> None:
        self.window = window
        self.first = first
        self.most = most
        self._times: deque[float] = deque()

    def record(self, crashes: int, now: float) -> tuple[int, float]:
        """`crashes` workers died at `now` -> (crashes in the last window, seconds to wait before respawning)."""
        self._times.extend([now] * crashes)
        while self._times and self._times[0] <= now - self.window:
            self._times.popleft()
        n = len(self._times)
        return n, 0.0 if n <= 1 else min(self.most, self.first * 2 ** (n - 2))


class SupervisedServer(Server):  # type: ignore[misc, valid-type]
    """Granian's server, failed workers respawned under `CrashLoop` instead of Granian's stop-everything rule."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "respawn_failed_workers": True})
        self.crash_loop = CrashLoop()

    def _respawn_workers(self, workers: list[int], spawn_target: Any, target_loader: Any, delay: float = 0) -> None:
        # Granian respawns crashed workers, and reloaded or recycled ones; only a dead process crashed.
        crashed = [idx for idx in workers if not self.wrks[idx].is_alive()]
        if crashed:
            count, wait = self.crash_loop.record(len(crashed), time.monotonic())
            log.error("worker %s exited unexpectedly (%d crashes in the last %gs); the other workers keep serving; "
                      "respawning in %gs", ", ".join(str(i + 1) for i in crashed), count, self.crash_loop.window,
                      wait)
            if not self._pause(wait):
                return  # the server is stopping
        super()._respawn_workers(workers, spawn_target, target_loader, delay)
        for idx in crashed:  # Granian would stop the server if this worker died again within 5.5 s: CrashLoop rules
            self.respawned_wrks.pop(idx, None)

    def _pause(self, seconds: float) -> bool:
        """Sleep, unless the server is told to stop meanwhile (then False)."""
        deadline = time.monotonic() + seconds
        while not self.interrupt_signal and time.monotonic() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return not self.interrupt_signal
