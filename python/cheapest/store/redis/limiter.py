"""GCRA rate limits in Redis, shared by every host: one Lua script per turn of a worker's event loop, on the
Redis server's clock.

Why a script: a decision reads and writes the theoretical arrival time (TAT) of each limit; inside one script it
is atomic with respect to every other client, so N hosts together admit exactly what one table would, and
`acquire_all` over several limits (a key's and its account's) is all or nothing with no transient charge. Why
the server's clock (TIME): hosts' clocks drift; one clock makes the limit the same whichever host answers.

Why batches: a round trip per decision would cost more than the rest of the request (bench_many_hosts.py). The
decisions (and adjustments) asked for during one turn of the event loop are queued and sent together, as ONE
script call that makes each of them in order - each one all or nothing, exactly as if sent alone - when the loop
gets to the flush it scheduled. Under load a turn gathers many requests; a lone request costs one round trip.
Adjustments (the TPM charge corrected after a generation) are never awaited: they ride with the next batch.

The algorithm is the core's (rust/ratelimit.rs), in microseconds: emission interval T = ceil(period / limit),
burst tolerance tau = limit * T; a cost c at `now` is allowed iff max(tat, now) + c*T - now <= tau, and then
tat = max(tat, now) + c*T. Each TAT key expires once its TAT has passed (a fresh key is the same as an absent one).

When Redis cannot be reached, decisions fall back to the host's own shared-memory table (each host then enforces
each limit alone: up to N times the limit across N hosts) - see README "Deployment: many hosts".
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import redis
from cheapest_core import RateLimiter

from cheapest.metrics import metrics
from cheapest.store.limiter import Decision, LimitRequest
from cheapest.store.redis.link import RedisLink

PREFIX = "cheapest:rl:"
_US = 1_000_000
_ACQUIRE, _PEEK, _ADJUST = 0, 1, 2
ADJUST_DELAY = 0.005  # seconds an adjustment may wait for a decision to travel with

# ARGV[1]: the number of operations; then per operation: its mode (0 acquire, 1 peek, 2 adjust), its number of
# limits, and per limit: limit, period (us), cost (or delta). KEYS: every operation's limits, in order.
# Returns per operation a list of {allowed (0/1), limit, remaining, reset_after (us), retry_after (us; -1 never)}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local a, k = 2, 1
local results = {}

local function wait(s, c)
  if c > s.lim then return -1 end
  local w = math.max(s.tat, now) + c * s.T - s.tau - now
  if w < 0 then return 0 end
  return w
end
local function decision(s, allowed, retry)
  local free = now + s.tau - s.tat
  local remaining = 0
  if free > 0 then remaining = math.min(math.floor(free / s.T), s.lim) end
  return {allowed, s.lim, remaining, math.max(s.tat - now, 0), retry}
end
local function store(s, new)
  s.tat = new
  if new > now then
    redis.call('SET', s.key, string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000)
  else
    redis.call('DEL', s.key)
  end
end

for op = 1, tonumber(ARGV[1]) do
  local mode, n = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  local limits, out = {}, {}
  for i = 1, n do
    local l, p, c = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
    a = a + 3
    local s = {key = KEYS[k], lim = l, cost = c}
    k = k + 1
    if l == 0 then s.T = math.max(p, 1); s.tau = 0 else s.T = math.floor((p + l - 1) / l); s.tau = s.T * l end
    s.tat = tonumber(redis.call('GET', s.key) or '0')
    limits[i] = s
  end
  if mode == 2 then
    for _, s in ipairs(limits) do
      if s.lim > 0 and s.cost ~= 0 then
        local amount = math.min(math.abs(s.cost) * s.T, 4e15)
        if s.cost > 0 then store(s, math.max(s.tat, now) + amount)
        elseif s.tat > now then store(s, math.max(s.tat - amount, now)) end
      end
    end
  elseif mode == 1 then
    for i, s in ipairs(limits) do
      local w = wait(s, 1)
      out[i] = decision(s, w == 0 and 1 or 0, w)
    end
  else
    local waits, ok = {}, true
    for i, s in ipairs(limits) do
      waits[i] = wait(s, s.cost)
      if waits[i] ~= 0 then ok = false end
    end
    for i, s in ipairs(limits) do
      if ok then
        store(s, math.max(s.tat, now) + s.cost * s.T)
        out[i] = decision(s, 1, 0)
      else
        out[i] = decision(s, 0, waits[i])
      end
    end
  end
  results[op] = out
end
return results
"""


