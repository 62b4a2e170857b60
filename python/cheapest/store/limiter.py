"""The rate limiter the gateway admits requests through: the `Limiter` protocol and the configured one.

Two implementations, chosen by configuration (`limiter_url`):
  - the core's shared-memory GCRA table (`cheapest_core.RateLimiter`, `<data>/ratelimit-v2.bin`): every worker
    of ONE host, no server; the default. A table whose every slot holds a live limit refuses a new name with
    `RateLimiterFull` (the gateway answers 503).
  - `RedisLimiter` (store/redis/limiter.py): the same GCRA in one Lua script per decision on Redis's clock, so
    every worker of every host shares each limit exactly.

Names are the limit's table key (e.g. "rpm:<key id>"); a limit is `limit` units per `period` seconds; a decision
carries what `x-ratelimit-*` headers report. `acquire_all` is all or nothing over any number of limits (a key's
and its account's), so a refused request charges none of them.

Why decisions are awaited: a decision over the network is a round trip, and a worker serving many connections
should not pay one per request. Awaiting lets the Redis limiter answer every decision asked in one turn of the
event loop with ONE script call; the shared-memory table answers at once (awaiting it costs a coroutine, well
under a microsecond). Adjustments change no decision and are never awaited: they ride along with the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cheapest_core import RateLimiter

from cheapest.store.settings import StoreSettings

# (name, limit, period in seconds, cost)
LimitRequest = tuple[str, int, float, int]


class Decision(Protocol):
    """The outcome of one limit's check (the core's `RateDecision` is one): whether it was allowed, the limit, the
    units left, `reset_after` (seconds until fully replenished) and `retry_after` (seconds until this request
    would be allowed: 0.0 if it was, inf if never). Read-only."""

    @property
    def allowed(self) -> bool: ...
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_after(self) -> float: ...
    @property
    def retry_after(self) -> float: ...


class Limiter(Protocol):
    async def acquire_all(self, requests: list[LimitRequest], /) -> Sequence[Decision]:
        """Charge every limit its cost if all of them have room; else charge none, and every decision is not
        allowed (each `retry_after` is that limit's own wait)."""
        ...

    async def peek(self, key: str, limit: int, period: float, /) -> Decision:
        """What a request of one unit would get now, changing nothing."""
        ...

    def adjust(self, key: str, limit: int, period: float, delta: int, /) -> None:
        """Charge (delta > 0) or refund (delta < 0) units without refusal, e.g. a TPM charge corrected to the
        tokens really used. Not awaited: it may be applied a moment later."""
        ...

    def forget(self, keys: list[str], /) -> None:
        """Drop these limits (a revoked key's, a deleted account's): their state and the room they take. Not
        awaited; callable from any thread."""
        ...

    def close(self) -> None: ...


class SharedMemoryLimiter:
    """The core's shared-memory GCRA table (every worker of one host) behind the `Limiter` protocol."""

    def __init__(self, table: RateLimiter) -> None:
        self.table = table

    async def acquire_all(self, requests: list[LimitRequest], /) -> Sequence[Decision]:
        return self.table.acquire_all(requests)

    async def peek(self, key: str, limit: int, period: float, /) -> Decision:
        return self.table.peek(key, limit, period)

    def adjust(self, key: str, limit: int, period: float, delta: int, /) -> None:
        self.table.adjust(key, limit, period, delta)

    def forget(self, keys: list[str], /) -> None:
        for key in keys:
            self.table.forget(key)

    def close(self) -> None:
        pass


def open_configured_limiter(settings: StoreSettings) -> Limiter:
    """The host's shared-memory table, or Redis (falling back to that table while Redis is unreachable) when
    `limiter_url` is set. Call inside the worker process."""
    table = RateLimiter(str(settings.ratelimit_path), settings.ratelimit_capacity)
    if not settings.limiter_url:
        return SharedMemoryLimiter(table)
    from cheapest.store.redis.limiter import RedisLimiter

    return RedisLimiter(settings.limiter_url, fallback=table)
