"""A decode step's attention: cheapest.GroupAttention (the core's, rust/ortops/attention.rs) vs ONNX Runtime's
GroupQueryAttention (the peer), the same nodes on the same inputs in the same run.

    make bench   (or: .venv/bin/python -m pytest bench/bench_attention.py --benchmark-enable)
    .venv/bin/python bench/bench_attention.py [--rounds 5] [--heads 9 --kv-heads 3 --head-dim 64]

One graph of 30 attention nodes (SmolLM2-135M's layers: 9 query heads, 3 kv heads of 64 by default; Gemma 3
270M is `--heads 4 --kv-heads 1 --head-dim 256`), each with its own KV buffer of 1,024 positions bound as past
and present (the runner's layout), one new token per row over `length` cached ones, run through IO binding with
two intra-op threads. The graph is built once with GroupQueryAttention and rewritten by the converter's own pass
(`cpu_graph`); the two sessions alternate round by round and each round reports the 20th percentile of 30 runs.
Goal (issue 15): less time per decode step at batch 1 and 8; report the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cheapest.convert.graph_builder import MS_DOMAIN
from cheapest.convert.graph_passes import cpu_graph
from cheapest.engine.loader import session_options

LAYERS, CAPACITY = 30, 1024


def attention_graph(heads: int, kv_heads: int, dim: int) -> onnx.ModelProto:
    width = (heads + 2 * kv_heads) * dim
    kv = ["batch", kv_heads, CAPACITY, dim]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["batch", 1, width]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    angles = np.arange(CAPACITY)[:, None] / 10000.0 ** (np.arange(dim // 2) / (dim // 2))
    tables = [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    outputs, nodes = [], []
    for layer in range(LAYERS):
        inputs += [helper.make_tensor_value_info(f"past_key.{layer}", TensorProto.FLOAT, kv),
                   helper.make_tensor_value_info(f"past_value.{layer}", TensorProto.FLOAT, kv)]
        outputs += [helper.make_tensor_value_info(f"out.{layer}", TensorProto.FLOAT, ["batch", 1, heads * dim]),
                    helper.make_tensor_value_info(f"present_key.{layer}", TensorProto.FLOAT, kv),
                    helper.make_tensor_value_info(f"present_value.{layer}", TensorProto.FLOAT, kv)]
        nodes.append(helper.make_node(
            "GroupQueryAttention",
            ["qkv", "", "", f"past_key.{layer}", f"past_value.{layer}", "seqlens_k", "total", "cos", "sin"],
            [f"out.{layer}", f"present_key.{layer}", f"present_value.{layer}"],
            domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, do_rotary=1))
    graph = helper.make_graph(nodes, "attention", inputs, outputs, tables)
    return helper.make_model(graph, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])


class Step:
    """One session of the graph with its KV buffers bound as past and present: `run()` is one decode step."""

    def __init__(self, model: onnx.ModelProto, batch: int, length: int, seed: int = 0) -> None:
        self.session = ort.InferenceSession(model.SerializeToString(), session_options(2),
                                            providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(seed)
        _, kv_heads, _, dim = self.session.get_inputs()[3].shape  # [batch, kv heads, CAPACITY, dim]
        width = self.session.get_inputs()[0].shape[2]
        self.buffers = [rng.standard_normal((batch, kv_heads, CAPACITY, dim), dtype=np.float32)
                        for _ in range(2 * LAYERS)]
        self.binding = self.session.io_binding()
        self.binding.bind_cpu_input("qkv", rng.standard_normal((batch, 1, int(width)), dtype=np.float32))
        self.binding.bind_cpu_input("seqlens_k", np.full(batch, length, np.int32))
        self.binding.bind_cpu_input("total", np.array(length + 1, np.int32))
        for layer in range(LAYERS):
            self.binding.bind_output(f"out.{layer}", "cpu")
        for layer in range(LAYERS):
            for i, name in enumerate(("key", "value")):
                buf = self.buffers[2 * layer + i]
                self.binding.bind_input(f"past_{name}.{layer}", "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                self.binding.bind_output(f"present_{name}.{layer}", "cpu", 0, np.float32, list(buf.shape),
                                         buf.ctypes.data)

    def run(self) -> np.ndarray:
        self.session.run_with_iobinding(self.binding)
        return np.asarray(self.binding.get_outputs()[0].numpy())


def peers(heads: int, kv_heads: int, dim: int) -> dict[str, onnx.ModelProto]:
    theirs = attention_graph(heads, kv_heads, dim)
    ours = onnx.ModelProto()
    ours.CopyFrom(theirs)
    cpu_graph(ours)
    assert {n.op_type for n in ours.graph.node} == {"GroupAttention"}
    return {"core": ours, "onnxruntime": theirs}


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", ["core", "onnxruntime"])
def test_decode_attention_step(benchmark, name: str, batch: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"attention: 30 layers of SmolLM2-135M, batch {batch}, 150 cached positions"
    step = Step(peers(9, 3, 64)[name], batch, 150)
    out = benchmark(step.run)
    assert out.shape == (batch, 1, 9 * 64) and np.all(np.isfinite(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()
    models = peers(args.heads, args.kv_heads, args.head_dim)
    print(f"{'batch':>5} {'cached':>6} {'core ms':>8} {'onnxruntime ms':>15} {'ratio':>6}   (per step of {LAYERS} nodes)")
    for batch, length in [(1, 150), (1, 600), (8, 150), (8, 600)]:
        steps = {name: Step(model, batch, length) for name, model in models.items()}
        np.testing.assert_allclose(steps["core"].run(), steps["onnxruntime"].run(), rtol=0, atol=1e-4)
        rounds: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(args.rounds):
            for name, step in steps.items():
                for _ in range(3):
                    step.run()
                times = []
                for _ in range(30):
                    start = time.perf_counter()
                    step.run()
                    times.append(time.perf_counter() - start)
                rounds[name].append(float(np.percentile(times, 20)) * 1e3)
        core, ort_ms = statistics.median(rounds["core"]), statistics.median(rounds["onnxruntime"])
        print(f"{batch:>5} {length:>6} {core:>8.3f} {ort_ms:>15.3f} {ort_ms / core:>5.2f}x")


if __name__ == "__main__":
    main()
