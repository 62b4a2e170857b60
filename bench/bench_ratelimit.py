"""One rate-limit decision: the core's shared-memory GCRA vs the `limits` package (moving window, memory
storage, one process only) and vs an LMDB write transaction doing the same GCRA step (the design we did not
pick; `sync=False`, so no fsync, still the single-writer lock and a commit per decision).

    make bench   (or: .venv/bin/python -m pytest bench/bench_ratelimit.py --benchmark-enable)

All three see the same call pattern: 1000 keys in turn, limit 1000/minute, so every call is an admission
(the state-changing path) and no key's history grows large. Goal (issue 2): <= 5 us median for the core.
"""

from __future__ import annotations

import itertools
import struct
import time
from pathlib import Path

import lmdb
import pytest
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from cheapest_core import RateLimiter

KEYS = [f"key-{i}" for i in range(1000)]
LIMIT, PERIOD = 1000, 60.0


@pytest.mark.benchmark(group="ratelimit: one decision")
def test_core_shared_gcra(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rl = RateLimiter(tmp_path / "rl", capacity=4096)
    keys = itertools.cycle(KEYS)

    def decide() -> bool:
        return rl.acquire(next(keys), LIMIT, PERIOD).allowed

    assert benchmark(decide)


@pytest.mark.benchmark(group="ratelimit: one decision")
def test_limits_moving_window_memory(benchmark) -> None:  # type: ignore[no-untyped-def]
    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = parse(f"{LIMIT}/minute")
    keys = itertools.cycle(KEYS)

    def decide() -> bool:
        return limiter.hit(item, next(keys))

    assert benchmark(decide)


@pytest.mark.benchmark(group="ratelimit: one decision")
def test_lmdb_write_txn_gcra(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = lmdb.open(str(tmp_path / "lmdb"), map_size=64 << 20, sync=False, metasync=False)
    keys = itertools.cycle([k.encode() for k in KEYS])
    t = int(PERIOD * 1e9) // LIMIT
    tau = t * LIMIT
    pack, unpack = struct.Struct("<Q").pack, struct.Struct("<Q").unpack

    def decide() -> bool:
        key = next(keys)
        now = time.time_ns()
        with env.begin(write=True) as txn:
            raw = txn.get(key)
            tat = max(unpack(raw)[0] if raw else 0, now) + t
            if tat - now > tau:
                return False
            txn.put(key, pack(tat))
            return True

    assert benchmark(decide)
    env.close()
