"""GCRA rate limits in Redis: one Lua script per decision, on the Redis server's clock, shared by every host.

Why a script: a decision reads and writes the theoretical arrival time (TAT) of each limit; inside one script it
is atomic with respect to every other client, so N hosts together admit exactly what one table would, and
`acquire_all` over several limits (a key's and its account's) is all or nothing with no transient charge. Why
the server's clock (TIME): hosts' clocks drift; one clock makes the limit the same whichever host answers.

The algorithm is the core's (rust/ratelimit.rs), in microseconds: emission interval T = ceil(period / limit),
burst tolerance tau = limit * T; a cost c at `now` is allowed iff max(tat, now) + c*T - now <= tau, and then
tat = max(tat, now) + c*T. Each TAT key expires once its TAT has passed (a fresh key is the same as an absent one).

Adjustments (the TPM charge corrected after a generation) change no decision, so they are not sent on the
request's path: they are queued and sent by a background thread, a few milliseconds later, batched.

When Redis cannot be reached, decisions fall back to the host's own shared-memory table (each host then enforces
each limit alone: up to N times the limit across N hosts) - see README "Deployment: many hosts".
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import redis

from cheapest.store.limiter import Decision, LimitRequest, Limiter
from cheapest.store.redis.link import RedisLink

PREFIX = "cheapest:rl:"
_US = 1_000_000

# ARGV[1]: "acquire" | "peek" | "adjust"; then limit, period (us), cost (or delta) per key.
# Returns per key {allowed (0/1), limit, remaining, reset_after (us), retry_after (us; -1 = never)}.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mode = ARGV[1]
local n = #KEYS
local lim, T, tau, cost, tat = {}, {}, {}, {}, {}
for i = 1, n do
  local l = tonumber(ARGV[2 + (i - 1) * 3])
  local p = tonumber(ARGV[3 + (i - 1) * 3])
  lim[i] = l
  cost[i] = tonumber(ARGV[4 + (i - 1) * 3])
  if l == 0 then T[i] = math.max(p, 1); tau[i] = 0 else T[i] = math.floor((p + l - 1) / l); tau[i] = T[i] * l end
  tat[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
local function wait(i, c)
  if c > lim[i] then return -1 end
  local w = math.max(tat[i], now) + c * T[i] - tau[i] - now
  if w < 0 then return 0 end
  return w
end
local function decision(i, allowed, retry)
  local free = now + tau[i] - tat[i]
  local remaining = 0
  if free > 0 then remaining = math.min(math.floor(free / T[i]), lim[i]) end
  return {allowed, lim[i], remaining, math.max(tat[i] - now, 0), retry}
end
local function store(i, new)
  if new > now then redis.call('SET', KEYS[i], string.format('%d', new), 'PX', math.ceil((new - now) / 1000) + 1000) end
end
local out = {}
if mode == 'adjust' then
  for i = 1, n do
    local d = cost[i]
    if lim[i] > 0 and d ~= 0 then
      local amount = math.min(math.abs(d) * T[i], 4e15)
      if d > 0 then store(i, math.max(tat[i], now) + amount)
      elseif tat[i] > now then
        local new = math.max(tat[i] - amount, now)
        if new > now then store(i, new) else redis.call('DEL', KEYS[i]) end
      end
    end
  end
  return out
end
if mode == 'peek' then
  for i = 1, n do
    local w = wait(i, 1)
    out[i] = decision(i, w == 0 and 1 or 0, w)
  end
  return out
end
local ok = true
local waits = {}
for i = 1, n do
  waits[i] = wait(i, cost[i])
  if waits[i] ~= 0 then ok = false end
end
if ok then
  for i = 1, n do
    tat[i] = math.max(tat[i], now) + cost[i] * T[i]
    store(i, tat[i])
    out[i] = decision(i, 1, 0)
  end
else
  for i = 1, n do out[i] = decision(i, 0, waits[i]) end
end
return out
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


def _args(mode: str, requests: Sequence[LimitRequest]) -> tuple[list[str], list[str | int]]:
    keys: list[str] = []
    args: list[str | int] = [mode]
    for name, limit, period, cost in requests:
        if limit < 0 or not (math.isfinite(period) and period > 0):
            raise ValueError("a limit needs limit >= 0 and a positive period")
        keys.append(PREFIX + name)
        args += (limit, max(1, round(period * _US)), cost)
    return keys, args


class RedisLimiter:
    def __init__(self, url: str, fallback: Limiter) -> None:
        self.link = RedisLink(url, "rate limits")
        self.fallback = fallback
        self._gcra = self.link.script(_GCRA)  # its SHA; (re)loaded when the server does not know it
        self._adjustments: list[LimitRequest] = []
        self._wake = threading.Condition()
        self._closed = False
        self._sender = threading.Thread(target=self._send_adjustments, name="cheapest-limit-adjust", daemon=True)
        self._sender.start()

    def _run(self, mode: str, requests: Sequence[LimitRequest]) -> list[list[int]]:
        keys, args = _args(mode, requests)
        try:
            rows: list[list[int]] = self.link.command("EVALSHA", self._gcra.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:  # a restarted or new Redis: load it, once
            self.link.call(lambda r: r.script_load(_GCRA))
            rows = self.link.command("EVALSHA", self._gcra.sha, len(keys), *keys, *args)
        return rows

    def acquire_all(self, requests: list[LimitRequest], /) -> Sequence[Decision]:
        if any(cost < 0 for _, _, _, cost in requests):
            raise ValueError("cost must be >= 0")
        try:
            return [LimitDecision.of(row) for row in self._run("acquire", requests)]
        except ConnectionError:
            return self.fallback.acquire_all(requests)

    def peek(self, key: str, limit: int, period: float, /) -> Decision:
        try:
            return LimitDecision.of(self._run("peek", [(key, limit, period, 1)])[0])
        except ConnectionError:
            return self.fallback.peek(key, limit, period)

    def adjust(self, key: str, limit: int, period: float, delta: int, /) -> None:
        if delta == 0:
            return
        with self._wake:
            self._adjustments.append((key, limit, period, delta))
            self._wake.notify()

    def flush(self) -> None:
        """Send the queued adjustments now (the background thread does this within milliseconds)."""
        with self._wake:
            batch, self._adjustments = self._adjustments, []
        if not batch:
            return
        try:
            self._run("adjust", batch)
        except ConnectionError:
            for key, limit, period, delta in batch:  # the same correction, where decisions are made meanwhile
                self.fallback.adjust(key, limit, period, delta)

    def _send_adjustments(self) -> None:
        while True:
            with self._wake:
                while not self._adjustments and not self._closed:
                    self._wake.wait()
                if self._closed and not self._adjustments:
                    return
            self.flush()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._sender.join(timeout=5)
        self.link.close()
