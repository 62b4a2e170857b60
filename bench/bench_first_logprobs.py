"""A worker's first logprobs request: each token's bytes from the core tokenizer against llguidance's view of the
vocabulary (what the engine used before `Tokenizer.token_bytes`), each in a fresh process, taking turns.

    CHEAPEST_DATA_DIR=$PWD/.data .venv/bin/python bench/bench_first_logprobs.py \\
        [--model-dir .data/models/gemma-3-270m] [--rounds 3]

One engine per process answers a warm-up request (no logprobs), then one request with logprobs=5; the figures are
that request's wall time and the growth of the resident set across it (after `malloc_trim`), medians over the
rounds, and their ratio. Prompts are token ids; nothing is written anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IDS = [2, 818, 5279, 529, 7001, 563]  # Gemma 3: <bos> The capital of France is


def worker(model_dir: Path, source: str) -> None:
    import asyncio
    import ctypes
    import time

    sys.path.insert(0, str(REPO / "python"))
    from cheapest.engine.onnx_engine import load_engine
    from cheapest.engine.types import Delta, SamplingParams

    def rss_mib() -> float:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmRSS")).split()[1]) / 1024

    engine = load_engine(model_dir, threads=2)
    ids = IDS if engine.vocab_size > max(IDS) else [1, 2, 3]

    async def one(params: SamplingParams) -> None:
        async for item in engine.generate(ids, params):
            assert not isinstance(item, Delta) or params.logprobs is None or item.logprobs

    asyncio.run(one(SamplingParams(max_tokens=8, temperature=0.0)))
    if source == "llguidance":
        grammars = engine._grammars
        engine._own_token_bytes = False
        engine._texts._token_bytes = lambda token: grammars.tokenizer.decode_bytes([token])
    trim = ctypes.CDLL(None).malloc_trim
    trim(0)
    before, start = rss_mib(), time.perf_counter()
    asyncio.run(one(SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)))
    seconds = time.perf_counter() - start
    trim(0)
    print(json.dumps({"ms": seconds * 1e3, "mib": rss_mib() - before}))
    asyncio.run(engine.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / ".data" / "models" / "gemma-3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", choices=["core", "llguidance"])
    args = parser.parse_args()
    if args.worker:
        return worker(args.model_dir, args.worker)
    runs: dict[str, list[dict[str, float]]] = {"core": [], "llguidance": []}
    for _ in range(args.rounds):
        for source in runs:
            out = subprocess.run([sys.executable, __file__, "--model-dir", str(args.model_dir), "--worker", source],
                                 check=True, capture_output=True, text=True).stdout
            runs[source].append(json.loads(out.strip().splitlines()[-1]))
    med = {s: {k: statistics.median(r[k] for r in rs) for k in ("ms", "mib")} for s, rs in runs.items()}
    for source, m in med.items():
        print(f"{source:>10}: first logprobs request {m['ms']:8.1f} ms, resident +{m['mib']:6.1f} MiB")
    core, ll = med["core"], med["llguidance"]
    print(f"core / llguidance: time {core['ms'] / ll['ms']:.3f}x, resident growth {core['mib']:.1f} vs {ll['mib']:.1f} MiB"
          f" ({args.rounds} rounds, medians)")


if __name__ == "__main__":
    main()
