"""GCRA rate limiting over a shared memory-mapped table (cheapest_core, ratelimit.rs)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cheapest_core import RateDecision, RateLimiter, RateLimiterError
from processes import in_processes

BASE = 1_000_000.0  # a fixed "now", in seconds; exactly representable in ns
NS = 1_000_000_000


@pytest.fixture
def table(tmp_path: Path) -> RateLimiter:
    return RateLimiter(tmp_path / "rl", capacity=1024)


def interval_ns(limit: int, period: float) -> int:
    """T = ceil(period / limit) in ns, the emission interval the core uses."""
    return -(-round(period * NS) // limit)


class Model:
    """GCRA written from the definition, in integer ns, to compare the core against."""

    def __init__(self) -> None:
        self.tat: dict[str, int] = {}

    def acquire(self, key: str, limit: int, period: float, cost: int, now: int) -> tuple[bool, int, float]:
        t = interval_ns(limit, period)
        tau = t * limit
        tat = self.tat.get(key, 0)
        if cost > limit:
            return False, min(limit, max(0, now + tau - tat) // t), math.inf
        new = max(tat, now) + cost * t
        if new - now <= tau:
            self.tat[key] = new
            return True, min(limit, (now + tau - new) // t), 0.0
        return False, min(limit, max(0, now + tau - tat) // t), (new - tau - now) / NS


def test_fresh_key_spends_the_burst_then_one_per_interval(table: RateLimiter) -> None:
    decisions = [table.acquire("k", 10, 60.0, now=BASE) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    refused = decisions[-1]
    assert isinstance(refused, RateDecision)
    assert (refused.limit, refused.retry_after, refused.reset_after) == (10, 6.0, 60.0)
    assert decisions[0].retry_after == 0.0
    assert not table.acquire("k", 10, 60.0, now=BASE + 5.999).allowed
    assert table.acquire("k", 10, 60.0, now=BASE + 6.0).allowed
    assert table.peek("k", 10, 60.0, now=BASE + 66.0).remaining == 10
    assert "allowed=True" in repr(decisions[0])


def test_cost_above_limit_and_zero_limit_are_never_allowed(table: RateLimiter) -> None:
    d = table.acquire("k", 5, 1.0, cost=6, now=BASE)
    assert (d.allowed, d.remaining, d.retry_after) == (False, 5, math.inf)
    d = table.acquire("k", 0, 1.0, now=BASE)
    assert (d.allowed, d.remaining, d.retry_after) == (False, 0, math.inf)
    assert table.acquire("k", 5, 1.0, cost=5, now=BASE).allowed


def test_bad_arguments_are_value_errors(table: RateLimiter) -> None:
    for kwargs in [
        {"limit": -1},
        {"limit": 5, "period": 0.0},
        {"limit": 5, "period": -1.0},
        {"limit": 5, "period": math.nan},
        {"limit": 5, "cost": -1},
        {"limit": 5, "now": math.inf},
        {"limit": 5, "now": -5.0},
    ]:
        with pytest.raises(ValueError):
            table.acquire("k", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        RateLimiter(str(Path(table.path).with_name("zero")), capacity=0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(1, 50),
    period=st.sampled_from([0.001, 1.0, 2.5, 60.0, 3600.0]),
    steps=st.lists(st.tuples(st.integers(0, 5 * NS), st.integers(0, 60)), min_size=1, max_size=80),
)
def test_matches_the_gcra_definition(tmp_path: Path, limit: int, period: float, steps: list[tuple[int, int]]) -> None:
    rl = RateLimiter(tmp_path / f"m{os.getpid()}-{time.monotonic_ns()}", capacity=8)
    model = Model()
    now = round(BASE * NS)
    for dt, cost in steps:
        now += dt % (round(period * NS) * 2 + 1)
        got = rl.acquire("k", limit, period, cost=cost, now=now / NS)
        allowed, remaining, retry = model.acquire("k", limit, period, cost, now)
        assert (got.allowed, got.remaining) == (allowed, remaining)
        assert got.retry_after == pytest.approx(retry, abs=1e-9)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limit=st.integers(1, 30),
    costs=st.lists(st.integers(1, 5), min_size=1, max_size=150),
    gaps_ms=st.lists(st.integers(0, 400), min_size=150, max_size=150),
)
def test_no_interval_admits_more_than_burst_plus_refill(
    tmp_path: Path, limit: int, costs: list[int], gaps_ms: list[int]
) -> None:
    period = 1.0
    t = interval_ns(limit, period)
    rl = RateLimiter(tmp_path / f"w{time.monotonic_ns()}", capacity=8)
    now = round(BASE * NS)
    admitted: list[tuple[int, int]] = []
    for cost, gap in zip(costs, gaps_ms):
        now += gap * 1_000_000
        if rl.acquire("k", limit, period, cost=cost, now=now / NS).allowed:
            admitted.append((now, cost))
    for i in range(len(admitted)):
        spent = 0
        for j in range(i, len(admitted)):
            spent += admitted[j][1]
            assert spent <= limit + (admitted[j][0] - admitted[i][0]) // t


def test_retry_after_is_exactly_when_the_request_fits(table: RateLimiter) -> None:
    assert table.acquire("k", 4, 2.0, cost=4, now=BASE).allowed
    refused = table.acquire("k", 4, 2.0, cost=3, now=BASE + 0.25)
    assert not refused.allowed and refused.retry_after == pytest.approx(1.25)
    assert not table.acquire("k", 4, 2.0, cost=3, now=BASE + 0.25 + refused.retry_after - 1e-6).allowed
    assert table.acquire("k", 4, 2.0, cost=3, now=BASE + 0.25 + refused.retry_after).allowed


def test_peek_changes_nothing(table: RateLimiter) -> None:
    assert table.peek("new", 3, 1.0, now=BASE).remaining == 3
    table.acquire("k", 3, 1.0, cost=3, now=BASE)
    for _ in range(3):
        d = table.peek("k", 3, 1.0, now=BASE)
        # T = ceil(1e9 / 3) ns, so a full bucket takes 3 ns more than a second.
        assert (d.allowed, d.remaining, d.retry_after, d.reset_after) == (False, 0, pytest.approx(1 / 3), 1.000000002)


def test_adjust_charges_without_refusal_and_refunds_down_to_now(table: RateLimiter) -> None:
    table.acquire("tpm", 1000, 60.0, cost=400, now=BASE)  # the estimate
    table.adjust("tpm", 1000, 60.0, delta=-150, now=BASE)  # the real count was lower
    assert table.peek("tpm", 1000, 60.0, now=BASE).remaining == 750
    table.adjust("tpm", 1000, 60.0, delta=-10_000, now=BASE)
    assert table.peek("tpm", 1000, 60.0, now=BASE).remaining == 1000  # not more than the limit
    table.adjust("tpm", 1000, 60.0, delta=1500, now=BASE)  # overspent: in debt, no refusal
    d = table.peek("tpm", 1000, 60.0, now=BASE)
    assert (d.allowed, d.remaining) == (False, 0)
    assert d.retry_after == pytest.approx(30.06)
    assert d.reset_after == pytest.approx(90.0)
    table.adjust("unknown", 10, 60.0, delta=-5, now=BASE)  # refunding nothing is a no-op
    table.reset("tpm")
    assert table.peek("tpm", 1000, 60.0, now=BASE).remaining == 1000


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    limits=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 25)), min_size=1, max_size=4),
    spent=st.lists(st.integers(0, 20), min_size=4, max_size=4),
)
def test_acquire_all_is_all_or_nothing(
    tmp_path: Path, limits: list[tuple[int, int]], spent: list[int]
) -> None:
    rl = RateLimiter(tmp_path / f"a{time.monotonic_ns()}", capacity=16)
    keys = [f"key{i}" for i in range(len(limits))]
    for key, (limit, _), pre in zip(keys, limits, spent):
        if limit:
            rl.acquire(key, limit, 10.0, cost=min(pre, limit), now=BASE)
    before = [rl.peek(k, max(limit, 1), 10.0, now=BASE).remaining for k, (limit, _) in zip(keys, limits)]
    fits = [rl.peek(k, limit, 10.0, now=BASE).remaining >= cost for k, (limit, cost) in zip(keys, limits)]
    fits = [f and cost <= limit for f, (limit, cost) in zip(fits, limits)]
    ds = rl.acquire_all([(k, limit, 10.0, cost) for k, (limit, cost) in zip(keys, limits)], now=BASE)
    after = [rl.peek(k, max(limit, 1), 10.0, now=BASE).remaining for k, (limit, _) in zip(keys, limits)]
    if all(fits):
        assert all(d.allowed for d in ds)
        assert after == [b - c if lim else b for b, (lim, c) in zip(before, limits)]
    else:
        assert not any(d.allowed for d in ds)
        assert after == before
        assert max(d.retry_after for d in ds) > 0


def test_full_table_and_mismatched_or_foreign_files_are_errors(tmp_path: Path) -> None:
    rl = RateLimiter(tmp_path / "small", capacity=3)
    for k in "abc":
        rl.acquire(k, 1, 1.0, now=BASE)
    with pytest.raises(RateLimiterError) as err:
        rl.acquire("d", 1, 1.0, now=BASE)
    assert isinstance(err.value, OSError) and "full" in str(err.value)
    assert rl.peek("d", 1, 1.0, now=BASE).allowed  # looking is not claiming
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "small", capacity=4)
    (tmp_path / "junk").write_bytes(b"not a table" * 100)
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "junk")
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "no-such-dir" / "rl")
    default = RateLimiter(str(tmp_path / "default"))
    assert default.capacity == 65536 and default.path == str(tmp_path / "default")
    assert (tmp_path / "default").stat().st_size == 64 + 16 * 65536
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "junk", "small"]  # no temp files left


# --- several processes -------------------------------------------------------


def _spend_at(start: Callable[[], None], path: str, limit: int, tries: int, now: float) -> int:
    start()
    rl = RateLimiter(path, capacity=256)  # all open (and race to create) together
    return sum(rl.acquire("shared", limit, 60.0, now=now).allowed for _ in range(tries))


def _hammer(start: Callable[[], None], path: str, limit: int, period: float,
            seconds: float) -> tuple[list[float], int]:
    rl = RateLimiter(path, capacity=256)
    start()
    admitted, tries = [], 0
    end = time.time() + seconds
    while (now := time.time()) < end:
        tries += 1
        if rl.acquire("shared", limit, period, now=now).allowed:
            admitted.append(now)
    return admitted, tries


def _acquire_once(path: str) -> tuple[bool, int]:
    d = RateLimiter(path, capacity=256).acquire("seen", 2, 60.0, now=BASE)
    return d.allowed, d.remaining


def over_admitted(times: np.ndarray, limit: int, t: float) -> bool:
    """Whether some interval [t_i, t_j] of sorted admission times holds more than limit + (t_j - t_i) / T.
    (float seconds carry ~0.1 us of rounding; 1e-6 s of slack covers it.)"""
    span = times[None, :] - times[:, None]
    count = np.arange(len(times))[None, :] - np.arange(len(times))[:, None] + 1
    upper = np.triu(np.ones_like(span, dtype=bool))
    return bool(np.any(count[upper] > limit + np.floor((span[upper] + 1e-6) / t)))


def test_four_processes_at_one_instant_admit_exactly_the_limit(tmp_path: Path) -> None:
    path = str(tmp_path / "created-by-the-race")
    counts = in_processes(_spend_at, path, 300, 400, BASE, n=4)  # spawned, as Granian workers are processes
    assert sum(counts) == 300, counts
    assert sorted(p.name for p in tmp_path.iterdir()) == ["created-by-the-race"]


def test_four_processes_on_the_real_clock_never_exceed_burst_plus_refill(tmp_path: Path) -> None:
    limit, period = 100, 0.5
    t = interval_ns(limit, period) / NS
    parts = in_processes(_hammer, str(tmp_path / "rl"), limit, period, 1.5, n=4)
    times = np.sort(np.concatenate([np.array(admitted, dtype=np.float64) for admitted, _ in parts]))
    # Far more tries than admissions, so the limit, not the load, decided;
    # and more than the burst was admitted, so the refill was exercised too.
    assert sum(tries for _, tries in parts) > 4 * len(times)
    assert len(times) > limit
    assert not over_admitted(times, limit, t)
    # The check has teeth: the same admissions break a limit half as large.
    assert over_admitted(times, limit // 2, interval_ns(limit // 2, period) / NS)
    # Hence also: no sliding window of one period holds more than 2 * limit - 1.
    starts = np.searchsorted(times, times - period, side="right")
    assert int(np.max(np.arange(len(times)) - starts + 1)) <= 2 * limit - 1


def test_another_process_sees_the_state(tmp_path: Path) -> None:
    path = str(tmp_path / "rl")
    rl = RateLimiter(path, capacity=256)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        assert pool.apply(_acquire_once, (path,)) == (True, 1)
        assert rl.peek("seen", 2, 60.0, now=BASE).remaining == 1
        assert rl.acquire("seen", 2, 60.0, now=BASE).allowed
        assert pool.apply(_acquire_once, (path,)) == (False, 0)
    reopened = RateLimiter(path, capacity=256)
    assert reopened.peek("seen", 2, 60.0, now=BASE).remaining == 0
