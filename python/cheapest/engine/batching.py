"""Continuous batching: one scheduler thread runs decode steps for every active sequence together.

Waiting sequences are prefilled (several in one right-padded run where the runner can, up to PREFILL_TOKENS
padded tokens), then join the batch; between steps finished and cancelled sequences leave and waiting ones
join. At most one prefill run happens between two decode steps, so a burst of long prompts delays the
others by one bounded prefill, never more. The thread owns the runner (ONNX Runtime releases the GIL while
it computes); results reach each request through the callbacks of its `Sequence`, which hand them to the
request's event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from cheapest.engine.runner import KvRunner
from cheapest.engine.sampling import Sampler
from cheapest.metrics import metrics

log = logging.getLogger("cheapest.engine")

PREFILL_TOKENS = 2048  # padded prompt tokens in one batched prefill run (a longer prompt still runs, alone)


class Sequence:
    """One request's generation state, touched only by the scheduler thread (except `cancel`)."""

    __slots__ = ("prompt", "sampler", "accept", "fail", "cancelled", "last_token", "at")

    def __init__(self, prompt: list[int], sampler: Sampler, accept: Callable[[int], bool],
                 fail: Callable[[BaseException], None]) -> None:
        self.prompt = prompt
        self.sampler = sampler
        self.accept = accept  # takes the next token; True when the sequence is finished
        self.fail = fail
        self.cancelled = False
        self.last_token = -1
        self.at = time.perf_counter()  # when it was made (submitted), then when its last token came

    def cancel(self) -> None:
        self.cancelled = True  # a plain flag: the scheduler drops the sequence at its next step


class Scheduler:
    def __init__(self, runner: KvRunner, model: str = "") -> None:
        self._runner = runner
        self._series = metrics.scheduler(model)  # queue, batch size, token timings (a no-op when metrics are off)
        self._rows: list[Sequence | None] = []  # batch rows; None = a hole (devices that cannot compact)
        self._waiting: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self.steps = 0  # decode steps run (for tests and benchmarks)
        self.prefill_runs = 0
        self._thread = threading.Thread(target=self._loop, name="cheapest-scheduler", daemon=True)
        self._thread.start()

    # --- called from any thread ---------------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            if self._closing:
                raise RuntimeError("the engine is closed")
            self._waiting.append(seq)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    @property
    def active(self) -> int:
        """Sequences holding a batch row (holes excluded)."""
        return sum(1 for s in self._rows if s is not None)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self, timeout: float | None = None) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # --- the scheduler thread --------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not any(self._rows):
                    self._cv.wait()
                if self._closing:
                    break
                joining = self._take_joiners()
            try:
                self._drop_cancelled()
                joining = [s for s in joining if not s.cancelled]
                if joining:
                    self._prefill(joining)
                    joining = []
                if any(self._rows):
                    self._decode()
                self._series.queue(len(self._waiting), self.active)
            except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, never the thread
                self._fail_all(e, also=joining)
        self._fail_all(RuntimeError("the engine is closed"), waiting=True)

    def _take_joiners(self) -> list[Sequence]:
        """Called under the lock: the waiting sequences the next prefill run takes."""
        row = self._free_row()
        if row is None or not self._waiting:
            return []
        if row < len(self._rows) or not self._runner.batched_prefill:
            return [self._waiting.popleft()]  # a hole (or a one-at-a-time runner): one sequence
        free = self._runner.max_batch - len(self._rows)
        joiners = [self._waiting.popleft()]
        longest = len(joiners[0].prompt)
        while self._waiting and len(joiners) < free:
            padded = max(longest, len(self._waiting[0].prompt)) * (len(joiners) + 1)
            if padded > PREFILL_TOKENS:
                break
            joiners.append(self._waiting.popleft())
            longest = max(longest, len(joiners[-1].prompt))
        return joiners

    def _free_row(self) -> int | None:
        for row, seq in enumerate(self._rows):
            if seq is None:
                return row
        return len(self._rows) if len(self._rows) < self._runner.max_batch else None

    def _prefill(self, joining: list[Sequence]) -> None:
        first = self._free_row()
        assert first is not None
        logits = self._runner.prefill_many(first, [s.prompt for s in joining])
        self.prefill_runs += 1
        for i, seq in enumerate(joining):
            row = first + i
            if row == len(self._rows):
                self._rows.append(seq)
            else:
                self._rows[row] = seq
        for i, seq in enumerate(joining):
            self._take(first + i, seq, seq.sampler(logits[i]))

    def _decode(self) -> None:
        tokens = [seq.last_token if seq is not None else -1 for seq in self._rows]
        logits = self._runner.decode(tokens)
        self.steps += 1
        self._series.step(self.active)
        for row, seq in enumerate(self._rows):
            if seq is not None:
                self._take(row, seq, seq.sampler(logits[row]))
        self._compact()

    def _take(self, row: int, seq: Sequence, token: int) -> None:
        seq.at = self._series.token(seq.at, seq.last_token < 0)
        seq.last_token = token
        try:
            finished = seq.accept(token)
        except Exception:  # noqa: BLE001 - a broken consumer loses its sequence, the batch goes on
            log.error("dropping a sequence whose output could not be delivered")
            finished = True
        if finished:
            self._leave(row)

    def _drop_cancelled(self) -> None:
        for row, seq in enumerate(self._rows):
            if seq is not None and seq.cancelled:
                self._leave(row)
        self._compact()

    def _leave(self, row: int) -> None:
        self._rows[row] = None
        if not self._runner.supports_move:
            self._runner.release(row)  # the row stays a hole; its cache length must read 0

    def _compact(self) -> None:
        """Keep rows 0..n-1 dense where the cache can move (a hole costs a wasted row in every step); rows
        are released from the end, which is the order the concatenating cache needs."""
        rows, runner = self._rows, self._runner
        row = 0
        while row < len(rows):
            if rows[row] is None:
                while rows and rows[-1] is None:
                    rows.pop()
                    if runner.supports_move:
                        runner.release(len(rows))
                if runner.supports_move and row < len(rows):
                    last = len(rows) - 1
                    runner.move(last, row)
                    rows[row] = rows.pop()
                    runner.release(last)
            row += 1

    def _fail_all(self, error: BaseException, *, waiting: bool = False, also: list[Sequence] | None = None) -> None:
        if not isinstance(error, RuntimeError) or str(error) != "the engine is closed":
            log.error("inference step failed: %s", type(error).__name__)
        victims = [s for s in self._rows if s is not None] + [s for s in also or [] if s not in self._rows]
        if waiting:
            with self._cv:
                victims += list(self._waiting)
                self._waiting.clear()
        self._rows.clear()
        self._runner.reset()
        for seq in victims:
            try:
                seq.fail(error)
            except Exception:  # noqa: BLE001 - its event loop is gone; nobody is waiting
                pass
