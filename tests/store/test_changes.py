"""The change epoch through Redis: a worker hears another's change without asking; while it is not subscribed
it asks (and the store then asks PostgreSQL); a publish that failed lands once Redis is back."""

from __future__ import annotations

import time

import pytest

from backends import RedisServer
from cheapest.store.redis import RedisChanges
from cheapest.store.redis.changes import EPOCH_KEY


def _until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_workers_hear_changes_and_a_failed_publish_lands_later(redis_server: RedisServer) -> None:
    redis_server.flush()
    writer, reader = RedisChanges(redis_server.url), RedisChanges(redis_server.url)
    try:
        assert reader.current() is None  # nothing published yet: the store reads PostgreSQL and publishes it
        writer.publish(7)
        _until(lambda: reader._heard == 7)  # heard through the subscription, no request needed
        writer.publish(5)  # late or repeated publishes never move it back
        assert writer.current() == reader.current() == 7
        redis_server.stop()
        _until(lambda: reader._heard is None)  # not subscribed: no value held, so readers ask
        with pytest.raises(ConnectionError):
            reader.current()
        writer.publish(9)  # fails: kept, retried by the listener
        redis_server.start()
        _until(lambda: reader._heard == 9, timeout=10.0)  # subscribed again, and the kept publish landed
        assert int(reader.link.client.get(EPOCH_KEY)) == 9
    finally:
        if redis_server.proc is None:
            redis_server.start()
        writer.close()
        reader.close()
