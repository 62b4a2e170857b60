"""Continuous batching: one scheduler thread runs decode steps for every active sequence together.

A sequence is prefilled alone (batch 1, no padding), then joins the batch; between steps finished and cancelled
sequences leave and waiting ones join. At most one prefill runs between two decode steps, so a long prompt
delays the others by one prefill, never more. The thread owns the runner (ONNX Runtime releases the GIL while
it computes); results reach each request through the callbacks of its `Sequence`, which hand them to the
request's event loop.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from cheapest.inference.runner import KvRunner
from cheapest.inference.sampling import Sampler

log = logging.getLogger("cheapest.inference")


class Sequence:
    """One request's generation state, touched only by the scheduler thread (except `cancel`)."""

    __slots__ = ("prompt", "sampler", "accept", "fail", "cancelled", "last_token")

    def __init__(self, prompt: list[int], sampler: Sampler, accept: Callable[[int], bool],
                 fail: Callable[[BaseException], None]) -> None:
        self.prompt = prompt
        self.sampler = sampler
        self.accept = accept  # takes the next token; True when the sequence is finished
        self.fail = fail
        self.cancelled = False
        self.last_token = -1

    def cancel(self) -> None:
        self.cancelled = True  # a plain flag: the scheduler drops the sequence at its next step


class Scheduler:
    def __init__(self, runner: KvRunner) -> None:
        self._runner = runner
        self._rows: list[Sequence | None] = []  # batch rows; None = a hole (devices that cannot compact)
        self._waiting: deque[Sequence] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self.steps = 0  # decode steps run (for tests and benchmarks)
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
                joining = self._waiting.popleft() if self._waiting and self._free_row() is not None else None
            try:
                self._drop_cancelled()
                if joining is not None and not joining.cancelled:
                    self._prefill(joining)
                if any(self._rows):
                    self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step fails its sequences, never the thread
                self._fail_all(e)
        self._fail_all(RuntimeError("the engine is closed"), waiting=True)

    def _free_row(self) -> int | None:
        for row, seq in enumerate(self._rows):
            if seq is None:
                return row
        return len(self._rows) if len(self._rows) < self._runner.max_batch else None

    def _prefill(self, seq: Sequence) -> None:
        row = self._free_row()
        assert row is not None
        logits = self._runner.prefill(row, seq.prompt)
        if row == len(self._rows):
            self._rows.append(seq)
        else:
            self._rows[row] = seq
        self._take(row, seq, seq.sampler(logits))

    def _decode(self) -> None:
        tokens = [seq.last_token if seq is not None else -1 for seq in self._rows]
        logits = self._runner.decode(tokens)
        self.steps += 1
        for row, seq in enumerate(self._rows):
            if seq is not None:
                self._take(row, seq, seq.sampler(logits[row]))
        self._compact()

    def _take(self, row: int, seq: Sequence, token: int) -> None:
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

    def _fail_all(self, error: BaseException, *, waiting: bool = False) -> None:
        if not isinstance(error, RuntimeError) or str(error) != "the engine is closed":
            log.error("inference step failed: %s", type(error).__name__)
        victims = [s for s in self._rows if s is not None]
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
