"""Gemma 3 270M Q4_K_M: our engine against Hugging Face transformers on the same GGUF, and the LM head's share
of a decode step. Run on purpose, never in the test suite.

  .venv/bin/python bench/gemma3_check.py --transformers-python .venv-bench/bin/python
      greedy token ids for 32 tokens on several prompts, ours (the engine, fused graph) vs transformers
      loading the GGUF with gguf_file= (fp32) in a bench-only virtualenv (`pip install torch transformers gguf accelerate`;
      not a project dependency). Both start from the same prompt ids.
  .venv/bin/python bench/gemma3_check.py --lm-head-share
      ONNX Runtime's profile of decode steps: the time in the LM head's nodes over the time in all nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
]
STEPS = 32

_PEER = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, name, prompts, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(2)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
out = []
with torch.no_grad():
    for ids in prompts:
        gen = model.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False, min_new_tokens=steps)
        out.append(gen[0, len(ids):].tolist())
print(json.dumps(out))
"""


def _gemma() -> tuple[Path, Path]:
    sys.path.insert(0, str(REPO / "python"))
    from cheapest.config import load_settings
    from cheapest.convert.catalog import GEMMA3_270M
    from cheapest.convert.pull import ensure_model

    settings = load_settings()
    return (ensure_model(GEMMA3_270M.model_id, settings.models_path, settings.cache_path, progress=False),
            settings.cache_path / GEMMA3_270M.gguf)


def _ours(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from cheapest.engine.onnx_engine import load_engine
    from cheapest.engine.sampling import Sampler
    from cheapest.engine.types import SamplingParams

    engine = load_engine(model_dir, threads=2)
    runner = engine._runner  # token ids straight from the runner: no EOS stop, no detokenization
    out = []
    for ids in prompts:
        sampler = Sampler(SamplingParams(max_tokens=STEPS, temperature=0.0))
        token = sampler(runner.prefill(0, ids))
        tokens = [token]
        while len(tokens) < STEPS:
            tokens.append(sampler(runner.decode([tokens[-1]])[0]))
        runner.release(0)
        out.append(tokens)
    asyncio.run(engine.close())
    return out


def compare(python: str) -> int:
    model_dir, gguf = _gemma()
    from cheapest.engine.loader import load_tokenizer

    tok = load_tokenizer(model_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    ours = _ours(model_dir, prompts)
    proc = subprocess.run([python, "-c", _PEER, str(gguf.parent), gguf.name, json.dumps(prompts), str(STEPS)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return 1
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    same = 0
    for text, a, b in zip(PROMPTS, ours, theirs):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        same += first is None
        print(f"{text!r}: {'identical' if first is None else f'first difference at token {first}'} "
              f"-> {tok.decode(a)!r}")
    print(f"{same}/{len(PROMPTS)} prompts: identical greedy ids for {STEPS} tokens")
    return 0 if same == len(PROMPTS) else 1


def lm_head_share(steps: int = 64) -> int:
    import onnx
    import onnxruntime as ort

    from cheapest.engine.loader import read_model_dir, session_options
    from cheapest.engine.runner import SharedBufferKv

    model_dir, _ = _gemma()
    spec = read_model_dir(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(2)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(spec.graph_path), opts, providers=["CPUExecutionProvider"])
        runner = SharedBufferKv(session, spec, 1)
        token = int(runner.prefill(0, [2, 818, 5279, 529, 7001, 563]).argmax())
        for _ in range(steps):
            token = int(runner.decode([token])[0].argmax())
        trace = json.loads(Path(session.end_profiling()).read_text())
    by_node: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by_node[event["name"].removesuffix("_kernel_time")] += event["dur"]
    # The graph is built in order: every node after the final norm belongs to the LM head.
    nodes = [n.name for n in onnx.load(str(spec.graph_path), load_external_data=False).graph.node]
    final_norm = max(i for i, n in enumerate(nodes) if n.startswith("SimplifiedLayerNormalization"))
    head = {n: by_node.get(n, 0.0) for n in nodes[final_norm + 1:]}
    total = sum(by_node.values())
    print(f"{steps} decode steps + 1 prefill, {total / 1000 / (steps + 1):.1f} ms of node time per run; LM head: "
          + ", ".join(f"{n} {t / 1000 / (steps + 1):.2f} ms" for n, t in sorted(head.items(), key=lambda kv: -kv[1])
                      if t > 0))
    print(f"LM head share of a step: {100 * sum(head.values()) / total:.1f}%")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transformers-python", help="a Python with torch + transformers + gguf")
    parser.add_argument("--lm-head-share", action="store_true")
    args = parser.parse_args()
    rc = 0
    if args.transformers_python:
        rc |= compare(args.transformers_python)
    if args.lm_head_share:
        rc |= lm_head_share()
    return rc


if __name__ == "__main__":
    sys.exit(main())
