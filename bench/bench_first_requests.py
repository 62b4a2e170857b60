"""A worker's first logprobs request and first grammar request, each way the engine can serve it: token bytes and
llguidance's vocabulary view from the core tokenizer (`Tokenizer.token_bytes`, grammar.py `_CoreVocabulary`)
against what the engine did before (llguidance reading tokenizer.json, which loads the vocabulary a second time
in the `tokenizers` crate). Each request kind and way runs in a fresh process; the ways take turns.

    CHEAPEST_DATA_DIR=$PWD/.data .venv/bin/python bench/bench_first_requests.py \\
        [--model-dir .data/models/gemma-3-270m] [--rounds 3]

One engine per process answers a warm-up request (plain), then one request with logprobs=5, or one constrained
by a JSON grammar; the figures are that request's wall time and the growth of the resident set across it (after
`malloc_trim`), medians over the rounds, and their ratios. Prompts are token ids; nothing is written anywhere.
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
GRAMMAR = 'start: "{\\"capital\\": \\"" /[A-Za-z ]{1,20}/ "\\"}"'


def worker(model_dir: Path, kind: str, way: str) -> None:
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
    if way == "tokenizer.json":  # what the engine did before
        grammars = engine._grammars
        grammars._core = None
        engine._own_token_bytes = False
        engine._texts._token_bytes = lambda token: grammars.tokenizer.decode_bytes([token])
    trim = ctypes.CDLL(None).malloc_trim
    trim(0)
    before, start = rss_mib(), time.perf_counter()
    if kind == "logprobs":
        asyncio.run(one(SamplingParams(max_tokens=8, temperature=0.0, logprobs=5)))
    else:
        async def constrained() -> None:
            await engine.grammar_ready()
            await one(SamplingParams(max_tokens=16, temperature=0.0, grammar=engine.compile_grammar(GRAMMAR)))
        asyncio.run(constrained())
    seconds = time.perf_counter() - start
    trim(0)
    print(json.dumps({"ms": seconds * 1e3, "mib": rss_mib() - before}))
    asyncio.run(engine.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / ".data" / "models" / "gemma-3-270m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "WAY"))
    args = parser.parse_args()
    if args.worker:
        return worker(args.model_dir, *args.worker)
    ways = ("core", "tokenizer.json")
    for kind in ("logprobs", "grammar"):
        runs: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way in ways:
                out = subprocess.run([sys.executable, __file__, "--model-dir", str(args.model_dir), "--worker", kind,
                                      way], check=True, capture_output=True, text=True).stdout
                runs[way].append(json.loads(out.strip().splitlines()[-1]))
        med = {w: {k: statistics.median(r[k] for r in rs) for k in ("ms", "mib")} for w, rs in runs.items()}
        for way, m in med.items():
            print(f"first {kind:>8} request, {way:>14}: {m['ms']:8.1f} ms, resident +{m['mib']:6.1f} MiB")
        core, old = med["core"], med["tokenizer.json"]
        print(f"{kind}: core / tokenizer.json time {core['ms'] / old['ms']:.3f}x, resident growth {core['mib']:.1f} "
              f"vs {old['mib']:.1f} MiB ({args.rounds} rounds, medians)")


if __name__ == "__main__":
    main()
