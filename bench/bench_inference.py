"""Inference speed: this engine vs llama.cpp and Hugging Face transformers on the same GGUF, same threads.

    python bench/bench_inference.py [--threads 2] [--new-tokens 128] [--prompt-tokens 500] [--concurrency 8,32]
                                    [--model-dir DIR] [--gguf FILE] [--peers llama.cpp,transformers]

Measured, per engine, each in its own process (so thread pools and memory do not mix):
  decode tok/s at batch 1 (greedy, up to --new-tokens new tokens: tokens after the first / time after the first),
  prefill tok/s on a ~--prompt-tokens prompt (prompt tokens / time to the first token), time to the first token
  of the 37-token chat prompt "What is the capital of France?", the resident memory one loaded model adds (just
  after loading, and after serving the runs: weights that are memory-mapped count only once touched), and for
  this engine, at each --concurrency level, the aggregate tok/s of that many concurrent requests and the p50/p99
  time between two tokens of one request.
Engines take turns for --rounds rounds (--repeats runs each); medians are reported, with the ratios the inference
issue sets goals for: decode >= 1.5x llama.cpp; aggregate at 8 concurrent >= 4x our batch-1 figure; resident
memory <= llama.cpp's.

The peers live in a bench-only virtualenv (they are not project dependencies):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install llama-cpp-python transformers torch gguf
A peer that is not installed there is skipped with a message. Prompts are the same token ids for every
engine (the model's own tokenizer; a base model without a chat template gets the bare text), so prefill work is
identical. Gemma 3 270M: `--model-dir <data>/models/gemma-3-270m --gguf <data>/cache/gemma-3-270m-q4_k_m.gguf`.
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
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BENCH_PYTHON = REPO / ".venv-bench" / "bin" / "python"

STORY = ("Write a long, detailed story about a lighthouse keeper who finds a map to a hidden island, "
         "with many characters and places.")
CHAT = "What is the capital of France?"  # 37 tokens with SmolLM2's chat template: the TTFT prompt
FILLER = ("The history of the region is long and varied. Farmers grew wheat and barley in the valleys, "
          "traders brought salt and cloth along the river, and every spring the town held a market where "
          "people from the hills came to sell wool, cheese and honey. ")


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# --- workers (run in a subprocess; print one JSON line) --------------------------------------------------------


def _token_times(stream: Any) -> list[float]:
    """One timestamp per generated token (llama-cpp-python streams one chunk per token)."""
    times = []
    for chunk in stream:
        choice = chunk["choices"][0]
        if choice.get("finish_reason") and not choice.get("text") and times:
            break  # the closing chunk carries no token
        times.append(time.perf_counter())
    return times


def _rates(start: float, times: list[float], prompt_len: int) -> dict[str, float]:
    out = {"ttft_s": times[0] - start, "new_tokens": len(times)}
    if len(times) > 1:
        out["decode_tps"] = (len(times) - 1) / (times[-1] - times[0])
    out["prefill_tps"] = prompt_len / (times[0] - start)
    return out


def worker_ours(args: argparse.Namespace, prompts: dict[str, list[int]]) -> dict[str, Any]:
    import asyncio

    sys.path.insert(0, str(REPO / "python"))
    from cheapest.engine.onnx_engine import load_engine
    from cheapest.engine.types import Delta, SamplingParams

    before = _rss_bytes()
    levels = _levels(args.concurrency)
    engine = load_engine(args.model_dir, threads=args.threads, max_batch=max(8, *levels),
                         share_buffer=args.kv == "shared")
    loaded = _rss_bytes()

    async def one(ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
        start = time.perf_counter()
        times = []
        async for item in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
            if isinstance(item, Delta):
                times.append(time.perf_counter())
        return start, times

    async def run() -> dict[str, Any]:
        await one(prompts["story"], 8)  # warm-up: first-run allocations and thread pool start
        runs: dict[str, list[float]] = {}

        def add(key: str, value: float) -> None:
            runs.setdefault(key, []).append(value)

        new_tokens = 0
        for _ in range(args.repeats):
            start, times = await one(prompts["story"], args.new_tokens)
            add("decode_tps", _rates(start, times, len(prompts["story"]))["decode_tps"])
            new_tokens = len(times)
            start, times = await one(prompts["long"], 1)
            add("prefill_tps", len(prompts["long"]) / (times[0] - start))
            start, times = await one(prompts["chat"], 1)
            add("ttft_chat_ms", (times[0] - start) * 1e3)
            add("rss_serving_bytes", _rss_bytes() - before)  # after the runs the peers make too (one at a time)
            for level in levels:
                start = time.perf_counter()
                results = await asyncio.gather(*(one(prompts["story"], args.new_tokens) for _ in range(level)))
                total = sum(len(t) for _, t in results)
                end = max(t[-1] for _, t in results)
                add(f"aggregate_tps@{level}", total / (end - start))
                # Steady state: every request admitted (after the last first token) until the last token.
                joined = max(t[0] for _, t in results)
                add(f"steady_tps@{level}", sum(1 for _, t in results for x in t if x > joined) / (end - joined))
                gaps = sorted(b - a for _, t in results for a, b in zip(t, t[1:]))
                add(f"itl_p50_ms@{level}", gaps[len(gaps) // 2] * 1e3)
                add(f"itl_p99_ms@{level}", gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))] * 1e3)
        return {**{k: _median(v) for k, v in runs.items()}, "new_tokens": new_tokens, "provider": engine.provider}

    result = asyncio.run(run())
    result["rss_batched_bytes"] = _rss_bytes() - before  # after the concurrent runs as well (max_batch rows of KV)
    asyncio.run(engine.close())
    result["rss_model_bytes"] = loaded - before
    result["rss_total_bytes"] = _rss_bytes()
    return result


def _levels(concurrency: str) -> list[int]:
    return [int(c) for c in str(concurrency).split(",") if c]


def _measure_peer(one: Callable[[list[int], int], tuple[float, list[float]]], args: argparse.Namespace,
                  prompts: dict[str, list[int]], rss_model: int, before: int) -> dict[str, Any]:
    """The same protocol for every peer: a warm-up, then per round one decode run and one 1-token prefill run.
    `one(ids, max_tokens)` returns the start time and the time each new token arrived."""
    one(prompts["story"], 8)
    decode, prefill, ttft = [], [], []
    new_tokens = 0
    for _ in range(args.repeats):
        start, times = one(prompts["story"], args.new_tokens)
        decode.append(_rates(start, times, len(prompts["story"]))["decode_tps"])
        new_tokens = len(times)
        start, times = one(prompts["long"], 1)
        prefill.append(len(prompts["long"]) / (times[0] - start))
        start, times = one(prompts["chat"], 1)
        ttft.append((times[0] - start) * 1e3)
    return {"decode_tps": _median(decode), "prefill_tps": _median(prefill), "ttft_chat_ms": _median(ttft),
            "new_tokens": new_tokens, "rss_model_bytes": rss_model, "rss_serving_bytes": _rss_bytes() - before,
            "rss_total_bytes": _rss_bytes()}


def worker_llama_cpp(args: argparse.Namespace, prompts: dict[str, list[int]]) -> dict[str, Any]:
    from llama_cpp import Llama

    before = _rss_bytes()
    llm = Llama(model_path=str(args.gguf), n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads,
                n_batch=512, verbose=False)
    loaded = _rss_bytes()

    def one(ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
        llm.reset()  # no prompt-prefix reuse between runs
        start = time.perf_counter()
        stream = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1, stream=True)
        return start, _token_times(stream)

    return _measure_peer(one, args, prompts, loaded - before, before)


def worker_transformers(args: argparse.Namespace, prompts: dict[str, list[int]]) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    torch.set_num_threads(args.threads)
    before = _rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(str(Path(args.gguf).parent), gguf_file=Path(args.gguf).name,
                                                 torch_dtype=torch.float32)
    model.eval()
    loaded = _rss_bytes()

    class Clock(StoppingCriteria):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
            self.times.append(time.perf_counter())
            return False

    def one(ids: list[int], max_tokens: int) -> tuple[float, list[float]]:
        clock = Clock()
        inputs = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens,
                           do_sample=False, stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=2)
        return start, clock.times

    return _measure_peer(one, args, prompts, loaded - before, before)


WORKERS = {"ours": worker_ours, "ours-copy": worker_ours, "llama.cpp": worker_llama_cpp,
           "llama.cpp-passive": worker_llama_cpp, "transformers": worker_transformers}
PEER_MODULES = {"llama.cpp": "llama_cpp", "llama.cpp-passive": "llama_cpp", "transformers": "transformers"}
# llama.cpp's OpenMP threads busy-wait at every barrier by default; beside other busy processes that costs it most
# of its speed. 'llama.cpp-passive' is the same build with the threads sleeping instead (OMP_WAIT_POLICY).
PEER_ENV = {"llama.cpp-passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


# --- driver -------------------------------------------------------------------------------------------------------


def _prompts(model_dir: Path, prompt_tokens: int) -> dict[str, list[int]]:
    sys.path.insert(0, str(REPO / "python"))
    from cheapest.engine.chat import ChatTemplate
    from cheapest.engine.loader import load_tokenizer, read_model_dir

    spec = read_model_dir(model_dir)
    tok = load_tokenizer(model_dir)

    def prompt(text: str) -> list[int]:
        """Through the chat template, or (a base model such as Gemma 3) the bare text with the tokenizer's BOS."""
        if not ChatTemplate.present(spec.tokenizer_config):
            return tok.encode(text, add_special_tokens=True)
        template = ChatTemplate.from_tokenizer_config(spec.tokenizer_config)
        return tok.encode(template.render([("user", text)]), add_special_tokens=False)

    story = prompt(STORY)
    text = FILLER
    while len(tok.encode(text, add_special_tokens=False)) < prompt_tokens:
        text += FILLER
    ids = prompt(text + " Summarize this.")
    return {"story": story, "long": ids[-prompt_tokens:] if len(ids) > prompt_tokens else ids, "chat": prompt(CHAT)}


