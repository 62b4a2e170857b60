"""Per-worker usage accumulation, flushed to the store at most every `interval` seconds and at shutdown.

Requests only add to an in-memory dict under a lock (no I/O on the request path); a flusher thread adds the
deltas to the stored totals in one write transaction, so totals stay exact across workers, the event loop never
waits for an fsync, and a `kill -9` loses at most one interval of usage. A store that cannot be reached loses
nothing: the flush is kept and retried, under its flush id, until the store takes it.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import NamedTuple

from cheapest.metrics import metrics
from cheapest.store.base import Store, UsageKey
from cheapest.store.records import UsageCounter
from cheapest.vocabulary import hour_of

log = logging.getLogger("cheapest.metering")


class _Flush(NamedTuple):
    id: str  # makes the flush once-only in a store whose commits can be lost in transit (PostgreSQL)
    deltas: dict[UsageKey, UsageCounter]
    debits: dict[str, int]
    key_cost: dict[str, int]
    recorded: float  # when its oldest usage was recorded (the flush lag the metrics report)


class UsageMeter:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[UsageKey, UsageCounter] = {}
        self._debits: dict[str, int] = {}  # account id -> micro-dollars owed by credit-funded accounts
        self._key_cost: dict[str, int] = {}  # key id -> micro-dollars not flushed yet (budget checks)
        self._oldest: float | None = None  # when the oldest usage not flushed yet was recorded (flush lag)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (the flusher thread, or a final one)
        self._failed: _Flush | None = None  # a flush the store did not take: retried as it is before anything new
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, cost_micro: int,
               ts: float | None = None, debit_account: str | None = None) -> None:
        """`debit_account`: a credit-funded account whose balance pays `cost_micro` (debited at the flush)."""
        k = (key_id, model, hour_of(time.time() if ts is None else ts))
        with self._lock:
            if self._oldest is None:
                self._oldest = time.time()
            c = self._pending.get(k)
            if c is None:
                c = self._pending[k] = UsageCounter()
            c.requests += 1
            c.prompt_tokens += prompt_tokens
            c.completion_tokens += completion_tokens
            c.cost_micro += cost_micro
            if cost_micro:
                self._key_cost[key_id] = self._key_cost.get(key_id, 0) + cost_micro
                if debit_account is not None:
                    self._debits[debit_account] = self._debits.get(debit_account, 0) + cost_micro

    def pending_cost(self, key_id: str) -> int:
        """This worker's not-yet-flushed spend of a key (admission adds it to the stored spend)."""
        failed = self._failed
        return self._key_cost.get(key_id, 0) + (failed.key_cost.get(key_id, 0) if failed is not None else 0)

    def pending_debit(self, account_id: str) -> int:
        failed = self._failed
        return self._debits.get(account_id, 0) + (failed.debits.get(account_id, 0) if failed is not None else 0)

    def flush(self) -> None:
        """Write what was recorded since the last flush. A flush that failed (the store unreachable) is kept and
        retried first, under the same flush id, so it is applied once even if its commit was lost in transit."""
        with self._flush_lock:
            if self._failed is not None:
                self._write(self._failed)
            with self._lock:
                pending, self._pending = self._pending, {}
                debits, self._debits = self._debits, {}
                key_cost, self._key_cost = self._key_cost, {}
                oldest, self._oldest = self._oldest, None
            if pending or debits:
                self._write(_Flush(str(uuid.uuid4()), pending, debits, key_cost, oldest or time.time()))

    def _write(self, batch: _Flush) -> None:
        self._failed = batch
        try:
            self.store.add_usage(batch.deltas, batch.debits, flush_id=batch.id)
        except Exception:
            metrics.usage_flush_failed()
            raise
        self._failed = None
        metrics.usage_flushed(time.time() - batch.recorded)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cheapest-usage-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception as exc:  # the type only, once per outage: the usage is kept and retried
                if not failing:
                    log.warning("usage flush failed (%s); kept, retrying every %gs", type(exc).__name__,
                                self.interval)
                failing = True
            else:
                if failing:
                    log.warning("usage flush recovered")
                failing = False

    def stop(self) -> None:
        """Stop the flusher and write what is left (graceful shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("final usage flush failed")
