"""Metrics overhead: the gateway (auth, rate limiting, metering, log line; the instant fixed engine) with metrics
on vs the same gateway with metrics off (`CHEAPEST_METRICS=0`). Same worker count, one run, load from `wrk`.

    python bench/bench_metrics.py [--duration 10] [--workers 1] [--rounds 5]

Alternates the two servers for --rounds (each round runs both, back to back, the order swapped every round) and
reports the goal, metrics on >= 0.95x metrics off in requests/s at 16 connections, as the median of the rounds'
ratios, marked MET / NOT MET; also the medians of requests/s and of p50 latency at 1 connection. On a busy
shared box the requests/s of one round swing by tens of percent with the background load, so the workers' CPU
time per request (from /proc, during the 16-connection runs) is reported beside it: the server is CPU-bound, so
requests per CPU second is the throughput it would have on a core of its own, and it is steadier; and the same
request path is timed in one process with metrics on and off in interleaved slices (`in_process`), which a busy
box disturbs least of all. The server
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

from bench_gateway import BODY, bench_key, event_loop, require_wrk, start_server, wrk  # noqa: E402
from fixtures_server import on_every_worker  # noqa: E402

GOAL = 0.95
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: set[int]) -> float:
    """User + system CPU the processes have used (all their threads), from /proc."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def loaded(url: str, key: str, connections: int, duration: float, tmp: Path, pids: set[int]) -> dict[str, float]:
    """wrk's figures, and the workers' CPU per request meanwhile (what a busy box disturbs least)."""
    before = cpu_seconds(pids)
    out = wrk(url, key, connections, duration, tmp)
    out["cpu_us"] = (cpu_seconds(pids) - before) / (out["rps"] * max(1, round(duration))) * 1e6
    return out


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
            pids = {name: on_every_worker(server, lambda c: None) for name, server in servers.items()}
            assert httpx.get(servers["off"].base_url + "/metrics").status_code == 404
            for name, server in servers.items():
                wrk(server.v1 + "/chat/completions", keys[name], 4, min(2.0, duration), tmp)  # warm-up
            samples: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
            scrape_bytes = 0
            for i in range(rounds):
                # Alternate which goes first, so neither always follows the other's load.
                for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    url = servers[name].v1 + "/chat/completions"
                    samples[name].append({
                        **{f"c16_{k}": v for k, v in loaded(url, keys[name], 16, duration, tmp, pids[name]).items()},
                        **{f"c1_{k}": v for k, v in wrk(url, keys[name], 1, duration, tmp).items()}})
                scrape = httpx.get(servers["on"].base_url + "/metrics")
                assert scrape.status_code == 200 and "cheapest_requests_total" in scrape.text
                scrape_bytes = len(scrape.content)
            results = {name: {k: statistics.median(s[k] for s in runs) for k in runs[0]}
                       for name, runs in samples.items()}
            # Each round's pair ran back to back under the same background load: their ratios, and the median.
            paired = [a["c16_rps"] / b["c16_rps"] for a, b in zip(samples["on"], samples["off"])]
            results["paired"] = {f"round{i + 1}": x for i, x in enumerate(paired)} | {
                "median": statistics.median(paired)}
            cpu = [b["c16_cpu_us"] / a["c16_cpu_us"] for a, b in zip(samples["on"], samples["off"])]
            results["cpu"] = {f"round{i + 1}": x for i, x in enumerate(cpu)} | {"median": statistics.median(cpu)}
            results["on"]["scrape_bytes"] = float(scrape_bytes)
            results["load"] = dict(zip(("1m", "5m", "15m"), os.getloadavg()))
            return results
        finally:
            for server in servers.values():
                server.stop()


