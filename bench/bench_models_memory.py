"""Resident memory of several models in one worker vs each in a worker of its own.

    python bench/bench_models_memory.py [--models SmolLM2-135M-Instruct,gemma-3-270m] [--threads 2]

Each configuration runs in a fresh process, which loads its models the way a worker does (the ONNX engine, one
scheduler per model; `shared_arena` when there are several, as the server does), runs one greedy request with a
~500-token prompt and 16 new tokens on each model (so every arena holds its prefill peak), hands freed heap back
(malloc_trim, as the server does after loading) and reports its resident set size (VmRSS). The peer is the same
models each in a process of its own: "apart" is the sum of those processes; "together" must stay below it.
Also measured: several models in one process without the shared arena (each session's own arena).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FILLER = ("The history of the region is long and varied. Farmers grew wheat and barley in the valleys, "
          "traders brought salt and cloth along the river. ")


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def worker(dirs: list[str], threads: int, shared_arena: bool) -> dict[str, float]:
    from cheapest.engine.onnx_engine import load_engine
    from cheapest.engine.registry import release_free_heap
    from cheapest.engine.types import SamplingParams

    base = _rss_mib()
    engines = [load_engine(d, threads=threads, shared_arena=shared_arena) for d in dirs]
    release_free_heap()
    loaded = _rss_mib()

    async def run() -> None:
        for engine in engines:
            ids = engine.encode(FILLER * 20, special_tokens=True)[:500]
            async for _ in engine.generate(ids, SamplingParams(max_tokens=16, temperature=0.0)):
                pass

    asyncio.run(run())
    for engine in engines:
        asyncio.run(engine.close())
    release_free_heap()
    return {"base_mib": base, "loaded_mib": loaded, "after_requests_mib": _rss_mib()}


def _measure(dirs: list[str], threads: int, shared_arena: bool) -> dict[str, float]:
    payload = json.dumps({"dirs": dirs, "threads": threads, "shared_arena": shared_arena})
    proc = subprocess.run([sys.executable, __file__, "--worker"], input=payload, capture_output=True, text=True,
                          check=True, env={"PYTHONPATH": str(REPO / "python"), "PATH": "/usr/bin:/bin"})
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="SmolLM2-135M-Instruct,gemma-3-270m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        job = json.loads(sys.stdin.read())
        print(json.dumps(worker(job["dirs"], job["threads"], job["shared_arena"])))
        return

    sys.path.insert(0, str(REPO / "python"))
    from cheapest.config import load_settings

    settings = load_settings()
    dirs = [str(settings.models_path / name) for name in args.models.split(",")]
    apart = {Path(d).name: _measure([d], args.threads, False) for d in dirs}
    together = _measure(dirs, args.threads, True)
    unshared = _measure(dirs, args.threads, False)
    for name, m in apart.items():
        print(f"{name:>24} alone: process {m['after_requests_mib']:7.1f} MiB (interpreter and libraries "
              f"{m['base_mib']:.1f}, loaded {m['loaded_mib']:.1f})")
    total_apart = sum(m["after_requests_mib"] for m in apart.values())
    print(f"{'apart, summed':>24}: {total_apart:7.1f} MiB in {len(apart)} processes")
    print(f"{'together':>24}: {together['after_requests_mib']:7.1f} MiB in one process, shared arena "
          f"(loaded {together['loaded_mib']:.1f}) = {together['after_requests_mib'] / total_apart:.2f}x apart")
    print(f"{'together, own arenas':>24}: {unshared['after_requests_mib']:7.1f} MiB "
          f"= {unshared['after_requests_mib'] / total_apart:.2f}x apart")


if __name__ == "__main__":
    main()