class LimitDecision:
    """A decision of the Redis limiter (the same fields as the core's `RateDecision`)."""

    __slots__ = ("allowed", "limit", "remaining", "reset_after", "retry_after")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_after: float, retry_after: float) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_after = reset_after
        self.retry_after = retry_after

    @classmethod
    def of(cls, row: list[int]) -> LimitDecision:
        allowed, limit, remaining, reset_us, retry_us = row
        return cls(bool(allowed), int(limit), int(remaining), reset_us / _US,
                   math.inf if retry_us < 0 else retry_us / _US)

    def __repr__(self) -> str:
        return (f"LimitDecision(allowed={self.allowed}, limit={self.limit}, remaining={self.remaining}, "
                f"reset_after={self.reset_after}, retry_after={self.retry_after})")


_Op = tuple[int, Sequence[LimitRequest], "asyncio.Future[Sequence[Decision]] | None"]


class RedisLimiter:
    def __init__(self, url: str, fallback: RateLimiter) -> None:
        self.link = RedisLink(url, "rate limits")
        self.fallback = fallback  # this host's table, while Redis is unreachable
        self._sha = self.link.script(_GCRA).sha
        self._ops: list[_Op] = []
        self._soon: asyncio.AbstractEventLoop | None = None  # the loop where a flush is due this turn
        self._later: asyncio.TimerHandle | None = None  # a flush of adjustments alone, a moment from now
        self.batches = 0  # script calls made (the tests and the benchmark read it)

    async def acquire_all(self, requests: list[LimitRequest], /) -> Sequence[Decision]:
        if any(cost < 0 for _, _, _, cost in requests):
            raise ValueError("cost must be >= 0")
        return await self._ask(_ACQUIRE, requests)

    async def peek(self, key: str, limit: int, period: float, /) -> Decision:
        return (await self._ask(_PEEK, [(key, limit, period, 1)]))[0]

    def adjust(self, key: str, limit: int, period: float, delta: int, /) -> None:
        if delta == 0:
            return
        self._ops.append((_ADJUST, [(key, limit, period, delta)], None))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside an event loop (a script, a test): at once
            self.flush()
            return
        # Not urgent: it goes with the next decision, or on its own a moment later (never a round trip of its
        # own between two requests of a busy connection).
        if self._soon is not loop and (self._later is None or self._later.cancelled()):
            self._later = loop.call_later(ADJUST_DELAY, self.flush)

    def forget(self, keys: list[str], /) -> None:
        """Delete the limits' TATs (and this host's fallback state), now: a revoked key or a deleted account."""
        for key in keys:
            self.fallback.forget(key)
        try:
            self.link.command("DEL", *(PREFIX + key for key in keys))
        except ConnectionError:  # unreachable: each TAT expires by itself once it has passed
            pass

    def _ask(self, mode: int, requests: Sequence[LimitRequest]) -> asyncio.Future[Sequence[Decision]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sequence[Decision]] = loop.create_future()
        self._ops.append((mode, requests, future))
        if self._soon is not loop:  # (a loop that ended before its flush ran is replaced)
            self._soon = loop
            loop.call_soon(self.flush)
        return future

    def flush(self) -> None:
        """Send every queued operation in one script call and resolve each one's future."""
        self._soon = None
        if self._later is not None:
            self._later.cancel()
            self._later = None
        ops, self._ops = self._ops, []
        if not ops:
            return
        try:
            results: list[Sequence[Decision]] = [[LimitDecision.of(row) for row in rows] for rows in self._send(ops)]
        except ConnectionError:
            metrics.error("limiter")  # Redis unreachable: this host's table decides meanwhile
            results = [self._locally(mode, requests) for mode, requests, _ in ops]
        except Exception as exc:  # e.g. a bad argument: every waiting request fails, none hangs
            for _, _, future in ops:
                if future is not None and not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), decisions in zip(ops, results):
            if future is not None and not future.done():
                future.set_result(decisions)

    def _send(self, ops: list[_Op]) -> list[list[list[int]]]:
        keys: list[str] = []
        args: list[int] = [len(ops)]
        for mode, requests, _ in ops:
            args += (mode, len(requests))
            for name, limit, period, cost in requests:
                if limit < 0 or not (math.isfinite(period) and period > 0):
                    raise ValueError("a limit needs limit >= 0 and a positive period")
                keys.append(PREFIX + name)
                args += (limit, max(1, round(period * _US)), cost)
        self.batches += 1
        try:
            rows: list[list[list[int]]] = self.link.command("EVALSHA", self._sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a new or restarted Redis: load the script, once
            self.link.call(lambda r: r.script_load(_GCRA))
            rows = self.link.command("EVALSHA", self._sha, len(keys), *keys, *args)
        return rows

    def _locally(self, mode: int, requests: Sequence[LimitRequest]) -> Sequence[Decision]:
        table = self.fallback
        if mode == _ACQUIRE:
            return table.acquire_all(list(requests))
        if mode == _PEEK:
            return [table.peek(name, limit, period) for name, limit, period, _ in requests]
        for name, limit, period, delta in requests:
            table.adjust(name, limit, period, delta)
        return []

    def close(self) -> None:
        self.flush()
        self.link.close()
