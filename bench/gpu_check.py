"""GPU check, prepared for a machine with an NVIDIA GPU and onnxruntime-gpu:

    python bench/gpu_check.py [--model-dir DIR] [--new-tokens 128] [--prompt-tokens 500] [--concurrency 8]

1. The greedy answer to "What is the capital of France?" on CUDA equals the CPU one (token ids and text).
2. CUDA decode tok/s at batch 1, prefill tok/s on a ~500-token prompt, aggregate tok/s at --concurrency.

Exit status: 0 = all checks passed, 1 = the CUDA answer differs from the CPU one, 2 = no usable CUDA execution
provider or GPU here (nothing measured). The model directory defaults to the converted SmolLM2 in the data
directory; nothing is downloaded when it is already there.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import onnxruntime as ort  # noqa: E402

from cheapest.engine.onnx_engine import OnnxEngine, load_engine  # noqa: E402
from cheapest.engine.loader import CPU, CUDA, cuda_device_count  # noqa: E402
from cheapest.engine.types import Delta, Finish, SamplingParams  # noqa: E402

QUESTION = "What is the capital of France?"


async def _greedy(engine: OnnxEngine, ids: list[int], max_tokens: int) -> tuple[str, Finish, list[float], float]:
    text, times = "", []
    start = time.perf_counter()
    async for item in engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        if isinstance(item, Finish):
            return text, item, times, start
        text += item.text
        times.append(time.perf_counter())
    raise RuntimeError("no Finish")


def _answer(engine: OnnxEngine) -> tuple[str, Finish]:
    ids = engine.encode(engine.render_chat([("user", QUESTION)]))
    text, finish, _, _ = asyncio.run(_greedy(engine, ids, 64))
    return text, finish


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    if CUDA not in ort.get_available_providers():
        print(f"gpu_check: {CUDA} is not available in this onnxruntime build "
              f"({ort.get_available_providers()}); install onnxruntime-gpu on a GPU machine", file=sys.stderr)
        return 2
    if cuda_device_count() == 0:
        print("gpu_check: no NVIDIA GPU / CUDA driver found on this machine", file=sys.stderr)
        return 2
    if args.model_dir is None:
        from cheapest.config import load_settings
        from cheapest.convert import pull  # type: ignore[attr-defined]

        settings = load_settings()
        args.model_dir = Path(pull.ensure_default_model(settings.models_path, settings.cache_path))

    cpu = load_engine(args.model_dir, providers=[CPU])
    cpu_text, cpu_finish = _answer(cpu)
    asyncio.run(cpu.close())

    gpu = load_engine(args.model_dir, providers=[CUDA, CPU])
    if gpu.provider != CUDA:
        print(f"gpu_check: the session fell back to {gpu.provider}", file=sys.stderr)
        return 2
    gpu_text, gpu_finish = _answer(gpu)
    same = (gpu_text, gpu_finish) == (cpu_text, cpu_finish)
    print(f"greedy answer  CPU: {cpu_text!r} ({cpu_finish.completion_tokens} tokens, {cpu_finish.reason})")
    print(f"greedy answer CUDA: {gpu_text!r} ({gpu_finish.completion_tokens} tokens, {gpu_finish.reason})")
    print(f"CUDA == CPU: {same}")

    from bench_inference import _prompts

    prompts = _prompts(args.model_dir, args.prompt_tokens)

    async def measure() -> tuple[float, float, float]:
        await _greedy(gpu, prompts["story"], 8)  # warm-up (kernel selection, allocations)
        decode, prefill, aggregate = [], [], []
        for _ in range(args.repeats):
            _, _, times, _ = await _greedy(gpu, prompts["story"], args.new_tokens)
            decode.append((len(times) - 1) / (times[-1] - times[0]))
            _, _, times, start = await _greedy(gpu, prompts["long"], 1)
            prefill.append(len(prompts["long"]) / (times[0] - start))
            start = time.perf_counter()
            runs = await asyncio.gather(*(_greedy(gpu, prompts["story"], args.new_tokens)
                                          for _ in range(args.concurrency)))
            aggregate.append(sum(len(r[2]) for r in runs) / (max(r[2][-1] for r in runs) - start))
        return statistics.median(decode), statistics.median(prefill), statistics.median(aggregate)

    decode, prefill, aggregate = asyncio.run(measure())
    asyncio.run(gpu.close())
    print(f"CUDA decode {decode:.1f} tok/s (batch 1), prefill {prefill:.1f} tok/s "
          f"({len(prompts['long'])}-token prompt), aggregate {aggregate:.1f} tok/s at {args.concurrency} concurrent")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
