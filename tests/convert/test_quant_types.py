"""Every GGUF tensor type the converter reads, on random blocks: its ONNX Runtime block form reproduces the
`gguf` package's own dequantization bit for bit, and the fused graph's linear layer on it equals a float64
numpy product of the dequantized weights.

Tolerance of the linear layer: 2e-5 relative to the largest output (fp32 accumulation over K = 512 in a
different order; the weights themselves are exact). Types outside the list are refused by name from the
header alone, before any tensor data is read.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fixtures_arch import BLOCK_TYPES, weight_bytes, write_arch_gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from cheapest.convert.gguf_reader import SUPPORTED_TYPES, GGUFTensor, UnsupportedModelError, read_gguf
from cheapest.convert.graph_builder import FLOAT, GraphBuilder
from cheapest.convert.graph_fused import _linear
from cheapest.convert.quant_blocks import BlockLinear, DenseLinear, linear_weight

ROWS, COLS = 24, 512  # two K-quant super-blocks per row
LINEAR_RTOL = 2e-5
TYPES = BLOCK_TYPES + [Q.BF16, Q.F16, Q.F32]


def _tensor(qtype: Q, seed: int = 0) -> GGUFTensor:
    raw = weight_bytes(qtype, ROWS, COLS, np.random.default_rng(seed), 0.05)
    return GGUFTensor("w", qtype, ROWS, COLS, np.ascontiguousarray(raw).view(np.uint8).reshape(ROWS, -1))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantization_is_bit_exact(qtype: Q) -> None:
    t = _tensor(qtype)
    expected = np.asarray(dequantize(t.raw, qtype), np.float32).reshape(ROWS, COLS)
    lin = linear_weight(t)
    assert isinstance(lin, DenseLinear if qtype in (Q.F32, Q.F16, Q.BF16) else BlockLinear)
    np.testing.assert_array_equal(lin.dequantize(), expected)
    if isinstance(lin, BlockLinear) and lin.bits == 8:  # the fused graph's exact 4-bit form of 8-bit codes
        planes = lin.nibble_planes().dequantize()
        np.testing.assert_array_equal(planes[:, :COLS] + planes[:, COLS:], expected - (
            0 if lin.mins is None else np.repeat(lin.mins, lin.block_size, axis=1)))


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_fused_linear_layer_matches_numpy(qtype: Q, level: int) -> None:
    t = _tensor(qtype, seed=1)
    lin = linear_weight(t)
    g = GraphBuilder("linear")
    g.input("x", FLOAT, ["batch", "seq", COLS])
    g.output("y", FLOAT, ["batch", "seq", ROWS])
    g.op("Identity", [_linear(g, "x", lin, "w", level)], output="y")
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((2, 3, COLS)).astype(np.float32)
    got = session.run(["y"], {"x": x})[0]
    expected = x.astype(np.float64) @ dequantize(t.raw, qtype).reshape(ROWS, COLS).astype(np.float64).T
    if level == 4 and isinstance(lin, BlockLinear):  # int8 activations: llama.cpp-like precision, not exact
        assert np.sqrt(np.mean((got - expected) ** 2) / np.mean(expected ** 2)) < 0.02
        return
    np.testing.assert_allclose(got, expected, rtol=0, atol=LINEAR_RTOL * np.abs(expected).max())


def test_supported_types_are_the_listed_ones() -> None:
    assert set(SUPPORTED_TYPES) == set(TYPES)


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ2_XXS, Q.TQ1_0, Q.TQ2_0], ids=lambda q: q.name)
def test_unsupported_type_refused_from_the_header(qtype: Q, tmp_path: Path) -> None:
    """The file is cut right after its header: a refusal that needed tensor data would fail differently."""
    path = write_arch_gguf(tmp_path / "bad.gguf", "llama", types={"down": qtype}, n_layer=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 4])  # tensor data starts well before a quarter of the file
    started = time.perf_counter()
    with pytest.raises(UnsupportedModelError, match=rf"blk\.0\.ffn_down\.weight has unsupported type {qtype.name}"):
        read_gguf(path)
    print(f"{qtype.name} refused in {1000 * (time.perf_counter() - started):.1f} ms")
