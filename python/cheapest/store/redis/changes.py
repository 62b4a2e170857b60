"""The change epoch published in Redis: hosts read it per request (one GET) to know whether their cached keys
and accounts are still current.

PostgreSQL bumps the epoch inside every transaction that changes a key or an account; the writer then raises the
published value to it (`publish`, a compare-and-raise script, so a late or repeated publish never moves it back).
A Redis restarted empty has no value: the next reader takes PostgreSQL's and publishes it. A publish that failed
(Redis unreachable from the writer alone) leaves hosts on their caches until a later change is published or
their cache entries age out (auth's CACHE_TTL); while Redis is unreachable from a host, that host reads the epoch
from PostgreSQL on every request instead (exact).
"""

from __future__ import annotations

from cheapest.store.redis.link import RedisLink

EPOCH_KEY = "cheapest:epoch"
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > current then redis.call('SET', KEYS[1], ARGV[1]) return new end
return current
"""


class RedisChanges:
    def __init__(self, url: str) -> None:
        self.link = RedisLink(url, "change epoch")
        self._raise = self.link.script(_RAISE)

    def current(self) -> int | None:
        raw = self.link.call(lambda r: r.get(EPOCH_KEY))
        return None if raw is None else int(raw)

    def publish(self, epoch: int) -> None:
        try:
            self.link.call(lambda r: self._raise(keys=[EPOCH_KEY], args=[epoch], client=r))
        except ConnectionError:
            pass  # logged by the link; readers fall back to PostgreSQL while they cannot reach Redis

    def close(self) -> None:
        self.link.close()