def _run_worker(name: str, args: argparse.Namespace, prompts: dict[str, list[int]]) -> dict[str, Any] | None:
    python = sys.executable
    if name not in ("ours", "ours-copy"):  # peers run in the bench virtualenv
        if not BENCH_PYTHON.exists():
            print(f"skipping {name}: no bench venv at {BENCH_PYTHON} (see this file's docstring)", file=sys.stderr)
            return None
        check = subprocess.run([str(BENCH_PYTHON), "-c", f"import {PEER_MODULES[name]}"], capture_output=True)
        if check.returncode != 0:
            print(f"skipping {name}: `{PEER_MODULES[name]}` is not installed in {BENCH_PYTHON.parent.parent}",
                  file=sys.stderr)
            return None
        python = str(BENCH_PYTHON)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["kv"] = "copy" if name == "ours-copy" else "shared"
    payload = json.dumps({"args": settings,
                          "prompts": prompts})
    proc = subprocess.run([python, __file__, "--worker", name], input=payload, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "python"), **PEER_ENV.get(name, {})})
    if proc.returncode != 0:
        print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _default_paths(args: argparse.Namespace) -> None:
    if args.model_dir is None or args.gguf is None:
        sys.path.insert(0, str(REPO / "python"))
        from cheapest.config import load_settings
        from cheapest.convert import pull  # type: ignore[attr-defined]

        settings = load_settings()
        model_dir = Path(pull.ensure_default_model(settings.models_path, settings.cache_path))
        args.model_dir = args.model_dir or model_dir
        if args.gguf is None:
            found = sorted(settings.data_path.glob("**/*.gguf"))
            if not found:
                raise SystemExit("no GGUF found in the data directory; pass --gguf")
            args.gguf = found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--concurrency", default="8,32", help="comma-separated concurrent-request levels")
    parser.add_argument("--repeats", type=int, default=2, help="runs per engine per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every engine once, in turn")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--peers", default="llama.cpp,transformers",
                        help="comma-separated; 'ours-copy' = this engine with the KV cache copied every step "
                             "instead of the shared in-place buffer; 'llama.cpp-passive' = llama.cpp with sleeping "
                             "(not spinning) OpenMP threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        payload = json.loads(sys.stdin.read())
        ns = argparse.Namespace(**payload["args"])
        print(json.dumps(WORKERS[args.worker](ns, payload["prompts"])))
        return

    _default_paths(args)
    prompts = _prompts(args.model_dir, args.prompt_tokens)
    names = ["ours", *[p for p in args.peers.split(",") if p and p != "ours"]]
    print(f"threads={args.threads} prompt={len(prompts['long'])} tokens, chat prompt={len(prompts['chat'])} tokens, "
          f"new={args.new_tokens}, concurrency={args.concurrency}; {args.rounds} interleaved rounds of {args.repeats} "
          f"runs (medians); load average {os.getloadavg()[0]:.2f}")
    # Engines take turns, round after round, so background load on a shared box hits them alike.
    rounds: dict[str, list[dict[str, Any]]] = {}
    skipped: set[str] = set()
    for _ in range(args.rounds):
        for name in names:
            if name in skipped:
                continue
            result = _run_worker(name, args, prompts)
            if result is None:
                skipped.add(name)
            else:
                rounds.setdefault(name, []).append(result)
    results = {name: {key: (_median([r[key] for r in runs]) if isinstance(runs[0][key], (int, float))
                            else runs[0][key]) for key in runs[0]} for name, runs in rounds.items()}
    for name, result in results.items():
        print(f"{name:>17}: decode {result['decode_tps']:7.1f} tok/s  prefill {result['prefill_tps']:8.1f} tok/s  "
              f"TTFT(chat) {result['ttft_chat_ms']:6.1f} ms  RSS model {result['rss_model_bytes'] / 2**20:6.1f} MiB "
              f"(after serving {result['rss_serving_bytes'] / 2**20:6.1f} MiB"
              + (f", after the concurrent runs {result['rss_batched_bytes'] / 2**20:6.1f} MiB" if "rss_batched_bytes" in result
                 else "") + ")", flush=True)
        for level in _levels(args.concurrency):
            if f"aggregate_tps@{level}" in result:
                print(f"{'':>19}@{level:<3} aggregate {result[f'aggregate_tps@{level}']:7.1f} tok/s (all joined: "
                      f"{result[f'steady_tps@{level}']:7.1f}), inter-token p50 {result[f'itl_p50_ms@{level}']:6.1f} ms "
                      f"p99 {result[f'itl_p99_ms@{level}']:6.1f} ms")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    ours = results.get("ours")
    if ours:
        for level in _levels(args.concurrency):
            print(f"aggregate@{level} / batch-1 decode: {ours[f'aggregate_tps@{level}'] / ours['decode_tps']:.2f}x "
                  f"end to end incl. prefill, {ours[f'steady_tps@{level}'] / ours['decode_tps']:.2f}x once all joined "
                  f"(goal at 8: >= 4x)")
        if "ours-copy" in results:
            copy = results["ours-copy"]
            print(f"shared in-place KV buffer vs copying it every step: decode "
                  f"{ours['decode_tps'] / copy['decode_tps']:.2f}x")
        for peer in ("llama.cpp", "llama.cpp-passive", "transformers"):
            if peer in results:
                p = results[peer]
                print(f"vs {peer}: decode {ours['decode_tps'] / p['decode_tps']:.2f}x (goal >= 1.5x), prefill "
                      f"{ours['prefill_tps'] / p['prefill_tps']:.2f}x, TTFT(chat) {p['ttft_chat_ms'] / ours['ttft_chat_ms']:.2f}x "
                      f"faster, RSS after serving {ours['rss_serving_bytes'] / p['rss_serving_bytes']:.2f}x theirs "
                      f"(goal <= 1)")

if __name__ == "__main__":
    main()