def in_process(rounds: int = 30, per_round: int = 300) -> dict[str, float]:
    """The gateway's Python request path (App.handle and App.log: authentication, admission, the fixed engine, the
    JSON answer, metering, metrics) driven in one process, slices with metrics on and off interleaved, so both see
    the same caches and background load. CPU per request, medians over the rounds, and the median on/off ratio of
    requests per CPU second. Granian's own work is not in it, so the fraction metrics add is, if anything, overstated."""
    import asyncio
    import time

    from cheapest.config import load_settings
    from cheapest.metrics import metrics
    from cheapest.server.application import App
    from cheapest.server.request import Request
    from cheapest.store import accounts
    from cheapest.store.secrets import load_pepper

    body = BODY.encode()

    async def read(limit: int) -> bytes:
        return body

    with tempfile.TemporaryDirectory() as d:
        cfg = Path(d) / "bench.toml"
        cfg.write_text("[plans.bench]\nrpm = 1000000000\ntpm = 1000000000\n")
        settings = load_settings({"CHEAPEST_DATA_DIR": d, "CHEAPEST_CONFIG": str(cfg), "CHEAPEST_REQUEST_LOG": "0",
                                  "CHEAPEST_MODEL_BACKEND": "fixed_engine:load"})
        app = App(settings)
        state = app.open(None)
        account, _ = accounts.create_account(state.store, "bench@example.test", "bench", load_pepper(d))
        _, sk = accounts.create_key(state.store, account.id, "sk", "bench", load_pepper(d))
        headers = {"authorization": f"Bearer {sk}", "content-type": "application/json"}

        async def requests(n: int) -> float:
            started = time.process_time()
            for _ in range(n):
                req = Request("POST", "/v1/chat/completions", "", headers, read)
                resp = await app.handle(req)
                app.log(req, resp.status)
            return (time.process_time() - started) / n * 1e6

        async def main() -> dict[str, list[float]]:
            await requests(per_round)  # warm-up
            cpu: dict[str, list[float]] = {"on": [], "off": []}
            for i in range(rounds):
                for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                    if name == "on":
                        metrics.start(settings)
                        await requests(20)  # the series' children made again after a start
                    cpu[name].append(await requests(per_round))
                    metrics.stop()
            return cpu

        try:
            cpu = asyncio.run(main())
        finally:
            app.close(None)
    ratios = [off / on for on, off in zip(cpu["on"], cpu["off"])]
    return {"on_us": statistics.median(cpu["on"]), "off_us": statistics.median(cpu["off"]),
            "ratio": statistics.median(ratios), "rounds": float(rounds), "per_round": float(per_round)}


def report(r: dict[str, dict[str, float]], workers: int = 1) -> str:
    on, off = r["on"], r["off"]
    ratio, cpu = r["paired"]["median"], r["cpu"]["median"]
    rounds = ", ".join(f"{v:.3f}" for k, v in r["paired"].items() if k != "median")
    cpu_rounds = ", ".join(f"{v:.3f}" for k, v in r["cpu"].items() if k != "median")
    return "\n".join([
        f"{workers} worker(s) per server; event loop {event_loop()}; medians; load average at the end "
        f"{r['load']['1m']:.2f} / {r['load']['5m']:.2f} / {r['load']['15m']:.2f}",
        f"goal (metrics on >= {GOAL}x off at 16 connections): median of each round's on/off ratio {ratio:.3f}x: "
        f"{'MET' if ratio >= GOAL else 'NOT MET'} (rounds {rounds}; medians on {on['c16_rps']:.0f} vs off "
        f"{off['c16_rps']:.0f} req/s = {on['c16_rps'] / off['c16_rps']:.3f}x)",
        f"requests per worker CPU second, on / off: {cpu:.3f}x: {'MET' if cpu >= GOAL else 'NOT MET'} (worker CPU "
        f"per request {on['c16_cpu_us']:.1f} vs {off['c16_cpu_us']:.1f} us, medians; rounds {cpu_rounds})",
        f"1 connection p50: on {on['c1_p50_ms']:.3f} vs off {off['c1_p50_ms']:.3f} ms "
        f"({(on['c1_p50_ms'] - off['c1_p50_ms']) * 1000:+.0f} us)",
        f"non-2xx: on {int(on['c16_errors'] + on['c1_errors'])}, off {int(off['c16_errors'] + off['c1_errors'])}; "
        f"one scrape {int(on['scrape_bytes'])} bytes",
        *([f"in one process, slices interleaved: {p['on_us']:.1f} vs {p['off_us']:.1f} us CPU per request (on / off) "
           f"-> requests per CPU second {p['ratio']:.3f}x: {'MET' if p['ratio'] >= GOAL else 'NOT MET'} "
           f"({int(p['rounds'])} rounds of {int(p['per_round'])})"] if (p := r.get("in_process")) else []),
    ])


def test_metrics_overhead_smoke() -> None:
    require_wrk()
    r = run(duration=1.0, rounds=1)
    r["in_process"] = in_process(rounds=2, per_round=50)
    print(report(r))
    assert r["on"]["c16_errors"] == 0 and r["off"]["c16_errors"] == 0  # correctness only, never timing


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Metrics on vs off, same run (see the module's docstring).")
    for flag, default in (("--duration", 10.0), ("--workers", 1), ("--rounds", 5)):
        ap.add_argument(flag, type=type(default), default=default)
    a = ap.parse_args()
    res = run(a.duration, a.workers, a.rounds)
    res["in_process"] = in_process()
    print(json.dumps(res, indent=1) + "\n" + report(res, a.workers))
