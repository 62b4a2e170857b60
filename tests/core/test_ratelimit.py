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

from cheapest_core import RateDecision, RateLimiter, RateLimiterError, RateLimiterFull
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
    assert table.forget("tpm")
    assert not table.forget("tpm")
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
    with pytest.raises(RateLimiterFull) as err:
        rl.acquire("d", 1, 1.0, now=BASE)
    assert isinstance(err.value, RateLimiterError) and isinstance(err.value, OSError)
    assert "full" in str(err.value) and "d" not in str(err.value).replace("holds", "")
    with pytest.raises(RateLimiterFull):
        rl.acquire_all([("a", 1, 1.0, 0), ("d", 1, 1.0, 1)], now=BASE)
    assert rl.peek("d", 1, 1.0, now=BASE).allowed  # looking is not claiming
    assert rl.peek("a", 1, 1.0, now=BASE).remaining == 0  # and a full table charged nothing
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "small", capacity=4)
    (tmp_path / "junk").write_bytes(b"not a table" * 100)
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "junk")
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(RateLimiterError):
        RateLimiter(tmp_path / "file" / "rl")  # its directory cannot be made
    default = RateLimiter(str(tmp_path / "default"))
    assert default.capacity == 65536 and default.path == str(tmp_path / "default")
    assert (tmp_path / "default").stat().st_size == 64 + 16 * 65536
    assert sorted(p.name for p in tmp_path.iterdir()) == ["default", "file", "junk", "small"]  # no temp files left


def test_a_table_of_the_previous_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    header = b"CHPGCRA1" + (1).to_bytes(4, "little") + (16).to_bytes(4, "little") + (4).to_bytes(8, "little")
    (tmp_path / "v1").write_bytes(header.ljust(64, b"\0") + bytes(16 * 4))
    with pytest.raises(RateLimiterError, match="version 1, this build reads 2.*remove it"):
        RateLimiter(tmp_path / "v1", capacity=4)


def test_the_table_and_its_directories_are_owner_only_from_creation(tmp_path: Path) -> None:
    old = os.umask(0)  # so that the modes can only come from the core
    try:
        RateLimiter(tmp_path / "new" / "deeper" / "rl", capacity=8)
    finally:
        os.umask(old)
    assert (tmp_path / "new" / "deeper" / "rl").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "new" / "deeper").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert os.listdir(tmp_path / "new" / "deeper") == ["rl"]


# --- reclaiming slots ----------------------------------------------------------


def test_forget_frees_a_slot_at_once(tmp_path: Path) -> None:
    rl = RateLimiter(tmp_path / "rl", capacity=4)
    for k in "abcd":
        assert rl.acquire(k, 5, 60.0, cost=5, now=BASE).allowed
    with pytest.raises(RateLimiterFull):
        rl.acquire("e", 5, 60.0, now=BASE)
    assert rl.occupancy(now=BASE) == (4, 0)
    assert rl.forget("b") and not rl.forget("b") and not rl.forget("never-seen")
    assert rl.acquire("e", 5, 60.0, now=BASE).remaining == 4
    for k in "acd":  # the others kept their state
        assert not rl.acquire(k, 5, 60.0, now=BASE).allowed


def test_a_slot_idle_past_its_refill_serves_another_key(tmp_path: Path) -> None:
    rl = RateLimiter(tmp_path / "rl", capacity=4)
    assert rl.reclaim_after == 10.0
    for k in "abcd":
        assert rl.acquire(k, 2, 1.0, cost=2, now=BASE).allowed  # TAT: BASE + 1 s
    with pytest.raises(RateLimiterFull):
        rl.acquire("e", 2, 1.0, now=BASE + 1.0 + rl.reclaim_after - 0.001)
    assert rl.occupancy(now=BASE + 1.0 + rl.reclaim_after) == (4, 4)
    later = BASE + 1.0 + rl.reclaim_after
    for k in "efgh":
        assert rl.acquire(k, 2, 1.0, cost=2, now=later).allowed
    assert rl.occupancy(now=later) == (4, 0)
    # "a" lost its slot, which only says that it is fresh, as it was anyway.
    assert rl.acquire("a", 2, 1.0, cost=2, now=later + 1.0 + rl.reclaim_after).allowed


