"""Two builds of the core's operator library (or two conversions of a model), one process: decode steps, alternating.

    make build && cp python/cheapest_core/_cheapest_core.abi3.so /tmp/lib-b.so     # the change
    git stash && make build && cp python/cheapest_core/_cheapest_core.abi3.so /tmp/lib-a.so && git stash pop
    make build
    .venv/bin/python bench/ab_builds.py --model-dir .data/models/gemma-3-270m --lib-a /tmp/lib-a.so \\
        --lib-b /tmp/lib-b.so [--rows 8] [--steps 40] [--rounds 6]

On this shared 2-core host a decode step's time drifts by 10-30% within minutes, more than most kernel changes
move it, so separate processes cannot tell them apart. Here one session per build (each registering its own copy of
the library: ONNX Runtime loads a custom-op library per path) decodes the same prompts with `rows` rows; the
sessions take turns, `steps` greedy steps a round, and each round reports its 10th percentile step time. The two
must produce the same tokens (asserted), so a kernel change that alters results cannot pass as a speed-up.
`--model-dir-b` gives B another conversion of the model (a graph pass against the graph without it; the same
library twice then, e.g. `--lib-a python/cheapest_core/_cheapest_core.abi3.so --lib-b <a copy of it>`).
`--huge-pages-a off` (or `-b`) reads that session's weights from the mapped model file instead of copies in
transparent huge pages (rust/ortops/pages.rs); it switches the library the `cheapest_core` package imported, so
give that one's path (both builds may be the same file: the setting is read as each session's kernels are made):

    .venv/bin/python bench/ab_builds.py --model-dir .data/models/SmolLM2-135M-Instruct --rows 1 \
        --lib-a python/cheapest_core/_cheapest_core.abi3.so --lib-b python/cheapest_core/_cheapest_core.abi3.so \
        --huge-pages-a off
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--model-dir-b", type=Path, help="B's model directory (default: --model-dir)")
    parser.add_argument("--lib-a", type=Path, required=True)
    parser.add_argument("--lib-b", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--huge-pages-a", choices=("on", "off"), default="on")
    parser.add_argument("--huge-pages-b", choices=("on", "off"), default="on")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "python"))
    from cheapest.engine.loader import load_tokenizer, read_model_dir
    from cheapest.engine.runner import SharedBufferKv

    tokenizer = load_tokenizer(args.model_dir)
    prompts = [tokenizer.encode(f"Tell me story number {i} about a lighthouse keeper.") for i in range(args.rows)]
    import cheapest_core

    imported = Path(cheapest_core._cheapest_core.__file__).resolve()
    runners: dict[str, SharedBufferKv] = {}
    builds = (("A", args.lib_a, args.model_dir, args.huge_pages_a), ("B", args.lib_b, args.model_dir_b or args.model_dir,
                                                                       args.huge_pages_b))
    for tag, lib, model_dir, huge in builds:
        if huge == "off" and lib.resolve() != imported:
            parser.error(f"--huge-pages-{tag.lower()} off switches only {imported}; give it as --lib-{tag.lower()}")
        cheapest_core.set_huge_page_weights(huge == "on")
        spec = read_model_dir(model_dir, graph="model_cpu.onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.register_custom_ops_library(str(lib.resolve()))
        session = ort.InferenceSession(str(spec.graph_path), opts, providers=["CPUExecutionProvider"])
        runners[tag] = SharedBufferKv(session, spec, max(8, args.rows))

    def start(runner: SharedBufferKv) -> list[int]:
        runner.reset()
        return [int(t) for t in np.argmax(runner.prefill_many(0, prompts), axis=-1)]

    tokens = {tag: start(r) for tag, r in runners.items()}
    steps: dict[str, list[float]] = {"A": [], "B": []}
    for _ in range(args.rounds):
        for tag, runner in runners.items():
            times = []
            for _ in range(args.steps):
                t = time.perf_counter()
                logits = runner.decode(tokens[tag])
                times.append(time.perf_counter() - t)
                tokens[tag] = [int(x) for x in np.argmax(logits, axis=-1)]
            steps[tag].append(float(np.percentile(times, 10)) * 1e3)
            if int(runner.lengths.max()) + args.steps > 400:  # keep the cached lengths comparable round to round
                tokens[tag] = start(runner)
        assert tokens["A"] == tokens["B"], "the two builds chose different tokens"
    for tag in ("A", "B"):
        print(f"{tag}: p10 step ms by round " + " ".join(f"{v:.2f}" for v in steps[tag])
              + f"  (median {float(np.median(steps[tag])):.2f})")
    print(f"B / A median: {float(np.median(steps['B'])) / float(np.median(steps['A'])):.3f} "
          f"({args.rows} rows, {args.steps} steps x {args.rounds} rounds, same tokens)")


if __name__ == "__main__":
    main()
