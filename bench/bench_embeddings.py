"""Embedding speed: this engine vs Hugging Face transformers + mean pooling on the same all-MiniLM-L6-v2 weights,
same threads, same run.

    python bench/bench_embeddings.py [--threads 2] [--rounds 3] [--seconds 2]

Sentences/s at batch 1 and batch 64, for short sentences (~12 tokens) and 256-token inputs; tokenization
included on both sides (ours: cheapest_core's tokenizer and the engine's length-batched runs; the peer: its fast
tokenizer padding the batch, BertModel, mean pooling over the mask, L2 normalization, as sentence-transformers
computes it). Each side runs in its own process, in turns, for --rounds rounds; medians are reported with the
ratios the embeddings issue sets goals for: >= 3x at batch 1, >= 2x at batch 64.

The peer lives in the bench-only virtualenv (not a project dependency):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install transformers torch
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"
SHORT = ["A man is eating food.", "The girl is carrying a baby.", "A man is riding a horse.",
         "Two dogs play in the snow.", "How do I bake bread at home?", "The stock market fell sharply today."]
LONG_PART = ("The history of the region is long and varied. Farmers grew wheat and barley in the valleys, traders "
             "brought salt and cloth along the river, and every spring the town held a market. ")
CASES = [("short", 1), ("short", 64), ("256 tokens", 1), ("256 tokens", 64)]


def _texts(kind: str, n: int) -> list[str]:
    if kind == "short":
        return [SHORT[i % len(SHORT)] for i in range(n)]
    return [f"{i} " + LONG_PART * 12 for i in range(n)]  # cut to 256 tokens by both sides


def _rate(call: Callable[[list[str]], object], texts: list[str], seconds: float) -> float:
    call(texts)  # warm-up
    done, start = 0, time.perf_counter()
    while True:
        call(texts)
        done += len(texts)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and done >= 3 * len(texts):
            return done / elapsed


def worker_ours(threads: int, seconds: float, model_dir: str) -> dict[str, float]:
    import asyncio

    from cheapest.engine.embedding import EmbeddingEngine

    engine = EmbeddingEngine(model_dir, threads=threads)
    loop = asyncio.new_event_loop()

    def call(texts: list[str]) -> object:
        ids = [engine.truncate(ids, 256) if len(ids) > 256 else ids for ids in map(engine.tokenize, texts)]
        return loop.run_until_complete(engine.embed(ids))

    out = {f"{kind}@{n}": _rate(call, _texts(kind, n), seconds) for kind, n in CASES}
    loop.run_until_complete(engine.close())
    return out


def worker_transformers(threads: int, seconds: float, model_dir: str) -> dict[str, float]:
    import torch
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def call(texts: list[str]) -> object:
        batch = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    return {f"{kind}@{n}": _rate(call, _texts(kind, n), seconds) for kind, n in CASES}


WORKERS = {"ours": worker_ours, "transformers": worker_transformers}


def _source_folder(zip_path: Path, dest: Path) -> Path:
    """The package's model.zip unpacked once, for the peer (it reads the same safetensors weights)."""
    import zipfile

    if not (dest / "config.json").is_file():
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(dest)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args.threads, args.seconds, args.model_dir)))
        return

    sys.path.insert(0, str(REPO / "python"))
    from cheapest.config import load_settings
    from cheapest.convert.catalog import MINILM_L6
    from cheapest.convert.pull import ensure_model

    settings = load_settings()
    ours_dir = ensure_model(MINILM_L6.model_id, settings.models_path, settings.cache_path, progress=False)
    peer_dir = _source_folder(settings.cache_path / MINILM_L6.gguf, settings.cache_path / "all-MiniLM-L6-v2-source")
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for name, python, folder in (("ours", sys.executable, ours_dir), ("transformers", str(BENCH_PYTHON), peer_dir)):
            if name != "ours" and not BENCH_PYTHON.exists():
                print(f"skipping {name}: no bench venv at {BENCH_PYTHON}", file=sys.stderr)
                continue
            proc = subprocess.run([python, __file__, "--worker", name, "--threads", str(args.threads), "--seconds",
                                   str(args.seconds), "--model-dir", str(folder)], capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(REPO / "python")})
            if proc.returncode != 0:
                print(f"{name} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"threads={args.threads}, {args.rounds} interleaved rounds, medians, sentences/s")
    for kind, n in CASES:
        case = f"{kind}@{n}"
        ours = statistics.median(r[case] for r in runs["ours"])
        line = f"{kind:>11}, batch {n:>2}: ours {ours:8.1f}"
        if "transformers" in runs:
            peer = statistics.median(r[case] for r in runs["transformers"])
            line += f"  transformers {peer:8.1f}  = {ours / peer:.2f}x (goal >= {3 if n == 1 else 2}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
