"""The `Limiter` contract on both limiters - the host's shared-memory table and Redis - with the same tests:
GCRA bursts and refusals, all or nothing over several limits, peek charges nothing, adjustments; and what only
Redis does: one script call per turn of the event loop, and the host's table while Redis is unreachable."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from cheapest_core import RateLimiter

from backends import RedisServer
from cheapest.store.limiter import Limiter, SharedMemoryLimiter
from cheapest.store.redis import RedisLimiter
from fixtures_server import free_port

run = asyncio.run


@pytest.fixture(params=["shared_memory", "redis"])
def limiter(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Limiter]:
    table = RateLimiter(str(tmp_path / "rl.bin"), 1024)
    made: Limiter = SharedMemoryLimiter(table) if request.param == "shared_memory" else \
        RedisLimiter(request.getfixturevalue("redis_url"), fallback=table)
    yield made
    made.close()


def test_a_fresh_key_bursts_its_limit_then_waits_one_interval(limiter: Limiter) -> None:
    async def go() -> None:
        for i in range(6):
            (d,) = await limiter.acquire_all([("k", 6, 60.0, 1)])
            assert d.allowed and d.remaining == 5 - i and d.limit == 6
        (d,) = await limiter.acquire_all([("k", 6, 60.0, 1)])
        assert not d.allowed and d.remaining == 0 and 9.0 < d.retry_after <= 10.0 and 59.0 < d.reset_after <= 60.0
        (never,) = await limiter.acquire_all([("other", 6, 60.0, 7)])  # more than the limit: never
        assert not never.allowed and never.retry_after == math.inf
        assert (await limiter.peek("other", 6, 60.0)).remaining == 6  # and nothing was charged

    run(go())


def test_several_limits_are_all_or_nothing(limiter: Limiter) -> None:
    async def go() -> None:
        rpm, tpm = ("rpm:k", 10, 60.0, 1), ("tpm:k", 100, 60.0, 90)
        assert all(d.allowed for d in await limiter.acquire_all([rpm, tpm]))
        refused = await limiter.acquire_all([rpm, ("tpm:k", 100, 60.0, 20)])
        assert [d.allowed for d in refused] == [False, False]
        assert refused[0].retry_after == 0.0 and refused[1].retry_after > 0  # only tokens lacked room
        assert (await limiter.peek("rpm:k", 10, 60.0)).remaining == 9  # the refused request charged nothing
        limiter.adjust("tpm:k", 100, 60.0, -50)  # 50 tokens were not used after all
        await asyncio.sleep(0)
        assert (await limiter.peek("tpm:k", 100, 60.0)).remaining == 60
        limiter.adjust("tpm:k", 100, 60.0, 60)
        await asyncio.sleep(0)
        assert not (await limiter.peek("tpm:k", 100, 60.0)).allowed

    run(go())


def test_redis_answers_a_turn_of_decisions_with_one_call_exactly(redis_url: str, tmp_path: Path) -> None:
    limiter = RedisLimiter(redis_url, fallback=RateLimiter(str(tmp_path / "rl.bin"), 1024))

    async def go() -> None:
        before = limiter.batches
        decisions = await asyncio.gather(*[limiter.acquire_all([("rpm:hot", 25, 60.0, 1), (f"rpm:k{i % 3}", 1000,
                                                                                         60.0, 1)])
                                           for i in range(40)])
        assert limiter.batches == before + 1
        assert [d[0].allowed for d in decisions] == [True] * 25 + [False] * 15
        assert [d[0].remaining for d in decisions[:25]] == list(range(24, -1, -1))

    try:
        run(go())
    finally:
        limiter.close()


def test_unreachable_redis_falls_back_to_the_hosts_table(tmp_path: Path) -> None:
    table = RateLimiter(str(tmp_path / "rl.bin"), 1024)
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", fallback=table)

    async def go() -> None:
        assert [(await limiter.acquire_all([("k", 2, 60.0, 1)]))[0].allowed for _ in range(3)] == [True, True, False]
        assert table.peek("k", 2, 60.0).remaining == 0  # the host's own table made those decisions

    try:
        run(go())
    finally:
        limiter.close()


def test_redis_restarted_empty_loads_the_script_again(redis_server: RedisServer, tmp_path: Path) -> None:
    limiter = RedisLimiter(redis_server.url, fallback=RateLimiter(str(tmp_path / "rl.bin"), 1024))
    try:
        assert run(limiter.acquire_all([("k", 5, 60.0, 1)]))[0].remaining == 4
        limiter.link.call(lambda r: r.script_flush())
        assert run(limiter.acquire_all([("k", 5, 60.0, 1)]))[0].remaining == 3
    finally:
        limiter.close()


def test_a_forgotten_limit_starts_afresh(limiter: Limiter) -> None:
    async def go() -> None:
        assert all(d.allowed for d in await limiter.acquire_all([("rpm:gone", 2, 60.0, 2), ("rpm:kept", 2, 60.0, 2)]))
        limiter.forget(["rpm:gone"])  # a revoked key: its state and its room go at once
        assert (await limiter.peek("rpm:gone", 2, 60.0)).remaining == 2
        assert (await limiter.peek("rpm:kept", 2, 60.0)).remaining == 0

    run(go())
