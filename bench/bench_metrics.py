"""Metrics overhead: the gateway (auth, rate limiting, metering, log line; the instant fixed engine) with metrics
on vs the same gateway with metrics off (`CHEAPEST_METRICS=0`). Same worker count, one run, load from `wrk`.

    python bench/bench_metrics.py [--duration 10] [--workers 1] [--rounds 5]

Alternates the two servers for --rounds and reports medians of requests/s at 16 connections and p50 latency at 1
connection, and the goal: metrics on >= 0.95x metrics off at 16 connections, marked MET / NOT MET. The server
with metrics on is scraped once per round, as Prometheus would. Under pytest it runs once, briefly, as a smoke
test (correctness only, never timing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_gateway import bench_key, event_loop, require_wrk, start_server, wrk  # noqa: E402

GOAL = 0.95


def run(duration: float = 10.0, workers: int = 1, rounds: int = 5) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = tmp / "bench.toml"
        cfg.write_text("[plans.bench]\nrpm = 1000000000\ntpm = 1000000000\n")
        env = {"CHEAPEST_CONFIG": str(cfg), "CHEAPEST_USAGE_FLUSH_INTERVAL": "1.0"}
        servers = {"on": start_server(tmp / "on", workers=workers, extra_env=env),
                   "off": start_server(tmp / "off", workers=workers, extra_env={**env, "CHEAPEST_METRICS": "0"})}
        try:
            keys = {name: bench_key(server)[0] for name, server in servers.items()}
            assert httpx.get(servers["off"].base_url + "/metrics").status_code == 404
            for name, server in servers.items():
                wrk(server.v1 + "/chat/completions", keys[name], 4, min(2.0, duration), tmp)  # warm-up
            samples: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            scrape_bytes = 0
            for i in range(rounds):
                # Alternate which goes first, so neither always follows the other's load.
                for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    url = servers[name].v1 + "/chat/completions"
                    samples[name].append({**{f"c16_{k}": v for k, v in wrk(url, keys[name], 16, duration,
                                                                            tmp).items()},
                                          **{f"c1_{k}": v for k, v in wrk(url, keys[name], 1, duration,
                                                                           tmp).items()}})
                scrape = httpx.get(servers["on"].base_url + "/metrics")
                assert scrape.status_code == 200 and "cheapest_requests_total" in scrape.text
                scrape_bytes = len(scrape.content)
            results = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                       for name, runs in samples.items()}
            results["on"]["scrape_bytes"] = float(scrape_bytes)
            results["load"] = dict(zip(("1m", "5m", "15m"), os.getloadavg()))
            return results
        finally:
            for server in servers.values():
                server.stop()


def report(r: dict[str, dict[str, float]], workers: int = 1) -> str:
    on, off = r["on"], r["off"]
    ratio = on["c16_rps"] / off["c16_rps"]
    return "\n".join([
        f"{workers} worker(s) per server; event loop {event_loop()}; medians; load average at the end "
        f"{r['load']['1m']:.2f} / {r['load']['5m']:.2f} / {r['load']['15m']:.2f}",
        f"goal (metrics on >= {GOAL}x off at 16 connections): on {on['c16_rps']:.0f} vs off {off['c16_rps']:.0f} "
        f"req/s -> {ratio:.3f}x: {'MET' if ratio >= GOAL else 'NOT MET'}",
        f"1 connection p50: on {on['c1_p50_ms']:.3f} vs off {off['c1_p50_ms']:.3f} ms "
        f"({(on['c1_p50_ms'] - off['c1_p50_ms']) * 1000:+.0f} us)",
        f"non-2xx: on {int(on['c16_errors'] + on['c1_errors'])}, off {int(off['c16_errors'] + off['c1_errors'])}; "
        f"one scrape {int(on['scrape_bytes'])} bytes",
    ])


def test_metrics_overhead_smoke() -> None:
    require_wrk()
    r = run(duration=1.0, rounds=1)
    print(report(r))
    assert r["on"]["c16_errors"] == 0 and r["off"]["c16_errors"] == 0  # correctness only, never timing


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Metrics on vs off, same run (see the module's docstring).")
    for flag, default in (("--duration", 10.0), ("--workers", 1), ("--rounds", 5)):
        ap.add_argument(flag, type=type(default), default=default)
    a = ap.parse_args()
    res = run(a.duration, a.workers, a.rounds)
    print(json.dumps(res, indent=1) + "\n" + report(res, a.workers))
