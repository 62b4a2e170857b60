"""graph_passes.cpu_graph on random 4- and 8-bit blocks: the core's Q4Linear and Q8Linear against ONNX Runtime's
MatMulNBits subgraphs they replace and against numpy with the dequantized weights (fast).

Tolerance: fp32 products summed in a different order; 1e-5 of the sum of |w * x| over the row, i.e. a few
fp32 ulps of the terms, far below the 1e-3 the model-level tests allow.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from cheapest.convert.graph_builder import FLOAT, INT64, MS_DOMAIN, GraphBuilder
from cheapest.convert.graph_fused import _embedding_rows, _linear, _lm_head_rescored
from cheapest.convert.graph_passes import CHEAPEST_DOMAIN, cpu_graph
from cheapest.engine.loader import session_options
from cheapest.convert.quant_blocks import BLOCK, BlockLinear

REL_TOL = 1e-5


def random_linear(rng: np.random.Generator, n: int, k: int, q4_1: bool) -> BlockLinear:
    """Q4_1 (zero point 0, block minimums) or Q4_0 (zero point 8), codes in MatMulNBits' nibble order."""
    nb = k // BLOCK
    codes = rng.integers(0, 256, (n, nb, BLOCK // 2), dtype=np.uint8)
    scales = (rng.random((n, nb), dtype=np.float32) * 0.1).astype(np.float32)
    if q4_1:
        mins = (rng.random((n, nb), dtype=np.float32) - 0.5).astype(np.float32)
        return BlockLinear(n, k, 4, codes, scales, np.zeros((n, nb), np.uint8), mins)
    return BlockLinear(n, k, 4, codes, scales, np.full((n, nb), 8, np.uint8), None)


def _model(g: GraphBuilder, k: int, n: int) -> onnx.ModelProto:
    g.output("y", FLOAT, ["batch", "seq", n])
    model = g.model()
    model.graph.input[0].CopyFrom(helper.make_tensor_value_info("x", FLOAT, ["batch", "seq", k]))
    return model


def linear_model(lin: BlockLinear) -> onnx.ModelProto:
    g = GraphBuilder("linear")
    x = g.input("x", FLOAT, ["batch", "seq", lin.k])
    g.op("Identity", [_linear(g, x, lin, "proj", 0)], output="y")
    return _model(g, lin.k, lin.n)


def swiglu_model(gate_up: BlockLinear, down: BlockLinear) -> onnx.ModelProto:
    """The fused graph's MLP: one gate|up product, Split, QuickGelu(alpha=1) * up, the down projection."""
    g = GraphBuilder("mlp")
    x = g.input("x", FLOAT, ["batch", "seq", gate_up.k])
    gu = _linear(g, x, gate_up, "gate_up", 0)
    gate, up = g.ops("Split", [gu, g.const([down.k, down.k])], outputs=2, axis=-1)
    act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0), up])
    g.op("Identity", [_linear(g, act, down, "down", 0)], output="y")
    return _model(g, gate_up.k, down.n)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), session_options(2), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["y"], {"x": x})[0])


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def assert_close(got: np.ndarray, want: np.ndarray, magnitude: np.ndarray) -> None:
    assert np.all(np.abs(got.astype(np.float64) - want) <= REL_TOL * magnitude + 1e-6)


def assert_both_match_numpy(lin: BlockLinear, x: np.ndarray, before: np.ndarray, rewritten: onnx.ModelProto) -> None:
    """The rewritten one-node graph and the subgraph it replaced (`before`) both give x @ W^T to fp32 rounding, and
    only initializers the new node reads are left (the MatMulNBits codes, indicator and minimums are gone)."""
    got = run(rewritten, x)
    w = lin.dequantize().astype(np.float64)
    want = x.astype(np.float64) @ w.T
    magnitude = np.abs(x.astype(np.float64)) @ np.abs(w).T
    assert_close(got, want, magnitude)
    assert_close(before, want, magnitude)
    assert {t.name for t in rewritten.graph.initializer} == set(rewritten.graph.node[0].input[1:])


