"""Per-worker usage accumulation, flushed to the store at most every `interval` seconds and at shutdown.

Requests only add to an in-memory dict under a lock (no I/O on the request path); a flusher thread adds the
deltas to the stored totals in one write transaction, so totals stay exact across workers, the event loop never
waits for an fsync, and a `kill -9` loses at most one interval of usage. A store that cannot be reached loses
nothing: the flush is kept and retried, under its flush id, until the store takes it.

Generations in flight are metered as they go, not only when they end: each is a `LiveUsage` the meter holds
from admission to settlement, whose completion-token count the generation keeps current; every flush takes
what it produced since the last one. A worker killed in the middle of a long stream so loses at most the tokens
of one flush interval, like everything else, instead of the whole stream.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import NamedTuple

from cheapest.metrics import metrics
from cheapest.store.base import Store, UsageKey
from cheapest.store.records import UsageCounter
from cheapest.vocabulary import hour_of

log = logging.getLogger("cheapest.metering")

Price = Callable[[int, int], int]  # (prompt tokens, completion tokens) -> micro-dollars


class LiveUsage:
    """One generation, as the meter sees it: who pays, for which model, how many prompt tokens, and the
    completion tokens generated so far (`completion_tokens`, written by whoever runs the generation). The
    meter records the difference from what it already holds at each flush and at settlement, so the request
    is counted once and its cost, computed on the running totals, is exact."""

    __slots__ = ("key_id", "account_id", "model", "prompt_tokens", "completion_tokens", "debit_to", "price",
                 "_held_tokens", "_held_cost", "_counted", "__weakref__")

    def __init__(self, key_id: str, account_id: str, model: str | None, prompt_tokens: int, price: Price | None,
                 debit_to: str | None) -> None:
        self.key_id = key_id
        self.account_id = account_id
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.debit_to = debit_to  # a credit-funded account whose balance pays the cost
        self.price = price
        self._held_tokens = 0  # completion tokens the meter already holds
        self._held_cost = 0
        self._counted = False  # the request and its prompt tokens are held


class _Flush(NamedTuple):
    id: str  # makes the flush once-only in a store whose commits can be lost in transit (PostgreSQL)
    deltas: dict[UsageKey, UsageCounter]
    debits: dict[str, int]
    cost: dict[str, int]  # key or account id -> micro-dollars
    owners: dict[str, str]  # key id -> account id
    recorded: float  # when its oldest usage was recorded (the flush lag the metrics report)


class UsageMeter:
    def __init__(self, store: Store, interval: float = 1.0) -> None:
        self.store = store
        self.interval = interval
        self._pending: dict[UsageKey, UsageCounter] = {}
        self._debits: dict[str, int] = {}  # account id -> micro-dollars owed by credit-funded accounts
        self._cost: dict[str, int] = {}  # key id or account id -> micro-dollars not flushed yet (budget checks)
        self._owners: dict[str, str] = {}  # key id -> account id, for the accounts' budget spend
        self._live: weakref.WeakSet[LiveUsage] = weakref.WeakSet()
        self._oldest: float | None = None  # when the oldest usage not flushed yet was recorded (flush lag)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (the flusher thread, or a final one)
        self._failed: _Flush | None = None  # a flush the store did not take: retried as it is before anything new
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, key_id: str, model: str, prompt_tokens: int, completion_tokens: int, cost_micro: int,
               ts: float | None = None, debit_account: str | None = None, account_id: str | None = None) -> None:
        """One whole request. `debit_account`: a credit-funded account whose balance pays `cost_micro` (debited
        at the flush); `account_id`: the key's account, whose budget spend the cost adds to."""
        with self._lock:
            self._add(key_id, model, 1, prompt_tokens, completion_tokens, cost_micro, ts, debit_account, account_id)

    def _add(self, key_id: str, model: str, requests: int, prompt_tokens: int, completion_tokens: int,
             cost_micro: int, ts: float | None, debit_account: str | None, account_id: str | None) -> None:
        """Under the lock."""
        if self._oldest is None:
            self._oldest = time.time()
        k = (key_id, model, hour_of(time.time() if ts is None else ts))
        c = self._pending.get(k)
        if c is None:
            c = self._pending[k] = UsageCounter()
        c.requests += requests
        c.prompt_tokens += prompt_tokens
        c.completion_tokens += completion_tokens
        c.cost_micro += cost_micro
        if cost_micro:
            self._cost[key_id] = self._cost.get(key_id, 0) + cost_micro
            if account_id is not None:
                self._owners[key_id] = account_id
                self._cost[account_id] = self._cost.get(account_id, 0) + cost_micro
            if debit_account is not None:
                self._debits[debit_account] = self._debits.get(debit_account, 0) + cost_micro

    # --- generations in flight -------------------------------------------------------------------------------
    def begin(self, live: LiveUsage) -> None:
        """Meter a generation from now on, at every flush, until `end`."""
        with self._lock:
            self._live.add(live)

    def end(self, live: LiveUsage) -> None:
        """Record what the generation produced since the last flush, and stop following it."""
        with self._lock:
            self._take(live)
            self._live.discard(live)

    def _take(self, live: LiveUsage) -> None:
        """Under the lock: what `live` produced beyond what is held."""
        tokens = live.completion_tokens
        if live._counted and tokens == live._held_tokens:
            return
        assert live.model is not None and live.price is not None
        cost = live.price(live.prompt_tokens, tokens)
        first = not live._counted
        self._add(live.key_id, live.model, int(first), live.prompt_tokens if first else 0, tokens - live._held_tokens,
                  cost - live._held_cost, None, live.debit_to, live.account_id)
        live._counted, live._held_tokens, live._held_cost = True, tokens, cost

    # --- reads for admission ---------------------------------------------------------------------------------
    def pending_cost(self, owner_id: str) -> int:
        """This worker's not-yet-flushed spend of a key or an account (admission adds it to the stored spend)."""
        failed = self._failed
        return self._cost.get(owner_id, 0) + (failed.cost.get(owner_id, 0) if failed is not None else 0)

    def pending_debit(self, account_id: str) -> int:
        failed = self._failed
        return self._debits.get(account_id, 0) + (failed.debits.get(account_id, 0) if failed is not None else 0)

    # --- flushing --------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write what was recorded since the last flush, with what each generation in flight made since. A flush
        that failed (the store unreachable) is kept and retried first, under the same flush id, so it is applied
        once even if its commit was lost in transit."""
        with self._flush_lock:
            if self._failed is not None:
                self._write(self._failed)
            with self._lock:
                for live in list(self._live):
                    self._take(live)
                pending, self._pending = self._pending, {}
                debits, self._debits = self._debits, {}
                cost, self._cost = self._cost, {}
                owners, self._owners = self._owners, {}
                oldest, self._oldest = self._oldest, None
            if pending or debits:
                self._write(_Flush(str(uuid.uuid4()), pending, debits, cost, owners, oldest or time.time()))

    def _write(self, batch: _Flush) -> None:
        self._failed = batch
        try:
            self.store.add_usage(batch.deltas, batch.debits, flush_id=batch.id, owners=batch.owners)
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