class SlotModel(Model):
    """The GCRA model plus which keys hold a live slot of the table."""

    def is_live(self, key: str, now: int, reclaim_ns: int) -> bool:
        return key in self.tat and self.tat[key] + reclaim_ns > now

    def live(self, now: int, reclaim_ns: int) -> int:
        return sum(1 for key in self.tat if self.is_live(key, now, reclaim_ns))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 3 * NS), st.integers(0, 3), st.booleans()),
        min_size=20,
        max_size=200,
    ),
)
def test_a_small_table_decides_like_unbounded_memory(tmp_path: Path, steps: list[tuple[int, int, int, bool]]) -> None:
    """Keys come and go through 8 slots: every decision is the GCRA definition's (a slot given away
    was stale, the same as fresh), and the table is full exactly when 8 other keys hold live limits."""
    rl = RateLimiter(tmp_path / f"s{time.monotonic_ns()}", capacity=8)
    reclaim_ns = round(rl.reclaim_after * NS)
    model = SlotModel()
    now = round(BASE * NS)
    for i, (key_no, dt, cost, forget) in enumerate(steps):
        now += dt
        key = f"key-{(i // 4) + key_no % 6}"  # a window of keys that moves on
        if forget:
            freed = rl.forget(key)
            if model.is_live(key, now, reclaim_ns) or key not in model.tat:
                assert freed == (key in model.tat)  # else stale: its slot may have been given away
            model.tat.pop(key, None)
        elif not model.is_live(key, now, reclaim_ns) and model.live(now, reclaim_ns) >= 8:
            with pytest.raises(RateLimiterFull):
                rl.acquire(key, 3, 1.0, cost=cost, now=now / NS)
        else:
            got = rl.acquire(key, 3, 1.0, cost=cost, now=now / NS)
            allowed, remaining, _ = model.acquire(key, 3, 1.0, cost, now)
            assert (got.allowed, got.remaining) == (allowed, remaining)
    assert rl.occupancy(now / NS)[0] - rl.occupancy(now / NS)[1] == model.live(now, reclaim_ns)


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


# Churn: four processes, 16 slots, keys that come and go in phases on a clock running 20x fast.
CHURN_SCALE, CHURN_PHASE, CHURN_KEYS, CHURN_LIMIT, CHURN_SECONDS = 20.0, 12.0, 4, 5, 3.5


def _churn(start: Callable[[], None], path: str, t0: float) -> tuple[list[tuple[str, float]], int, int]:
    rl = RateLimiter(path, capacity=16)
    start()
    end = time.time() + CHURN_SECONDS
    admitted: list[tuple[str, float]] = []
    full = tries = 0
    rng = np.random.default_rng(os.getpid())
    while (real := time.time()) < end:
        now = BASE + (real - t0) * CHURN_SCALE
        # The phase's keys; a phase's keys go stale before the next phase ends.
        key = f"key-{int((now - BASE) // CHURN_PHASE) * CHURN_KEYS + int(rng.integers(CHURN_KEYS))}"
        tries += 1
        try:
            if rl.acquire(key, CHURN_LIMIT, 1.0, now=now).allowed:
                admitted.append((key, now))
        except RateLimiterFull:
            full += 1
    return admitted, tries, full


def test_processes_churning_keys_through_a_small_table_never_over_admit(tmp_path: Path) -> None:
    path = str(tmp_path / "rl")
    RateLimiter(path, capacity=16)
    parts = in_processes(_churn, path, time.time(), n=4)
    by_key: dict[str, list[float]] = {}
    for admitted, _, _ in parts:
        for key, now in admitted:
            by_key.setdefault(key, []).append(now)
    assert sum(full for _, _, full in parts) == 0
    assert sum(tries for _, tries, _ in parts) > 4 * sum(len(t) for t in by_key.values())
    # More keys than slots went through, so slots were reclaimed, across processes.
    assert len(by_key) > 16
    t = interval_ns(CHURN_LIMIT, 1.0) / NS
    for key, times in by_key.items():
        assert not over_admitted(np.sort(np.array(times)), CHURN_LIMIT, t), key
    # The check has teeth: the same admissions break a limit half as large.
    half = CHURN_LIMIT // 2
    assert any(over_admitted(np.sort(np.array(ts)), half, interval_ns(half, 1.0) / NS) for ts in by_key.values())
    used, stale = RateLimiter(path, capacity=16).occupancy(BASE + 1e6)
    assert used == stale and used <= 16


def _fill(path: str, keys: list[str]) -> None:
    rl = RateLimiter(path, capacity=4)
    for key in keys:
        assert rl.acquire(key, 1, 3600.0, now=BASE).allowed


def test_a_table_filled_by_one_process_is_full_for_another_until_a_key_is_forgotten(tmp_path: Path) -> None:
    path = str(tmp_path / "rl")
    with mp.get_context("spawn").Pool(1) as pool:
        pool.apply(_fill, (path, ["a", "b", "c", "d"]))
    rl = RateLimiter(path, capacity=4)
    with pytest.raises(RateLimiterFull):
        rl.acquire("e", 1, 3600.0, now=BASE + 60.0)
    assert rl.forget("c")
    assert rl.acquire("e", 1, 3600.0, now=BASE + 60.0).allowed
    assert not rl.acquire("a", 1, 3600.0, now=BASE + 60.0).allowed