@pytest.mark.parametrize(("n", "k", "q4_1"), [(40, 64, True), (24, 96, False), (72, 1536, True), (16, 32, True), (12, 64, True),
                                              (48, 576, False), (64, 1536, True)])
@pytest.mark.parametrize("rows", [(1, 1), (1, 5), (3, 1), (2, 7)])
def test_q4_linear_matches_matmulnbits_and_numpy(n: int, k: int, q4_1: bool, rows: tuple[int, int]) -> None:
    """N a multiple of 16 takes the grouped layout (integer dot products, x as block integers), else the rows one."""
    rng = np.random.default_rng(n * k + rows[0] * 10 + rows[1])
    lin = random_linear(rng, n, k, q4_1)
    x = rng.standard_normal((*rows, k), dtype=np.float32)
    portable = linear_model(lin)
    before = run(portable, x)
    rewritten = cpu_graph(linear_model(lin))
    assert ops(rewritten) == ["Q4Linear", "Identity"]
    assert rewritten.graph.node[0].domain == CHEAPEST_DOMAIN
    assert {a.name: a.i for a in rewritten.graph.node[0].attribute}.get("layout", 0) == (1 if n % 16 == 0 else 0)
    assert {o.domain for o in rewritten.opset_import} >= {CHEAPEST_DOMAIN}
    assert_both_match_numpy(lin, x, before, rewritten)


def random_8bit_linear(rng: np.random.Generator, n: int, k: int, block: int, mins: bool) -> BlockLinear:
    """8-bit codes with zero point 128 (Q5_0, Q8_0, Q6_K's blocks of 16), and block terms like Q5_1 / Q5_K."""
    nb = k // block
    codes = rng.integers(0, 256, (n, nb, block), dtype=np.uint8)
    scales = (rng.random((n, nb), dtype=np.float32) * 0.01).astype(np.float32)
    terms = (rng.random((n, nb), dtype=np.float32) - 0.5).astype(np.float32) if mins else None
    return BlockLinear(n, k, 8, codes, scales, np.full((n, nb), 128, np.uint8), terms, block)


@pytest.mark.parametrize(("n", "k", "block", "mins"),
                         [(40, 64, 32, False), (24, 640, 32, False), (16, 2048, 16, False), (12, 96, 16, True),
                          (48, 640, 32, True)])
@pytest.mark.parametrize("rows", [(1, 1), (2, 7)])
def test_q8_linear_replaces_the_nibble_planes(n: int, k: int, block: int, mins: bool, rows: tuple[int, int]) -> None:
    """The fused graph's two 4-bit planes over [x, x] (and Split/Add, and the block term's products) become one
    Q8Linear on the 8-bit codes: the same fp32 product as the planes and as numpy."""
    rng = np.random.default_rng(n * k + block + rows[1])
    lin = random_8bit_linear(rng, n, k, block, mins)
    x = rng.standard_normal((*rows, k), dtype=np.float32)
    before = run(linear_model(lin), x)
    rewritten = cpu_graph(linear_model(lin))
    assert ops(rewritten) == ["Q8Linear", "Identity"]
    node = rewritten.graph.node[0]
    assert node.domain == CHEAPEST_DOMAIN and {a.name: a.i for a in node.attribute}["block"] == block
    assert_both_match_numpy(lin, x, before, rewritten)


def _as_fp16_values(lin: BlockLinear) -> BlockLinear:
    """The same linear with its scales and terms on a 1/1024 grid: fp16 values, as GGUF's Q4_0/Q4_1/Q5_0/Q8_0
    headers are, and so are the fused graph's Q4_1 terms m + 8d."""
    def rounded(v: np.ndarray | None) -> np.ndarray | None:
        return None if v is None else (np.round(v * 1024) / 1024).astype(np.float32)
    return BlockLinear(lin.n, lin.k, lin.bits, lin.codes, rounded(lin.scales), lin.zero_points, rounded(lin.mins),
                       lin.block_size)


