"""The change epoch published in Redis, heard by every worker of every host through pub/sub.

PostgreSQL bumps the epoch inside every transaction that changes a key or an account; the writer then raises the
published value to it and announces it on a channel, in one script (a late or repeated publish never moves it
back). Each worker keeps a subscription open in a thread and holds the latest value in memory, so a request
reads the epoch without any I/O.

Why pub/sub rather than a GET per request: a GET is a round trip on every request (bench_many_hosts.py measures
both); the announcement reaches a subscribed worker's socket before the writer's own request has answered, and
the listening thread takes it in well under a millisecond on an idle worker - in practice the next request, not
guaranteed under load. What keeps it safe when the subscription is not there: a worker that is not subscribed
(Redis unreachable, or the subscription just restarted) has no value, and `current()` then asks Redis (a GET),
and if Redis cannot answer, the store reads PostgreSQL (exact). The listening thread also compares with Redis
every second, so a lost announcement costs at most that, and retries a publish of its own that failed (the
writer could not reach Redis) until it lands. A Redis restarted empty has no value: the next reader takes
PostgreSQL's and publishes it.
"""

from __future__ import annotations

import logging
import threading

import redis

from cheapest.store.redis.link import RETRY_AFTER, RedisLink

log = logging.getLogger("cheapest.store")

EPOCH_KEY = "cheapest:epoch"
CHANNEL = "cheapest:epoch"
CHECK_EVERY = 1.0  # seconds without an announcement after which the listener compares with Redis
_RAISE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '-1')
local new = tonumber(ARGV[1])
if new > current then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[1])
  return new
end
return current
"""


class RedisChanges:
    def __init__(self, url: str, listen: bool = True) -> None:
        self.link = RedisLink(url, "change epoch")
        self._raise = self.link.script(_RAISE)
        self._heard: int | None = None  # the epoch as last heard; None while not subscribed
        self._unpublished: int | None = None  # an epoch of this worker's whose publish failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if listen:
            self._thread = threading.Thread(target=self._listen, name="cheapest-epoch-listener", daemon=True)
            self._thread.start()

    def current(self) -> int | None:
        heard = self._heard
        if heard is not None:
            return heard
        raw = self.link.command("GET", EPOCH_KEY)
        return None if raw is None else int(raw)

    def publish(self, epoch: int) -> None:
        try:
            value = int(self.link.call(lambda r: self._raise(keys=[EPOCH_KEY], args=[epoch, CHANNEL], client=r)))
        except ConnectionError:  # logged by the link; the listener retries it
            self._unpublished = max(epoch, self._unpublished or 0)
            return
        if self._unpublished is not None and self._unpublished <= epoch:
            self._unpublished = None
        heard = self._heard
        if heard is not None and value > heard:  # this worker's own change, at once
            self._heard = value

    def _hear(self, value: int) -> None:
        """Called by the listener only: a subscribed worker's value (only ever raised)."""
        heard = self._heard
        self._heard = value if heard is None else max(heard, value)

    def _listen(self) -> None:
        while not self._stop.is_set():
            pubsub = self.link.client.pubsub()
            try:
                pubsub.subscribe(CHANNEL)
                while True:  # until Redis confirms: from then on, nothing announced can be missed
                    message = pubsub.get_message(timeout=RETRY_AFTER)
                    if message is not None and message["type"] == "subscribe":
                        break
                raw = self.link.client.get(EPOCH_KEY)
                if raw is not None:
                    self._hear(int(raw))
                if self._unpublished is not None:
                    self.publish(self._unpublished)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=CHECK_EVERY)
                    if message is not None:
                        if message["type"] == "message":
                            self._hear(int(message["data"]))
                        continue
                    if self._unpublished is not None:
                        self.publish(self._unpublished)
                    raw = self.link.client.get(EPOCH_KEY)
                    if raw is None:
                        self._heard = None  # Redis lost it: readers ask, and the first one publishes it again
                    else:
                        self._hear(int(raw))
            except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as exc:
                if self._heard is not None:
                    log.warning("epoch subscription lost (%s); reading it per request until it is back",
                                type(exc).__name__)
                self._heard = None
                self._stop.wait(RETRY_AFTER)
            finally:
                pubsub.close()

    def close(self) -> None:
        self._stop.set()
        self._heard = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.link.close()
