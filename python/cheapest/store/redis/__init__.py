"""The hot path for many hosts on Redis (or Valkey): GCRA rate limits (one Lua script per decision, on the
server's clock) and the published change epoch. Everything here can be rebuilt: losing Redis loses no account,
key, payment or usage."""

from cheapest.store.redis.changes import RedisChanges
from cheapest.store.redis.limiter import LimitDecision, RedisLimiter

__all__ = ["LimitDecision", "RedisChanges", "RedisLimiter"]