def _stored_types(model: onnx.ModelProto) -> set[int]:
    node = model.graph.node[0]
    return {t.data_type for t in model.graph.initializer if t.name in node.input[2:]}


@pytest.mark.parametrize("kind", ["q4_0", "q4_1", "q8", "q8_terms"])
def test_block_scales_are_stored_in_fp16_exactly_when_they_are_fp16_values(kind: str) -> None:
    """Scales (and offsets) that are exactly fp16 - every GGUF Q4_0/Q4_1/Q5_0/Q8_0 tensor - are stored in fp16 and
    give the same bits as the fp32 graph; a tensor with any value an fp16 cannot hold stays fp32."""
    rng = np.random.default_rng(7)
    if kind.startswith("q4"):
        lin = random_linear(rng, 48, 576, kind == "q4_1")
    else:
        lin = random_8bit_linear(rng, 48, 640, 32, kind == "q8_terms")
    x = rng.standard_normal((2, 3, lin.k), dtype=np.float32)
    halves = _as_fp16_values(lin)
    narrow = cpu_graph(linear_model(halves))
    assert _stored_types(narrow) == {onnx.TensorProto.FLOAT16}
    assert _stored_types(cpu_graph(linear_model(lin))) == {onnx.TensorProto.FLOAT}  # random fp32 values
    wide = cpu_graph(linear_model(halves))
    for t in wide.graph.initializer:  # the same values written as fp32: what the converter wrote before
        if t.data_type == onnx.TensorProto.FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    assert np.array_equal(run(narrow, x), run(wide, x))
    assert_both_match_numpy(halves, x, run(linear_model(halves), x), narrow)


def test_swiglu_moves_into_the_down_projection() -> None:
    rng = np.random.default_rng(7)
    hidden, inner = 64, 96
    gate_up, down = random_linear(rng, 2 * inner, hidden, True), random_linear(rng, hidden, inner, True)
    x = rng.standard_normal((2, 3, hidden), dtype=np.float32)
    before = run(swiglu_model(gate_up, down), x)
    rewritten = cpu_graph(swiglu_model(gate_up, down))
    assert ops(rewritten) == ["Q4Linear", "Q4Linear", "Identity"]
    assert [a.i for a in rewritten.graph.node[1].attribute if a.name == "swiglu"] == [1]
    got = run(rewritten, x)
    gu = x.astype(np.float64) @ gate_up.dequantize().astype(np.float64).T
    act = gu[..., :inner] / (1 + np.exp(-gu[..., :inner])) * gu[..., inner:]
    w = down.dequantize().astype(np.float64)
    magnitude = np.abs(act) @ np.abs(w).T
    assert_close(got, act @ w.T, magnitude * 10)  # act itself carries the first product's rounding
    assert_close(before, act @ w.T, magnitude * 10)


def skip_norm_model(lin: BlockLinear, *, residual_read: bool) -> onnx.ModelProto:
    """The fused graph's pre-norm: SkipSimplifiedLayerNormalization(x, skip, gamma) into a linear, its residual sum
    read further on (an output here) or not at all."""
    g = GraphBuilder("prenorm")
    x = g.input("x", FLOAT, ["batch", "seq", lin.k])
    skip = g.input("skip", FLOAT, ["batch", "seq", lin.k])
    gamma = g.weight("gamma", (np.linspace(0.5, 1.5, lin.k) * np.resize([1.0, -0.75], lin.k)).astype(np.float32))
    normed, _, _, residual = g.ops("SkipSimplifiedLayerNormalization", [x, skip, gamma], outputs=4, domain=MS_DOMAIN,
                                   epsilon=1e-5)
    g.op("Identity", [_linear(g, normed, lin, "proj", 0)], output="y")
    if residual_read:
        g.op("Identity", [residual], output="sum")
        g.output("sum", FLOAT, ["batch", "seq", lin.k])
    return _model(g, lin.k, lin.n)


