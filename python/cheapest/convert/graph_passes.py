"""Rewrites of a built fused graph into the one ONNX Runtime's CPU provider serves (`onnx/model_cpu.onnx`).

`cpu_graph(model)` replaces, in place:
  * every 4-bit linear at accuracy_level 0 - a MatMulNBits (or one per input-axis part, summed by Add, over a
    Split of the input) plus, for Q4_1, its block minimums (MatMul by the 0/1 block indicator, MatMul by the
    minimums, Add) - by one `cheapest.Q4Linear` on the same codes, scales and minimums, re-laid in the order
    of the core's kernel (rust/kernels/q4.rs: GGUF nibble order, minimums as [N, K/32] offsets; scales and
    offsets in fp16 where that is exact, see `_block_terms`);
  * every 8-bit linear at accuracy_level 0 - the fused graph's two exact 4-bit nibble planes (a Concat of the
    input with itself, one or more MatMulNBits over it split along K and summed by Add; quant_blocks.py) plus
    any block term (as for Q4_1) - by one `cheapest.Q8Linear` on the 8-bit codes the planes encode, stored as
    signed bytes (code - zero point), with their block scales (blocks of 32, or 16 for Q6_K's sub-blocks) and
    terms (rust/kernels/q8f.rs);
  * SwiGLU feeding such a linear (Split of gate|up, QuickGelu(alpha=1), Mul) by the linear's swiglu=1 input;
  * the per-head query and key norms of a packed QKV (Gemma 3's q_norm / k_norm: a Split, four Reshapes and two
    SimplifiedLayerNormalization a layer) by one `cheapest.QkNorm`, GroupQueryAttention then reading the packed
    QKV (rust/ortops/qk_norm.rs: the same bits as the nodes it replaces);
  * every GroupQueryAttention on a packed QKV with rotary embeddings by `cheapest.GroupAttention` (the same
    inputs, outputs and semantics, computed per query: rust/ortops/attention.rs);
  * a large 8-bit LM head (PLANES_MIN_WEIGHTS) the fused graph scores with int8 activations and rescores exactly
    in fp32 (MatMulNBits at accuracy_level 4, TopK, GatherBlockQuantized, MatMul, ScatterElements), with its embedding's
    GatherBlockQuantized on the same codes, by `cheapest.Q8HeadPlanes` and `cheapest.Q8GatherPlanes` over the
    codes split into two 4-bit planes (high and low nibbles, the same bytes; rust/kernels/q8planes.rs): the
    head scores every row from the high plane alone (half the bytes) with a rigorous per-row error bound and
    recomputes exactly the RESCORE best rows and every row that could still be the argmax, so greedy choices
    are those of the exact fp32 logits for any input and the rows top-k / top-p read are exact as before;
  * a smaller such head whose N is a multiple of 16 (SmolLM2's 49,152 x 576), with its embedding's and its
    rescored rows' GatherBlockQuantized, by `cheapest.Q8LinearInt8` (layout=1) and `cheapest.Q8GatherGrouped` on
    the codes re-laid in row groups of 16 (rust/kernels/q8g.rs: one integer dot product per lane and row, so a
    batch of rows of x costs ~2.3x less than in rows; the same bytes, stored once);
  * any other 8-bit MatMulNBits at accuracy_level 4 (an LM head's scoring pass: x rounded to int8 per block) by
    `cheapest.Q8LinearInt8`, the same arithmetic with AVX-512 VNNI, on the same codes (shared with the
    embedding's gather, read in place).

Why: a decode step of SmolLM2-135M ran 781 ONNX Runtime nodes, most of them tiny (the minimums' products, the
Adds, the K split that works around MatMulNBits' slow K=1536 fp32 kernel); each node is a dispatch and often
a synchronisation of the intra-op pool. The custom operator does a linear in one node, reads the weights
where the session keeps them (no prepacked second copy) and keeps fp32 activations, so the graph computes the
same GGUF weights to fp32 rounding. Nodes the pass does not recognise are left as they are: the result is
always a valid graph, just a slower one.

Gemma 3's projections with K=640 cannot be K-quants, so its GGUF stores them as Q5_0 / Q8_0 (and its down
projections as Q6_K): 144 MatMulNBits nibble planes with their Concat/Split/Add plumbing per decode step before
the 8-bit rewrite, one Q8Linear per projection after it.

The custom operators are CPU-only; the portable graph (`onnx/model.onnx`) stays what CUDA and other
providers load.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .graph_builder import MS_DOMAIN

CHEAPEST_DOMAIN = "cheapest"  # rust/ortops: registered by the core's library (engine loader)
BLOCK = 32
RESCORE = 64  # rows the head always recomputes exactly (rust/kernels/q8planes.rs)
# The planes head where the head is most of a decode step's bytes: Gemma 3's 262,144 x 640 head (1.25x faster
# steps, the exact set median 64 rows). SmolLM2's 49,152 x 576 head gained nothing (1.01x: its flatter logits
# leave 4-24 thousand rows within the bound, recomputed one by one) and keeps the int8 pass, whose far tail is
# closer to exact (~1 logit against ~3 from the high plane) for requests that sample the whole vocabulary.
PLANES_MIN_WEIGHTS = 64 * 1024 * 1024
ROW_GROUP = 8  # rows whose blocks are interleaved, so a kernel tile reads one stream (rust/kernels/q4.rs)
GROUP_ROWS = 16  # rows of a 4-bit linear multiplied with integer dot products together (rust/kernels/q4x.rs)
WIDE_VALUES = 4096  # fp16 block values a kernel tile widens at once: K/block * row_group (rust/kernels/mod.rs)


@dataclass
class _Graph:
    """Producer/consumer index over a graph's nodes, and its initializers by name."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: defaultdict(list))
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.initializers = {t.name: t for t in self.graph.initializer}

    def array(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None

    def fresh_name(self, base: str) -> str:
        """`base`, or `base` with a numeric suffix, unused as a value name in the graph."""
        name, i = base, 0
        while name in self.producer or name in self.consumers or name in self.initializers:
            i += 1
            name = f"{base}.{i}"
        return name

    def made_by(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


@dataclass
class _Rewrite:
    replaced: list[onnx.NodeProto]  # removed; the new node takes the place of the last of them
    node: onnx.NodeProto
    initializers: list[onnx.TensorProto]


def _ggml_nibble_order(b: np.ndarray) -> np.ndarray:
    """MatMulNBits' [N, blocks, 16] (byte j = elements 2j | 2j+1 << 4) -> the kernel's (j | j+16 << 4)."""
    q = np.stack([b & 0x0F, b >> 4], axis=-1).reshape(*b.shape[:-1], BLOCK)
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _interleave_rows(a: np.ndarray, group: int) -> np.ndarray:
    """[N, blocks, ...] -> blocks of `group` consecutive rows interleaved: [N/group, blocks, group, ...]."""
    n, blocks = a.shape[:2]
    grouped = a.reshape(n // group, group, blocks, *a.shape[2:]).swapaxes(1, 2)
    return np.ascontiguousarray(grouped).reshape(n, -1)


def _zero_point(g: _Graph, node: onnx.NodeProto, n: int) -> int | None:
    """The single zero point of a 4-bit MatMulNBits (8 when the input is absent); None if they differ."""
    if len(node.input) < 4 or not node.input[3]:
        return 8
    packed = g.array(node.input[3])
    if packed is None or packed.dtype != np.uint8:
        return None
    values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)
    first = int(values.flat[0])
    return first if np.all(values == first) else None


def _parts(g: _Graph, q: onnx.NodeProto) -> tuple[str, list[onnx.NodeProto], list[onnx.NodeProto], str] | None:
    """(x, MatMulNBits parts in K order, the Split/Add nodes joining them, the summed output) for the linear
    that MatMulNBits `q` belongs to; None unless `q` is its first part."""
    split = g.made_by(q.input[0], "Split")
    if split is None:
        return q.input[0], [q], [], q.output[0]
    if split.output[0] != q.input[0]:
        return None  # a later part: handled from the first one
    parts = []
    for out in split.output:
        user = g.only_consumer(out)
        if user is None or user.op_type != "MatMulNBits" or user.input[0] != out:
            return None
        parts.append(user)
    joins: list[onnx.NodeProto] = [split]
    total = parts[0].output[0]
    for part in parts[1:]:
        add = g.only_consumer(total)
        if add is None or add.op_type != "Add" or set(add.input) != {total, part.output[0]}:
            return None
        joins.append(add)
        total = add.output[0]
    return split.input[0], parts, joins, total


def _block_minimums(g: _Graph, x: str, y: str, k: int, n: int, block: int = BLOCK
                    ) -> tuple[np.ndarray, list[onnx.NodeProto], str] | None:
    """The block term `y + (x @ indicator) @ mins^T`: (offsets [N, K/block], its nodes, the output) or None."""
    add = g.only_consumer(y)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    corr = add.input[1] if add.input[0] == y else add.input[0]
    by_mins = g.made_by(corr, "MatMul")
    if by_mins is None or g.only_consumer(corr) is None:
        return None
    sums = g.made_by(by_mins.input[0], "MatMul")
    mins_t = g.array(by_mins.input[1])
    if sums is None or sums.input[0] != x or mins_t is None or mins_t.shape != (k // block, n):
        return None
    if g.only_consumer(sums.output[0]) is None:
        return None
    indicator = g.array(sums.input[1])
    expected = np.zeros((k, k // block), np.float32)
    expected[np.arange(k), np.arange(k) // block] = 1.0
    if indicator is None or indicator.shape != expected.shape or not np.array_equal(indicator, expected):
        return None
    return np.ascontiguousarray(mins_t.T.astype(np.float32)), [sums, by_mins, add], add.output[0]


def _block_terms(scales: np.ndarray, offsets: np.ndarray | None, group: int = 0) -> dict[str, np.ndarray]:
    """A linear's block scales (and offsets) [N, K/block] as the kernels read them: fp16 when every value is
    exactly an fp16 (GGUF's Q4_0 / Q4_1 / Q5_0 / Q8_0 block headers are fp16 themselves, so nothing changes but
    the bytes a decode step reads) and a kernel tile of `group` rows can widen them at once (WIDE_VALUES; 0: the
    kernel widens each block's own), else fp32 (K-quants: a super-block's fp16 scale times a 6-bit sub-scale)."""
    terms = {"scales": scales} if offsets is None else {"scales": scales, "offsets": offsets}
    exact = scales.shape[-1] * group <= WIDE_VALUES and all(
        np.array_equal(v.astype(np.float16).astype(np.float32), v) for v in terms.values())
    dtype = np.float16 if exact else np.float32
    return {name: v.astype(dtype) for name, v in terms.items()}


def _q4_linear(g: _Graph, q: onnx.NodeProto) -> _Rewrite | None:
    a = _attrs(q)
    if a.get("bits") != 4 or a.get("block_size") != BLOCK or a.get("accuracy_level", 0) != 0:
        return None
    found = _parts(g, q)
    if found is None:
        return None
    x, parts, joins, y = found
    n = int(a["N"])
    codes, scales, zero_points = [], [], set()
    for part in parts:
        pa = _attrs(part)
        b, s = g.array(part.input[1]), g.array(part.input[2])
        if b is None or s is None or pa.get("bits") != 4 or pa.get("block_size") != BLOCK or int(pa["N"]) != n:
            return None
        if pa.get("accuracy_level", 0) != 0 or len(part.input[1:]) > 3 or len(g.consumers[part.input[1]]) != 1:
            return None  # g_idx / bias inputs, or codes shared with another node (a tied embedding)
        blocks = int(pa["K"]) // BLOCK
        codes.append(_ggml_nibble_order(b.reshape(n, blocks, 16)))
        scales.append(s.reshape(n, blocks).astype(np.float32))
        zero_points.add(_zero_point(g, part, n))
    if len(zero_points) != 1 or None in zero_points:
        return None
    zero_point = zero_points.pop()
    assert zero_point is not None
    k = sum(int(_attrs(p)["K"]) for p in parts)
    replaced = [*parts, *joins]
    offsets = None
    minimums = _block_minimums(g, x, y, k, n)
    if minimums is not None:
        offsets, nodes, y = minimums
        replaced += nodes
    base = q.name.removesuffix(".0") or y
    all_codes, all_scales = np.concatenate(codes, axis=1), np.concatenate(scales, axis=1)
    if n % GROUP_ROWS == 0:
        # Groups of 16 rows, x as block integers (rust/kernels/q4x.rs): no fp16 widening buffer to fit.
        arrays = {"codes": _grouped_codes(all_codes), **{name: _interleave_rows(a, GROUP_ROWS) for name, a in
                                                         _block_terms(all_scales, offsets).items()}}
        layout = {"layout": 1}
    else:
        group = ROW_GROUP if n % ROW_GROUP == 0 else 1
        arrays = {name: _interleave_rows(a, group) for name, a in
                  {"codes": all_codes, **_block_terms(all_scales, offsets, group)}.items()}
        layout = {"row_group": group}
    inits = [numpy_helper.from_array(a, f"{base}.q4_{name}") for name, a in arrays.items()]
    node = helper.make_node("Q4Linear", [x, *(t.name for t in inits)], [y], name=base, domain=CHEAPEST_DOMAIN,
                            K=k, N=n, zero_point=zero_point)
    node.attribute.extend(helper.make_attribute(name, value) for name, value in layout.items())
    return _Rewrite(replaced, node, inits)


def _grouped_codes(codes: np.ndarray) -> np.ndarray:
    """GGUF-order 4-bit codes [N, K/32, 16] -> groups of 16 rows, each block's 16 bytes a row as four 64-byte lines
    of 4 bytes from every row (rust/kernels/q4x.rs): [N/16, K/32, 4, 16, 4], flattened to [N, K/2]."""
    n, half = codes.shape[0], codes[0].size
    lines = codes.reshape(n // GROUP_ROWS, GROUP_ROWS, half // 16, 4, 4).transpose(0, 2, 3, 1, 4)
    return np.ascontiguousarray(lines).reshape(n, half)


def _unpacked_zero_points(g: _Graph, node: onnx.NodeProto, n: int, blocks: int) -> np.ndarray | None:
    """A 4-bit MatMulNBits' zero points as uint8 [N, blocks] (8 when the input is absent); None if not constant."""
    if len(node.input) < 4 or not node.input[3]:
        return np.full((n, blocks), 8, np.uint8)
    packed = g.array(node.input[3])
    if packed is None or packed.dtype != np.uint8 or packed.size != n * ((blocks + 1) // 2):
        return None
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :blocks]


def _q8_linear(g: _Graph, q: onnx.NodeProto) -> _Rewrite | None:
    """The nibble planes of one 8-bit linear (q their first MatMulNBits) -> Q8Linear on the 8-bit codes."""
    a = _attrs(q)
    block = a.get("block_size")
    if a.get("bits") != 4 or block not in (16, 32) or a.get("accuracy_level", 0) != 0:
        return None
    found = _parts(g, q)
    concat = None if found is None else g.made_by(found[0], "Concat")
    if found is None or concat is None or g.only_consumer(concat.output[0]) is None:
        return None
    x = concat.input[0]
    if list(concat.input) != [x, x] or _attrs(concat).get("axis") != -1:
        return None
    _, parts, joins, y = found
    n = int(a["N"])
    planes, scales, zero_points = [], [], []
    for part in parts:
        pa = _attrs(part)
        blocks = int(pa["K"]) // block
        b, s = g.array(part.input[1]), g.array(part.input[2])
        zp = _unpacked_zero_points(g, part, n, blocks)
        if b is None or s is None or zp is None or (pa.get("bits"), pa.get("block_size"), int(pa["N"])) != (4, block, n):
            return None
        if pa.get("accuracy_level", 0) != 0 or len(part.input[1:]) > 3 or len(g.consumers[part.input[1]]) != 1:
            return None
        b = b.reshape(n, blocks, block // 2)
        planes.append(np.stack([b & 0x0F, b >> 4], axis=-1).reshape(n, blocks, block))
        scales.append(s.reshape(n, blocks).astype(np.float32))
        zero_points.append(zp)
    nibbles, scale, zps = (np.concatenate(p, axis=1) for p in (planes, scales, zero_points))
    nb = nibbles.shape[1] // 2
    if nibbles.shape[1] != 2 * nb or not np.array_equal(scale[:, nb:], scale[:, :nb] * np.float32(16)):
        return None  # not the low | high planes of one 8-bit matrix
    codes = nibbles[:, :nb].astype(np.int16) + 16 * nibbles[:, nb:].astype(np.int16)
    signed = codes - (zps[:, :nb].astype(np.int16) + 16 * zps[:, nb:].astype(np.int16))[..., None]
    if signed.min(initial=0) < -128 or signed.max(initial=0) > 127:
        return None
    k = nb * block
    replaced = [concat, *parts, *joins]
    offsets = None
    minimums = _block_minimums(g, x, y, k, n, block)
    if minimums is not None:
        offsets, nodes, y = minimums
        replaced += nodes
    base = q.name.removesuffix(".0") or y
    group = ROW_GROUP if n % ROW_GROUP == 0 else 1
    arrays = {"codes": signed.astype(np.int8), **_block_terms(scale[:, :nb], offsets, group)}
    inits = [numpy_helper.from_array(_interleave_rows(a, group), f"{base}.q8_{name}") for name, a in arrays.items()]
    node = helper.make_node("Q8Linear", [x, *(t.name for t in inits)], [y], name=base, domain=CHEAPEST_DOMAIN,
                            K=k, N=n, block=block, row_group=group)
    return _Rewrite(replaced, node, inits)


def _int8_scored(q: onnx.NodeProto) -> tuple[int, int] | None:
    """(K, N) of an 8-bit MatMulNBits at accuracy_level 4 (x rounded to int8 per block) without zero points, g_idx
    or bias inputs, else None."""
    a = _attrs(q)
    if a.get("bits") != 8 or a.get("block_size") != BLOCK or a.get("accuracy_level", 0) != 4 or len(q.input) != 3:
        return None
    return int(a["K"]), int(a["N"])


def _int8_head(g: _Graph, q: onnx.NodeProto) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """K, N, the uint8 codes and the fp32 scales [N, K/32] of such a MatMulNBits on constant initializers."""
    shape = _int8_scored(q)
    codes, scales = g.array(q.input[1]), g.array(q.input[2])
    if shape is None or codes is None or scales is None or codes.dtype != np.uint8:
        return None
    k, n = shape
    if codes.size != n * k:
        return None
    return k, n, codes, scales.reshape(n, k // BLOCK).astype(np.float32)


def _q8_linear_int8(g: _Graph, q: onnx.NodeProto) -> _Rewrite | None:
    shape = _int8_scored(q)
    if shape is None or q.input[1] not in g.initializers or q.input[2] not in g.initializers:
        return None
    scales = _same_data(g, q.input[2])  # the kernel reads values, not shapes: share the embedding's copy
    node = helper.make_node("Q8LinearInt8", [q.input[0], q.input[1], scales], list(q.output), name=q.name,
                            domain=CHEAPEST_DOMAIN, K=shape[0], N=shape[1])
    return _Rewrite([q], node, [])


def _one_user(g: _Graph, name: str, op_type: str, first: str | None = None) -> onnx.NodeProto | None:
    """The only consumer of `name` if it is an `op_type` (whose first input is `first`, when given)."""
    user = g.only_consumer(name)
    if user is None or user.op_type != op_type or (first is not None and user.input[0] != first):
        return None
    return user


def _rescored_head(g: _Graph, q: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """The fused graph's rescored LM head around its scoring MatMulNBits `q` (graph_fused._lm_head_rescored):
    [q, TopK, GatherBlockQuantized, Reshape, Unsqueeze, MatMul, Reshape, ScatterElements], or None."""
    x, codes, approx = q.input[0], q.input[1], q.output[0]
    users = sorted(g.consumers.get(approx, []), key=lambda u: u.op_type)
    if [u.op_type for u in users] != ["ScatterElements", "TopK"]:
        return None
    scatter, top_k = users
    k = g.array(top_k.input[1]) if len(top_k.input) > 1 else None
    if top_k.input[0] != approx or k is None or int(k.reshape(-1)[0]) > RESCORE or len(top_k.output) < 2:
        return None
    top = top_k.output[1]
    gather = next((u for u in g.consumers.get(top, []) if u.op_type == "GatherBlockQuantized"), None)
    if gather is None or gather.input[0] != codes or len(g.consumers[top]) != 2:
        return None
    rows = _one_user(g, gather.output[0], "Reshape")
    matmul = None if rows is None else _one_user(g, rows.output[0], "MatMul", rows.output[0])
    unsqueeze = None if matmul is None else g.made_by(matmul.input[1], "Unsqueeze")
    exact = None if matmul is None else _one_user(g, matmul.output[0], "Reshape")
    if rows is None or matmul is None or unsqueeze is None or exact is None or unsqueeze.input[0] != x:
        return None
    if list(scatter.input) != [approx, top, exact.output[0]] or _attrs(scatter).get("axis") != -1:
        return None
    return [q, top_k, gather, rows, unsqueeze, matmul, exact, scatter]


def _embedding_gather(g: _Graph, node: onnx.NodeProto, scales: np.ndarray) -> bool:
    """Whether `node` gathers rows of the head's codes with the head's scales (no zero points)."""
    a = _attrs(node)
    if node.op_type != "GatherBlockQuantized" or len(node.input) != 3 or node.domain != MS_DOMAIN:
        return False
    if (a.get("bits"), a.get("block_size"), a.get("gather_axis"), a.get("quantize_axis")) != (8, BLOCK, 0, 2):
        return False
    mine = g.array(node.input[2])
    return mine is not None and mine.size == scales.size and np.array_equal(mine.reshape(scales.shape), scales)


def _head_planes(g: _Graph, q: onnx.NodeProto, min_weights: int) -> list[_Rewrite] | None:
    """The rescored 8-bit head (of at least `min_weights` weights) and its embedding's gathers -> Q8HeadPlanes and
    Q8GatherPlanes on two planes."""
    found = _int8_head(g, q)
    if found is None or found[0] * found[1] < min_weights:
        return None
    k, n, codes, scales = found
    head = _rescored_head(g, q)
    if head is None:
        return None
    gathers = [u for u in g.consumers[q.input[1]] if u is not q and u is not head[2]]
    if not all(_embedding_gather(g, u, scales) for u in gathers):
        return None
    blocks = codes.reshape(n, k // BLOCK, BLOCK)

    def plane(nibbles: np.ndarray) -> np.ndarray:  # byte j of a block: element j | element j + 16 << 4
        return (nibbles[..., :16] | (nibbles[..., 16:] << 4)).astype(np.uint8).reshape(-1)

    inits = [numpy_helper.from_array(plane(blocks >> 4), f"{q.input[1]}.hi"),
             numpy_helper.from_array(plane(blocks & 15), f"{q.input[1]}.lo"),
             numpy_helper.from_array(_block_terms(scales, None)["scales"], f"{q.input[1]}.plane_scales")]
    weights = [t.name for t in inits]
    out = [_Rewrite(head, helper.make_node("Q8HeadPlanes", [q.input[0], *weights], list(head[-1].output),
                                           name=q.name, domain=CHEAPEST_DOMAIN, K=k, N=n), inits)]
    for gather in gathers:
        node = helper.make_node("Q8GatherPlanes", [gather.input[1], *weights], list(gather.output),
                                name=gather.name or gather.output[0], domain=CHEAPEST_DOMAIN, K=k, N=n)
        out.append(_Rewrite([gather], node, []))
    return out


def _head_grouped(g: _Graph, q: onnx.NodeProto) -> list[_Rewrite] | None:
    """An 8-bit head scored with int8 activations (MatMulNBits at accuracy_level 4) whose N is a multiple of
    GROUP_ROWS and whose codes are otherwise read only by gathers with its scales (the tied embedding, the rescored
    rows) -> `Q8LinearInt8` with layout=1 and `Q8GatherGrouped` on the codes and scales re-laid in row groups of 16
    (rust/kernels/q8g.rs: one lane per row; the same bytes, stored once)."""
    found = _int8_head(g, q)
    if found is None or found[1] % GROUP_ROWS:
        return None
    k, n, codes, scales = found
    gathers = [u for u in g.consumers[q.input[1]] if u is not q]
    if not all(_embedding_gather(g, u, scales) and u.input[0] == q.input[1] for u in gathers):
        return None
    # [group, row, block, line, byte] -> [group, block, line, row, byte]; scales [group, row, block] -> [g, b, row]
    lines = codes.reshape(n // GROUP_ROWS, GROUP_ROWS, k // BLOCK, BLOCK // 4, 4).transpose(0, 2, 3, 1, 4)
    by_group = scales.reshape(n // GROUP_ROWS, GROUP_ROWS, k // BLOCK).transpose(0, 2, 1)
    inits = [numpy_helper.from_array(np.ascontiguousarray(lines).reshape(-1), f"{q.input[1]}.grouped"),
             numpy_helper.from_array(np.ascontiguousarray(by_group).reshape(-1), f"{q.input[1]}.grouped_scales")]
    weights = [t.name for t in inits]
    out = [_Rewrite([q], helper.make_node("Q8LinearInt8", [q.input[0], *weights], list(q.output), name=q.name,
                                          domain=CHEAPEST_DOMAIN, K=k, N=n, layout=1), inits)]
    for gather in gathers:
        node = helper.make_node("Q8GatherGrouped", [gather.input[1], *weights], list(gather.output),
                                name=gather.name or gather.output[0], domain=CHEAPEST_DOMAIN, K=k, N=n)
        out.append(_Rewrite([gather], node, []))
    return out


def _same_data(g: _Graph, name: str) -> str:
    """Another initializer holding the same values (any shape), read by a node other than MatMulNBits, or `name`.
    The tied LM head's scales are the embedding gather's, reshaped."""
    mine = g.array(name)
    assert mine is not None
    for other, tensor in g.initializers.items():
        users = g.consumers.get(other, [])
        if other == name or not users or all(u.op_type == "MatMulNBits" for u in users):
            continue
        if tensor.data_type == g.initializers[name].data_type and np.prod(tensor.dims) == mine.size:
            data = g.array(other)
            if data is not None and np.array_equal(data.reshape(-1), mine.reshape(-1)):
                return other
    return name


def _swiglu_input(g: _Graph, linear: onnx.NodeProto, k: int) -> tuple[str, list[onnx.NodeProto]] | None:
    """gate|up and the Split, QuickGelu and Mul computing silu(gate) * up into `linear`, or None."""
    mul = g.made_by(linear.input[0], "Mul")
    if mul is None or g.only_consumer(mul.output[0]) is None:
        return None
    for act_in, up in (mul.input, mul.input[::-1]):
        gelu = g.made_by(act_in, "QuickGelu")
        if gelu is None or gelu.domain != MS_DOMAIN or abs(_attrs(gelu).get("alpha", 1.702) - 1.0) > 0:
            continue
        split = g.made_by(gelu.input[0], "Split")
        if split is None or list(split.output) != [gelu.input[0], up] or g.only_consumer(act_in) is None:
            continue
        if g.only_consumer(gelu.input[0]) is None or g.only_consumer(up) is None:
            continue
        sizes = g.array(split.input[1]) if len(split.input) > 1 and split.input[1] else None
        axis = _attrs(split).get("axis", 0)
        if sizes is None or [int(v) for v in sizes] != [k, k] or axis != -1:
            continue
        return split.input[0], [split, gelu, mul]
    return None


def _head_norm(g: _Graph, name: str, heads: int) -> tuple[list[onnx.NodeProto], str, float, int] | None:
    """The per-head RMS norm ending in `name` (Reshape to [.., heads, D], SimplifiedLayerNormalization, Reshape
    back, each read only by the next): its nodes, weight and epsilon, and D; None if `name` is not one."""
    back = g.made_by(name, "Reshape")
    norm = None if back is None else g.made_by(back.input[0], "SimplifiedLayerNormalization")
    fwd = None if norm is None else g.made_by(norm.input[0], "Reshape")
    if back is None or norm is None or fwd is None or len(norm.input) != 2:
        return None
    weight, attrs = g.array(norm.input[1]), _attrs(norm)
    if weight is None or weight.dtype != np.float32 or weight.ndim != 1 or attrs.get("axis", -1) != -1:
        return None
    dim = int(weight.shape[0])
    to_heads, back_shape = g.array(fwd.input[1]), g.array(back.input[1])
    if to_heads is None or back_shape is None:
        return None
    if [int(v) for v in to_heads] != [0, 0, heads, dim] or [int(v) for v in back_shape] != [0, 0, heads * dim]:
        return None
    if any(g.only_consumer(t) is None for t in (fwd.input[0], fwd.output[0], norm.output[0], back.output[0])):
        return None
    return [fwd, norm, back], norm.input[1], float(attrs.get("epsilon", 1e-5)), dim


def _qk_norm(g: _Graph, gqa: onnx.NodeProto) -> tuple[_Rewrite, str] | None:
    """A GroupQueryAttention whose query and key come from a packed QKV through a per-head RMS norm (Split,
    Reshape to heads, SimplifiedLayerNormalization, Reshape back; Gemma 3's q_norm / k_norm) -> one QkNorm on
    the packed QKV (rust/ortops/qk_norm.rs) and the name GroupQueryAttention reads as its packed input."""
    if gqa.domain != MS_DOMAIN or len(gqa.input) < 3 or not gqa.input[1] or not gqa.input[2]:
        return None
    a = _attrs(gqa)
    heads, kv_heads = int(a.get("num_heads", 0)), int(a.get("kv_num_heads", 0))
    q, k = _head_norm(g, gqa.input[0], heads), _head_norm(g, gqa.input[1], kv_heads)
    if q is None or k is None or q[2:] != k[2:]:
        return None
    (q_nodes, q_weight, epsilon, dim), (k_nodes, k_weight, _, _) = q, k
    split = g.made_by(q_nodes[0].input[0], "Split")
    if split is None or list(split.output) != [q_nodes[0].input[0], k_nodes[0].input[0], gqa.input[2]]:
        return None
    sizes = g.array(split.input[1]) if len(split.input) > 1 and split.input[1] else None
    if sizes is None or [int(v) for v in sizes] != [heads * dim, kv_heads * dim, kv_heads * dim]:
        return None
    if _attrs(split).get("axis", 0) != -1 or g.only_consumer(gqa.input[2]) is None:
        return None
    packed = g.fresh_name(f"{gqa.name}.qkv_normed")
    node = helper.make_node("QkNorm", [split.input[0], q_weight, k_weight], [packed], name=f"{gqa.name}.qk_norm",
                            domain=CHEAPEST_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, head_dim=dim,
                            epsilon=epsilon)
    return _Rewrite([split, *q_nodes, *k_nodes], node, []), packed


_ATTENTION_ATTRS = {"num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "local_window_size", "scale",
                    "softcap", "smooth_softmax"}


def _group_attention(gqa: onnx.NodeProto) -> _Rewrite | None:
    """A GroupQueryAttention on a packed QKV with rotary embeddings (halves not interleaved), no softcap and the
    plain softmax -> `cheapest.GroupAttention` on the same inputs and outputs (rust/ortops/attention.rs)."""
    if gqa.op_type != "GroupQueryAttention" or gqa.domain != MS_DOMAIN or len(gqa.input) != 9 or len(gqa.output) != 3:
        return None
    a = _attrs(gqa)
    if (set(a) - _ATTENTION_ATTRS or a.get("do_rotary") != 1 or a.get("rotary_interleaved", 0) != 0
            or a.get("softcap", 0.0) != 0.0 or a.get("smooth_softmax", 0) != 0):
        return None
    qkv, key, value, *rest = gqa.input
    if key or value or not all(rest):
        return None
    kept = {name: a[name] for name in ("num_heads", "kv_num_heads", "scale", "local_window_size") if name in a}
    node = helper.make_node("GroupAttention", [qkv, *rest], list(gqa.output), name=gqa.name, domain=CHEAPEST_DOMAIN,
                            **kept)
    return _Rewrite([gqa], node, [])


def _skip_norm(g: _Graph, order: dict[tuple[str, ...], int], linear: onnx.NodeProto) -> _Rewrite | None:
    """A SkipSimplifiedLayerNormalization (no bias, gamma an initializer of K values, its normalized output read
    only by `linear`, a Q4Linear without swiglu or a Q8Linear) folded into that linear: inputs [x, codes, scales,
    offsets, skip, gamma], attribute epsilon, outputs [y, the norm's residual sum where the graph reads it]. A step
    runs one node instead of two (rust/ortops/q4_linear.rs; the same bits)."""
    a = _attrs(linear)
    norm = g.made_by(linear.input[0], "SkipSimplifiedLayerNormalization")
    if (norm is None or norm.domain != MS_DOMAIN or a.get("swiglu", 0) or "epsilon" in a or len(norm.input) != 3
            or "epsilon" not in _attrs(norm)):
        return None
    k = int(a["K"])
    gamma = g.array(norm.input[2])
    if gamma is None or gamma.dtype != np.float32 or gamma.size != k or g.only_consumer(norm.output[0]) is not linear:
        return None
    outputs = list(norm.output) + [""] * (4 - len(norm.output))
    if any(name and g.consumers.get(name) for name in outputs[1:3]) or norm.input[1] in g.initializers:
        return None  # mean / inverse std read, or a constant skip (broadcast): left to ONNX Runtime
    readers = g.consumers.get(outputs[3], []) if outputs[3] else []
    if any(order[_key(user)] < order[_key(linear)] for user in readers):
        return None  # the residual is read before the linear, where the folded node will stand
    weights = list(linear.input[1:4]) + [""] * (4 - len(linear.input))
    node = helper.make_node(linear.op_type, [norm.input[0], *weights[:3], norm.input[1], norm.input[2]],
                            [linear.output[0]] + ([outputs[3]] if readers else []),
                            name=linear.name, domain=CHEAPEST_DOMAIN, **a,
                            epsilon=float(_attrs(norm)["epsilon"]))
    return _Rewrite([norm, linear], node, [])


def cpu_graph(model: onnx.ModelProto, planes_min_weights: int = PLANES_MIN_WEIGHTS, *,
              fold_norms: bool = True) -> onnx.ModelProto:
    """Rewrite `model` (the fused graph) in place for the CPU provider and return it. A tied 8-bit LM head of at
    least `planes_min_weights` weights is scored from two planes, a smaller one with int8 activations;
    `fold_norms=False` leaves the norms before the linears to ONNX Runtime (to measure and test the fold)."""
    g = _Graph(model.graph)
    rewrites: list[_Rewrite] = []
    for node in list(model.graph.node):
        if node.op_type != "MatMulNBits":
            continue
        head = _head_planes(g, node, planes_min_weights) or _head_grouped(g, node)
        if head is not None:
            rewrites += head
        elif (r := _q8_linear(g, node) or _q4_linear(g, node) or _q8_linear_int8(g, node)) is not None:
            rewrites.append(r)
    _apply(model, rewrites)
    g = _Graph(model.graph)
    fused = []
    for node in list(model.graph.node):
        if node.op_type != "Q4Linear" or node.domain != CHEAPEST_DOMAIN:
            continue
        a = _attrs(node)
        found = _swiglu_input(g, node, int(a["K"]))
        if found is None:
            continue
        gate_up, nodes = found
        new = helper.make_node("Q4Linear", [gate_up, *node.input[1:]], list(node.output), name=node.name,
                               domain=CHEAPEST_DOMAIN, **a, swiglu=1)
        fused.append(_Rewrite([*nodes, node], new, []))
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention" and (found_qk := _qk_norm(g, node)) is not None:
            fused.append(found_qk[0])
            node.input[0], node.input[1], node.input[2] = found_qk[1], "", ""  # packed QKV
    _apply(model, fused)
    _apply(model, [r for node in model.graph.node if (r := _group_attention(node)) is not None])
    if fold_norms:
        g = _Graph(model.graph)
        order = {_key(n): i for i, n in enumerate(model.graph.node)}
        _apply(model, [r for node in model.graph.node
                       if node.op_type in ("Q4Linear", "Q8Linear") and node.domain == CHEAPEST_DOMAIN
                       and (r := _skip_norm(g, order, node))])
    used = {i for node in model.graph.node for i in node.input}
    for i in reversed(range(len(model.graph.initializer))):
        if model.graph.initializer[i].name not in used:
            del model.graph.initializer[i]
    custom = any(n.domain == CHEAPEST_DOMAIN for n in model.graph.node)
    if custom and not any(o.domain == CHEAPEST_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CHEAPEST_DOMAIN, 1))
    return model


def _key(node: onnx.NodeProto) -> tuple[str, ...]:
    return tuple(node.output)  # output names are unique in a graph: they identify the node


def _apply(model: onnx.ModelProto, rewrites: list[_Rewrite]) -> None:
    """Each rewrite's node takes the place of the last node it replaces (its inputs exist before that point and
    its output is read only after it), so node order stays topological."""
    position = {_key(n): i for i, n in enumerate(model.graph.node)}
    gone: set[tuple[str, ...]] = set()
    placed: dict[tuple[str, ...], onnx.NodeProto] = {}
    for r in rewrites:
        gone.update(_key(n) for n in r.replaced)
        placed[max((_key(n) for n in r.replaced), key=position.__getitem__)] = r.node
    nodes = []
    for node in model.graph.node:
        key = _key(node)
        if key not in gone:
            kept = onnx.NodeProto()
            kept.CopyFrom(node)
            nodes.append(kept)
        elif key in placed:
            nodes.append(placed[key])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for r in rewrites:
        model.graph.initializer.extend(r.initializers)
