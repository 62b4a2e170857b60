"""Every supported architecture on a tiny random-weight GGUF written here, converted, and checked against an
independent float64 numpy forward of the same weights (fixtures_arch.numpy_forward).

Tolerances: the fp32 graph vs numpy, 1e-3 absolute on logits of magnitude ~5-30 (fp32 rounding); the fused graph
(accuracy_level 0) vs numpy, the 16 best logits within 2e-3 and every logit within 5% of the largest (the tail
of an 8-bit LM head is scored with int8 activations). Each model mixes the tensor types of its kind of file.
Windowed models are also driven through the engine past their window, with both graphs, so the KV cache's
handling of sliding windows is checked against the same numpy forward.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cheapest_core import _cheapest_core
from fixtures_arch import numpy_forward, write_arch_gguf
from fixtures_model import assert_fused_logits, collect_generation, graph_feed
from gguf import GGMLQuantizationType as Q

from cheapest.convert import graph_passes
from cheapest.convert.converter import convert
from cheapest.convert.gguf_reader import UnsupportedModelError, read_gguf
from cheapest.engine.onnx_engine import load_engine
from cheapest.engine.types import SamplingParams

REF_TOL = 1e-3
FUSED_TOL = 2e-3
WINDOW = 5
PROMPT = [1, 5, 80, 100, 200, 281, 7, 9, 3, 4, 44, 45]  # longer than WINDOW

ARCHS = {
    "llama": dict(types={"q": Q.Q4_K, "k": Q.Q4_K, "v": Q.Q6_K, "o": Q.Q5_0, "gate": Q.Q3_K, "up": Q.Q3_K,
                         "down": Q.Q2_K, "embd": Q.Q8_0}),
    "mistral": dict(arch="llama", sliding_window=WINDOW,
                    types={"q": Q.Q4_0, "k": Q.Q4_0, "v": Q.Q8_0, "o": Q.Q4_K, "down": Q.Q6_K, "embd": Q.Q4_K,
                           "output": Q.Q6_K}),
    "qwen2": dict(types={"q": Q.Q5_K, "k": Q.Q5_K, "v": Q.Q5_K, "o": Q.Q4_1, "gate": Q.Q4_K, "up": Q.Q4_K,
                         "down": Q.Q6_K}),
    "qwen3": dict(head_dim=128, types={"q": Q.Q4_K, "k": Q.Q4_K, "v": Q.Q6_K, "o": Q.Q5_1, "down": Q.Q8_0,
                                       "embd": Q.Q6_K}),
    "phi3": dict(n_head_kv=4, sliding_window=WINDOW,
                 types={"q": Q.Q5_1, "o": Q.BF16, "up": Q.Q4_K, "down": Q.F16, "embd": Q.Q8_0, "output": Q.Q8_0}),
    "gemma3": dict(n_layer=6, n_head_kv=1, head_dim=128, sliding_window=WINDOW, softcap=20.0,
                   types={"q": Q.Q5_0, "k": Q.Q5_0, "v": Q.Q8_0, "o": Q.Q4_K, "gate": Q.Q5_0, "up": Q.Q5_0,
                          "down": Q.Q6_K, "embd": Q.Q8_0}),
}


_CONVERTED: dict[str, tuple[str, Path, Path]] = {}


def _convert(name: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    if name not in _CONVERTED:
        options = dict(ARCHS[name])
        arch = str(options.pop("arch", name))
        folder = tmp_path_factory.mktemp(name)
        gguf = write_arch_gguf(folder / f"{name}.gguf", arch, **options)  # type: ignore[arg-type]
        _CONVERTED[name] = (name, gguf, convert(gguf, folder / "model"))
    return _CONVERTED[name]


@pytest.fixture(params=list(ARCHS))
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    return _convert(request.param, tmp_path_factory)


@pytest.fixture(params=["mistral", "gemma3"])
def windowed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    return _convert(request.param, tmp_path_factory)


def _logits(model_dir: Path, graph: str, ids: list[int]) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(_cheapest_core.__file__)  # model_cpu.onnx's operators
    session = ort.InferenceSession(str(model_dir / "onnx" / graph), so, providers=["CPUExecutionProvider"])
    config = json.loads((model_dir / "config.json").read_text())
    return session.run(["logits"], graph_feed(config, np.array([ids])))[0][0]


def test_reference_graph_matches_numpy(converted: tuple[str, Path, Path]) -> None:
    _, gguf, model_dir = converted
    expected = numpy_forward(gguf, PROMPT)
    assert np.abs(expected).max() > 3  # logits are not trivially small
    np.testing.assert_allclose(_logits(model_dir, "model_fp32.onnx", PROMPT), expected, atol=REF_TOL, rtol=0)


def test_fused_graph_matches_numpy(converted: tuple[str, Path, Path]) -> None:
    _, gguf, model_dir = converted
    assert_fused_logits(_logits(model_dir, "model.onnx", PROMPT)[0], numpy_forward(gguf, PROMPT)[-1], FUSED_TOL)


def test_cpu_graph_matches_the_fused_graph(converted: tuple[str, Path, Path]) -> None:
    """model_cpu.onnx (the core's Q4Linear / Q8Linear for every block type they take) gives the portable fused
    graph's best logits and argmax to fp32 rounding: the same GGUF weights, summed in another order (the tail of
    a tied 8-bit head is scored from the codes' high nibbles there, so it is held to the tail tolerance). No 8-bit
    linear is left to ONNX Runtime's nibble planes."""
    _, _, model_dir = converted
    fused, cpu = (_logits(model_dir, graph, PROMPT)[0] for graph in ("model.onnx", "model_cpu.onnx"))
    assert_fused_logits(cpu, fused, 1e-4 * np.abs(fused).max(), graph="model_cpu.onnx")
    nodes = onnx.load(str(model_dir / "onnx" / "model_cpu.onnx"), load_external_data=False).graph.node
    assert not [n.name for n in nodes if n.op_type == "Concat" and len(set(n.input)) == 1]



def test_qk_norm_fuses_to_the_same_bits(tmp_path_factory: pytest.TempPathFactory,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-head query / key norms of a packed QKV (Split, Reshape, SimplifiedLayerNormalization, Reshape) become
    one QkNorm per layer feeding GroupQueryAttention the packed QKV, and the logits at every position are the
    same bits as with the nodes it replaces. (qwen3 here has q / k / v of different block types, so no packed
    QKV to fuse: its graph keeps the norms.)"""
    _, _, model_dir = _convert("gemma3", tmp_path_factory)
    fused = onnx.load(str(model_dir / "onnx" / "model.onnx"))
    kept = onnx.ModelProto()
    kept.CopyFrom(fused)
    config = json.loads((model_dir / "config.json").read_text())

    def logits(model: onnx.ModelProto) -> np.ndarray:
        so = ort.SessionOptions()
        so.register_custom_ops_library(_cheapest_core.__file__)
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return session.run(["logits"], graph_feed(config, np.array([PROMPT])))[0]

    # GroupQueryAttention stays ONNX Runtime's in both (GroupAttention sums in another order; it takes only a
    # packed QKV, so it would replace the attention of one graph alone).
    monkeypatch.setattr(graph_passes, "_group_attention", lambda node: None)
    with_qk = graph_passes.cpu_graph(fused)
    monkeypatch.setattr(graph_passes, "_qk_norm", lambda g, node: None)
    without = graph_passes.cpu_graph(kept)
    ops = [n.op_type for n in with_qk.graph.node]
    assert ops.count("QkNorm") == config["num_hidden_layers"] and "Split" not in ops[:ops.index("QkNorm") + 1]
    assert [n.op_type for n in without.graph.node].count("QkNorm") == 0
    assert np.array_equal(logits(with_qk), logits(without))

@pytest.mark.parametrize("graph", ["model.onnx", "model_cpu.onnx", "model_fp32.onnx"])
def test_engine_greedy_past_the_window(windowed: tuple[str, Path, Path], graph: str) -> None:
    """Greedy decoding through the engine's KV cache (shared buffer / concatenating) equals recomputing the
    whole sequence in numpy at every step; two prompts share the batch."""
    _, gguf, model_dir = windowed
    prompts = [PROMPT, PROMPT[3:8]]
    steps = 2 * WINDOW
    expected = []
    for prompt in prompts:
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(np.argmax(numpy_forward(gguf, seq)[-1])))
        expected.append(seq[len(prompt):])
    engine = load_engine(model_dir, threads=2, graph=graph)
    params = SamplingParams(max_tokens=steps, temperature=0.0)

    async def main() -> list[list[int]]:
        tokenizer = engine.tokenizer
        runs = await asyncio.gather(*(collect_generation(engine, p, params) for p in prompts))
        await engine.close()
        return [tokenizer.encode("".join(d.text for d in deltas), add_special_tokens=False) for deltas, _ in runs]

    texts = asyncio.run(main())
    for got, want in zip(texts, expected):
        assert got == engine.tokenizer.encode(engine.tokenizer.decode(want), add_special_tokens=False)


def test_config_describes_the_architecture(converted: tuple[str, Path, Path]) -> None:
    name, _, model_dir = converted
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == {"gemma3": "gemma3_text"}.get(name, name)
    assert config.get("sliding_window") == ARCHS[name].get("sliding_window")
    if name == "gemma3":
        assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
        assert config["rope_local_base_freq"] == 10000.0 and config["rope_theta"] == 1_000_000.0


def test_unsupported_architecture_refused_in_under_a_second(tmp_path: Path) -> None:
    path = write_arch_gguf(tmp_path / "mamba.gguf", "mamba", n_layer=1)
    started = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'mamba'"):
        read_gguf(path)
    print(f"refused in {1000 * (time.perf_counter() - started):.1f} ms")