@pytest.mark.parametrize(("n", "k", "kind"), [(48, 576, "q4_0"), (64, 96, "q4_1"), (40, 64, "q4_1"), (48, 640, "q5_0"),
                                              (24, 96, "q6_k")])
@pytest.mark.parametrize("residual_read", [True, False])
def test_skip_norm_folds_into_the_following_linear_with_the_same_bits(n: int, k: int, kind: str,
                                                                      residual_read: bool) -> None:
    """One Q4Linear (or Q8Linear) where there were a SkipSimplifiedLayerNormalization and the linear, and the same
    bits: the normalized rows are ONNX Runtime's (its sum of squares in its order), so y and the residual sum are
    equal to the unfolded pair's, for one row and several, grouped (N % 16 == 0) and row layouts, 8-bit codes in
    blocks of 32 and 16."""
    rng = np.random.default_rng(n + k)
    lin = (random_linear(rng, n, k, kind == "q4_1") if kind.startswith("q4")
           else random_8bit_linear(rng, n, k, 16 if kind == "q6_k" else 32, False))
    folded = cpu_graph(skip_norm_model(lin, residual_read=residual_read))
    linear = "Q4Linear" if kind.startswith("q4") else "Q8Linear"
    assert ops(folded) == [linear, "Identity"] + (["Identity"] if residual_read else [])
    assert [a.f for a in folded.graph.node[0].attribute if a.name == "epsilon"] == [pytest.approx(1e-5)]
    assert len(folded.graph.node[0].output) == (2 if residual_read else 1)
    unfolded = cpu_graph(skip_norm_model(lin, residual_read=residual_read), fold_norms=False)  # ONNX Runtime's norm
    assert ops(unfolded)[:2] == ["SkipSimplifiedLayerNormalization", linear]
    names = ["y", "sum"] if residual_read else ["y"]
    for shape in [(1, 1), (2, 5), (8, 1)]:
        feeds = {"x": (rng.standard_normal((*shape, k)) * 3).astype(np.float32),
                 "skip": (rng.standard_normal((*shape, k)) * 5).astype(np.float32)}
        got = ort.InferenceSession(folded.SerializeToString(), session_options(2),
                                   providers=["CPUExecutionProvider"]).run(names, feeds)
        want = ort.InferenceSession(unfolded.SerializeToString(), session_options(2),
                                    providers=["CPUExecutionProvider"]).run(names, feeds)
        for a, b in zip(got, want):
            assert np.array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))


def test_unrecognised_nodes_are_left_alone() -> None:
    """accuracy_level 4 asks for int8 activations: the pass keeps ONNX Runtime's operator for it."""
    rng = np.random.default_rng(3)
    lin = random_linear(rng, 16, 64, False)
    g = GraphBuilder("level4")
    x = g.input("x", FLOAT, ["batch", "seq", 64])
    g.op("Identity", [_linear(g, x, lin, "proj", 4)], output="y")
    model = _model(g, 64, 16)
    assert ops(cpu_graph(model)) == ["MatMulNBits", "Identity"]


