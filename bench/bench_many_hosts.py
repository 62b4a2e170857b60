"""The many-hosts backend (PostgreSQL + Redis) against the embedded default (LMDB + the shared-memory limiter), in
the same run on the same box:

1. the gateway: requests/s at 16 connections and p50 at 1 connection (wrk, POST, the instant fixed engine; one
   worker per server; authentication, rate limiting and metering all on), the two servers alternating;
2. one rate-limit decision (a key's rpm and tpm, all or nothing): Redis (one Lua script, loopback) vs the core's
   shared-memory table, median and p99;
3. the write paths a host's traffic drives: Stripe webhook events recorded per second (4 threads, each event
   new) and the time of one usage flush carrying 1,000 requests (a second of traffic at 1,000 req/s).

    python bench/bench_many_hosts.py [--duration 10] [--rounds 3]

Goals (issue 14): >= 0.7x the LMDB gateway's req/s at 16 connections; the write paths holding 1,000 req/s. The
box is shared: the load average is printed with the figures. Under pytest it runs once, briefly, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from backends import PostgresServer, RedisServer  # noqa: E402
from bench_gateway import bench_key, require_wrk, wrk  # noqa: E402
from fixtures_server import start_server  # noqa: E402

PEPPER = "a-pepper-the-benchmark-hosts-share"


def gateway(pg: PostgresServer, redis: RedisServer, duration: float, rounds: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = tmp / "bench.toml"
        cfg.write_text("[plans.bench]\nrpm = 1000000000\ntpm = 1000000000\n")
        common = {"CHEAPEST_CONFIG": str(cfg), "CHEAPEST_USAGE_FLUSH_INTERVAL": "1.0"}
        url = pg.database()
        servers = {
            "lmdb": start_server(tmp / "lmdb", extra_env=common),
            "postgres": start_server(tmp / "postgres", extra_env={
                **common, "CHEAPEST_STORE_URL": url, "CHEAPEST_LIMITER_URL": redis.url,
                "CHEAPEST_KEY_PEPPER": PEPPER}),
        }
        try:
            targets = {}
            for name, server in servers.items():
                sk, _ = bench_key(server)
                target = server.v1 + "/chat/completions"
                targets[name] = (target, sk)
                wrk(target, sk, 4, min(2.0, duration), tmp)  # warm-up
            samples: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _ in range(rounds):
                for name, (target, sk) in targets.items():
                    samples[name].append({**{f"c16_{k}": v for k, v in wrk(target, sk, 16, duration, tmp).items()},
                                          **{f"c1_{k}": v for k, v in wrk(target, sk, 1, duration, tmp).items()}})
            return {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for name, runs in samples.items()}
        finally:
            for server in servers.values():
                server.stop()
            pg.drop(url)


def decisions(redis: RedisServer, n: int = 5000) -> dict[str, dict[str, float]]:
    """One decision awaited alone (a lone request: one round trip), median and p99; and the cost per decision
    when 16 are asked in the same turn of the event loop (16 connections' worth: one script call)."""
    import asyncio

    import cheapest_core

    from cheapest.store.limiter import SharedMemoryLimiter
    from cheapest.store.redis import RedisLimiter

    with tempfile.TemporaryDirectory() as d:
        table = cheapest_core.RateLimiter(str(Path(d) / "rl.bin"), 65536)
        limiters = {"shared_memory": SharedMemoryLimiter(table), "redis": RedisLimiter(redis.url, fallback=table)}
        keys = [f"key_{i}" for i in range(1000)]

        def request(i: int) -> list[tuple[str, int, float, int]]:
            k = keys[i % len(keys)]
            return [("rpm:" + k, 1_000_000, 60.0, 1), ("tpm:" + k, 1_000_000_000, 60.0, 40)]

        async def measure(limiter) -> dict[str, float]:  # type: ignore[no-untyped-def]
            times = []
            for i in range(n + 500):
                t = time.perf_counter()
                await limiter.acquire_all(request(i))
                times.append(time.perf_counter() - t)
            times = sorted(times[500:])  # after a warm-up
            t = time.perf_counter()
            for i in range(n // 16):
                await asyncio.gather(*[limiter.acquire_all(request(i * 16 + j)) for j in range(16)])
            per = (time.perf_counter() - t) / (n // 16 * 16)
            return {"median_us": times[n // 2] * 1e6, "p99_us": times[int(n * 0.99)] * 1e6,
                    "per_decision_16_at_once_us": per * 1e6}

        try:
            return {name: asyncio.run(measure(limiter)) for name, limiter in limiters.items()}
        finally:
            limiters["redis"].close()


def write_paths(pg: PostgresServer, redis: RedisServer) -> dict[str, float]:
    from cheapest.store import AccountRecord, UsageCounter
    from cheapest.store.payments import JournalEntry, PaymentEvent
    from cheapest.store.postgres import PostgresStore
    from cheapest.store.redis import RedisChanges

    url = pg.database()
    store = PostgresStore(url, RedisChanges(redis.url))
    try:
        accounts = [f"acct_{i:04d}" for i in range(100)]
        for a in accounts:
            store.create_account(AccountRecord(id=a, email=f"{a}@example.test", created_at=0, plan="payg"))
        per_thread, threads = 500, 4

        def deliver(t: int) -> None:
            for i in range(per_thread):
                a = accounts[(t * per_thread + i) % len(accounts)]
                store.ledger.record_payment_event(PaymentEvent(
                    f"evt_{t}_{i}_{uuid.uuid4().hex[:8]}", "invoice.paid", int(time.time()), True, a, (),
                    {}, JournalEntry(f"stripe:invoice:{t}_{i}", "stripe_invoice_paid", int(time.time()), 1000)))

        start = time.perf_counter()
        workers = [threading.Thread(target=deliver, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        events_per_s = per_thread * threads / (time.perf_counter() - start)
        # One second of traffic at 1,000 req/s on one worker: 1,000 requests over 200 keys, 2 models, an hour.
        hour = int(time.time()) // 3600 * 3600
        flushes = []
        for _ in range(20):
            deltas = {}
            for i in range(1000):
                k = (f"key_{i % 200:03d}", f"model-{i % 2}", hour)
                c = deltas.setdefault(k, UsageCounter())
                c.add(UsageCounter(1, 30, 60, 9))
            t = time.perf_counter()
            store.add_usage(deltas, {a: 9 * 10 for a in accounts}, flush_id=str(uuid.uuid4()))
            flushes.append(time.perf_counter() - t)
        return {"stripe_events_per_s": events_per_s, "usage_flush_1000_requests_ms": statistics.median(flushes) * 1e3}
    finally:
        store.close()
        pg.drop(url)


def run(duration: float = 10.0, rounds: int = 3) -> dict[str, object]:
    pg, redis = PostgresServer(), RedisServer()
    try:
        load_before = os.getloadavg()
        result: dict[str, object] = {
            "gateway": gateway(pg, redis, duration, rounds),
            "decisions": decisions(redis),
            "write_paths": write_paths(pg, redis),
            "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        }
        return result
    finally:
        pg.close()
        redis.close()


def report(r: dict) -> str:  # type: ignore[type-arg]
    lm, pg = r["gateway"]["lmdb"], r["gateway"]["postgres"]
    ratio = pg["c16_rps"] / lm["c16_rps"]
    added = pg["c1_p50_ms"] - lm["c1_p50_ms"]
    d, w, load = r["decisions"], r["write_paths"], r["load_average"]
    verdict = {True: "MET", False: "NOT MET"}
    return "\n".join([
        f"load average (1 min) {load['before']:.2f} before, {load['after']:.2f} after; shared 2-core box; medians",
        f"gateway, 16 connections: PostgreSQL+Redis {pg['c16_rps']:.0f} vs LMDB {lm['c16_rps']:.0f} req/s -> "
        f"{ratio:.2f}x (goal >= 0.7x: {verdict[ratio >= 0.7]})",
        f"gateway, 1 connection p50: PostgreSQL+Redis {pg['c1_p50_ms']:.3f} vs LMDB {lm['c1_p50_ms']:.3f} ms -> "
        f"{added:.3f} ms added; p99 {pg['c1_p99_ms']:.3f} vs {lm['c1_p99_ms']:.3f} ms",
        f"one rate-limit decision (rpm + tpm, all or nothing), alone: Redis median {d['redis']['median_us']:.1f} us, "
        f"p99 {d['redis']['p99_us']:.1f} us; shared memory median {d['shared_memory']['median_us']:.2f} us, p99 "
        f"{d['shared_memory']['p99_us']:.2f} us; 16 in one turn: Redis "
        f"{d['redis']['per_decision_16_at_once_us']:.1f} us per decision, shared memory "
        f"{d['shared_memory']['per_decision_16_at_once_us']:.2f} us",
        f"Stripe webhook events recorded: {w['stripe_events_per_s']:.0f}/s (goal >= 1,000/s: "
        f"{verdict[w['stripe_events_per_s'] >= 1000]}); one usage flush of 1,000 requests: "
        f"{w['usage_flush_1000_requests_ms']:.1f} ms (holds 1,000 req/s while well under 1,000 ms: "
        f"{verdict[w['usage_flush_1000_requests_ms'] < 1000]})",
        f"non-2xx: PostgreSQL+Redis {int(pg['c16_errors'] + pg['c1_errors'])}, "
        f"LMDB {int(lm['c16_errors'] + lm['c1_errors'])}",
    ])


def test_many_hosts_smoke() -> None:
    require_wrk()
    result = run(duration=1.0, rounds=1)
    print(report(result))
    gateway_runs = result["gateway"]
    assert isinstance(gateway_runs, dict) and gateway_runs["postgres"]["c16_errors"] == 0  # correctness, not timing


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    res = run(a.duration, a.rounds)
    print(json.dumps(res, indent=1))
    print(report(res))
