"""Per-worker usage accumulation, flushed to the store at most every `interval` seconds and at shutdown.

Requests only add to an in-memory dict under a lock (no I/O on the request path); a flusher thread adds the
deltas to the stored totals in one write transaction, so totals stay exact across workers, the event loop never
waits for an fsync, and a `kill -9` loses at most one interval of usage.
"""

from __future__ import annotations

import logging
import threading
import time

from cheapest.metrics import metrics
from cheapest.store.base import Store, UsageKey
from cheapest.store.records import UsageCounter
from cheapest.vocabulary import hour_of

log = logging.getLogger("cheapest.metering")


class UsageMeter:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[UsageKey, UsageCounter] = {}
        self._debits: dict[str, int] = {}  # account id -> micro-dollars owed by credit-funded accounts
        self._key_cost: dict[str, int] = {}  # key id -> micro-dollars not flushed yet (budget checks)
        self._oldest: float | None = None  # when the oldest usage not flushed yet was recorded (flush lag)
        self._lock = threading.Lock()
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
        return self._key_cost.get(key_id, 0)

    def pending_debit(self, account_id: str) -> int:
        return self._debits.get(account_id, 0)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            debits, self._debits = self._debits, {}
            key_cost, self._key_cost = self._key_cost, {}
            oldest, self._oldest = self._oldest, None
        if not pending and not debits:
            return
        try:
            self.store.add_usage(pending, debits)
        except Exception:
            metrics.usage_flush_failed()
            with self._lock:  # keep the deltas for the next try rather than lose billed usage
                self._oldest = oldest or self._oldest  # older than anything recorded since
                for k, c in pending.items():
                    self._pending.setdefault(k, UsageCounter()).add(c)
                for a, m in debits.items():
                    self._debits[a] = self._debits.get(a, 0) + m
                for kid, m in key_cost.items():
                    self._key_cost[kid] = self._key_cost.get(kid, 0) + m
            raise
        metrics.usage_flushed(0.0 if oldest is None else time.time() - oldest)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cheapest-usage-flush", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                log.exception("usage flush failed; will retry")

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