def test_lm_head_scoring_pass_uses_the_int8_kernel() -> None:
    """MatMulNBits 8-bit at accuracy_level 4 (x rounded to int8 per block) -> cheapest.Q8LinearInt8: the same
    approximation, so both stay within int8 rounding of the fp32 product and close to each other."""
    rng = np.random.default_rng(11)
    n, k = 300, 96
    codes = rng.integers(0, 256, (n, k // BLOCK, BLOCK), dtype=np.uint8)
    scales = (rng.random((n, k // BLOCK), dtype=np.float32) * 0.02).astype(np.float32)
    g = GraphBuilder("head")
    x = g.input("x", FLOAT, ["batch", "seq", k])
    g.op("MatMulNBits", [x, g.weight("codes", codes), g.weight("scales", scales)], output="y", domain=MS_DOMAIN,
         K=k, N=n, bits=8, block_size=BLOCK, accuracy_level=4)
    xs = rng.standard_normal((2, 1, k), dtype=np.float32)
    before = run(_model(g, k, n), xs)
    g.outputs.clear()
    rewritten = cpu_graph(_model(g, k, n))
    assert ops(rewritten) == ["Q8LinearInt8"]
    got = run(rewritten, xs)
    g.outputs.clear()
    shared = _model(g, k, n)  # the embedding's gather holds the same scales as [N, K/32, 1]: the head reads those
    shared.graph.initializer.append(onnx.numpy_helper.from_array(scales[..., None], "gather_scales"))
    shared.graph.node.append(helper.make_node("Identity", ["gather_scales"], ["gathered"]))
    shared.graph.output.append(helper.make_tensor_value_info("gathered", FLOAT, None))
    assert cpu_graph(shared).graph.node[0].input[2] == "gather_scales"
    assert "scales" not in {t.name for t in shared.graph.initializer}
    w = ((codes.astype(np.float64) - 128) * scales[..., None]).reshape(n, k)
    exact = xs.astype(np.float64) @ w.T
    magnitude = np.abs(xs.astype(np.float64)) @ np.abs(w).T
    assert np.all(np.abs(got - exact) <= 0.02 * magnitude)
    assert np.all(np.abs(before - exact) <= 0.02 * magnitude)
    assert np.all(np.abs(got - before) <= 0.01 * magnitude)


def rescored_head_model(lin: BlockLinear) -> onnx.ModelProto:
    """The fused graph's tied 8-bit embedding and rescored LM head: ids -> rows, x -> y."""
    g = GraphBuilder("tied_head")
    ids = g.input("ids", INT64, ["batch", "seq"])
    x = g.input("x", FLOAT, ["batch", 1, lin.k])
    g.op("Identity", [_embedding_rows(g, ids, lin, lin.k)], output="rows")
    g.op("Identity", [_lm_head_rescored(g, x, lin, True, lin.k, 0)], output="y")
    g.output("rows", FLOAT, ["batch", "seq", lin.k])
    g.output("y", FLOAT, ["batch", 1, lin.n])
    return g.model()


@pytest.mark.parametrize(("n", "k", "winners"), [(300, 96, 0), (1000, 640, 3), (200, 576, 40)])
def test_tied_8bit_head_reads_two_planes_and_keeps_the_exact_argmax(n: int, k: int, winners: int) -> None:
    """The rescored head and its embedding's gather become Q8HeadPlanes and Q8GatherPlanes on two 4-bit planes of
    the same bytes: embedding rows identical; the argmax, its logit and at least 64 rows (the best coarse ones) exact to fp32 rounding;
    every row left coarse scores below the winner. `winners` rows aligned with x make a clear top (few
    candidates) or, with none, random rows make a flat one (many)."""
    rng = np.random.default_rng(n + k + winners)
    lin = random_8bit_linear(rng, n, k, BLOCK, False)
    x = rng.standard_normal((3, 1, k), dtype=np.float32)
    for row in range(winners):
        lin.codes[row] = np.where(x[row % 3, 0] > 0, 200 + row % 50, 56 - row % 50).reshape(k // BLOCK, BLOCK)
    ids = rng.integers(0, n, (2, 5), dtype=np.int64)
    feeds = {"ids": ids, "x": x}
    session = ort.InferenceSession(rescored_head_model(lin).SerializeToString(), session_options(2))
    rows_before, before = session.run(["rows", "y"], feeds)
    assert "Q8HeadPlanes" not in ops(cpu_graph(rescored_head_model(lin))), "small heads keep the int8 pass"
    rewritten = cpu_graph(rescored_head_model(lin), planes_min_weights=0)
    assert ops(rewritten) == ["Q8GatherPlanes", "Reshape", "Identity", "Q8HeadPlanes", "Identity"]
    planes = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert sum(a.nbytes for name, a in planes.items() if name.endswith((".hi", ".lo"))) == lin.codes.nbytes
    session = ort.InferenceSession(rewritten.SerializeToString(), session_options(2))
    rows, got = session.run(["rows", "y"], feeds)
    assert np.array_equal(rows, rows_before)
    w = lin.dequantize().astype(np.float64)
    exact = x[:, 0].astype(np.float64) @ w.T
    magnitude = np.abs(x[:, 0].astype(np.float64)) @ np.abs(w).T
    got = got[:, 0].astype(np.float64)
    tol = REL_TOL * magnitude + 1e-6
    for b in range(3):
        best = int(np.argmax(got[b]))
        assert abs(got[b, best] - exact[b, best]) <= tol[b, best]
        assert exact[b, best] >= exact[b].max() - 2 * tol[b].max()
        coarse = np.abs(got[b] - exact[b]) > tol[b]
        assert np.count_nonzero(~coarse) >= min(64, n)
        assert np.all(got[b, coarse] < got[b, best])
        assert best == int(np.argmax(before[b, 0])) or abs(exact[b, best] - exact[b].max()) <= 2 * tol[b].max()


@pytest.mark.parametrize(("n", "k"), [(320, 96), (1024, 576)])
def test_tied_int8_head_in_row_groups_of_16(n: int, k: int) -> None:
    """A head whose N is a multiple of 16 keeps the int8 pass, on its codes re-laid in row groups of 16 (one
    Q8LinearInt8 with layout=1; both gathers Q8GatherGrouped on the same bytes): the embedding rows and the
    rescored rows are GatherBlockQuantized's bits, the scores within int8 rounding of ONNX Runtime's, and the
    best row the exact product's."""
    rng = np.random.default_rng(n + k)
    lin = random_8bit_linear(rng, n, k, BLOCK, False)
    x = rng.standard_normal((3, 1, k), dtype=np.float32)
    ids = rng.integers(0, n, (2, 5), dtype=np.int64)
    feeds = {"ids": ids, "x": x}
    rows_before, before = ort.InferenceSession(rescored_head_model(lin).SerializeToString(),
                                               session_options(2)).run(["rows", "y"], feeds)
    rewritten = cpu_graph(rescored_head_model(lin))
    kinds = [(n.op_type, _attrs_of(n).get("layout")) for n in rewritten.graph.node if n.domain == CHEAPEST_DOMAIN]
    assert sorted(kinds, key=str) == [("Q8GatherGrouped", None), ("Q8GatherGrouped", None), ("Q8LinearInt8", 1)]
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    assert sum(a.nbytes for a in stored.values() if a.dtype == np.uint8) == lin.codes.nbytes  # stored once
    rows, got = ort.InferenceSession(rewritten.SerializeToString(), session_options(2)).run(["rows", "y"], feeds)
    assert np.array_equal(rows, rows_before)
    w = lin.dequantize().astype(np.float64)
    exact = x[:, 0].astype(np.float64) @ w.T
    magnitude = np.abs(x[:, 0].astype(np.float64)) @ np.abs(w).T
    assert np.all(np.abs(got[:, 0] - before[:, 0]) <= 0.01 * magnitude)
    assert np.array_equal(np.argmax(got[:, 0], axis=-1), np.argmax(exact, axis=-1))


def _attrs_of(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def test_scales_too_wide_for_a_tile_stay_fp32() -> None:
    """fp16 scales are widened a tile at a time (K/32 * row group of them at most, WIDE_VALUES): a wider matrix
    keeps fp32 scales, which the kernel reads in place, instead of failing to load."""
    from cheapest.convert.graph_passes import WIDE_VALUES, _block_terms
    halves = np.full((8, WIDE_VALUES // 8), 0.5, np.float32)
    assert _block_terms(halves, None, 8)["scales"].dtype == np.float16
    wide = np.full((8, WIDE_VALUES // 8 + 1), 0.5, np.float32)
    assert _block_terms(wide, wide, 8)["scales"].dtype == np.float32
    assert _block_terms(wide, None, 0)["scales"].dtype == np.float16  # a kernel that widens per block
