"""The fused graph served on CPU and CUDA (`onnx/model.onnx`), built from ONNX Runtime contrib operators.

  embedding     GatherBlockQuantized on the GGUF blocks (Q8_0/Q4_0/Q4_1) or Gather (F16/F32)
  projections   MatMulNBits on the GGUF blocks as stored (q|k|v and gate|up merged); Q4_1 block minimums
                applied exactly (quant_blocks.py)
  norms         SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (residual adds fused)
  attention     GroupQueryAttention, packed QKV, rotary inside (do_rotary=1, half-split layout)
  activation    QuickGelu(alpha=1) = SiLU, times up
  lm head       MatMulNBits on the (tied) embedding blocks, for the last real token of each row only

Precision: accuracy_level 0 (default) keeps activations in fp32, so the fused graph computes exactly the GGUF's
weights in fp32 and matches the reference graph to ~1e-4. accuracy_level 4 quantizes activations to int8 per
32-block (as llama.cpp does): ~1.6x faster decode, logits off by up to ~2 on SmolLM2 - enough to flip near-ties
(for "What is the capital of France?" SmolLM2's top two first tokens are 0.08 apart in fp32, and llama.cpp
itself answers "L'Étoile..." there). An 8-bit (Q8_0) LM head at level 0 scores all tokens with int8 activations
and recomputes the RESCORE_TOP best in fp32 (see the LM head below): those logits are exact, the tail is not.

Inputs / outputs:
  input_ids       int64 [B, S]
  attention_mask  int64 [B, T]   T = past + S (the cache length after this step)
  position_ids    int64 [B, S]   accepted for I/O compatibility; IGNORED (positions come from attention_mask)
  past_key_values.{i}.key / .value  float32 [B, n_kv_heads, past, head_dim]
  -> logits       float32 [B, 1, vocab]   logits of the LAST REAL token of each row only
  -> present.{i}.key / .value       float32 [B, n_kv_heads, T, head_dim]

Padding convention: RIGHT padding, one cache row per sequence.
  Row b's real tokens occupy cache slots 0 .. L_b - 1 (L_b = attention_mask[b].sum(), counting this
  step's tokens), and attention_mask[b] = [1] * L_b + [0] * (T - L_b). Rotary position of a token = its slot.
  * Prefill (no past, past length 0): S = max prompt length, prompts right-padded with any id; a batch of
    prompts of different lengths is allowed. Logits are those of slot L_b - 1.
  * Prefill with a past (chunked prompt / appended turn): batch size 1 only (GroupQueryAttention rule).
  * Decode (S = 1): one new token per row; its K/V is written at slot L_b - 1, so pass
    attention_mask[b] = [1] * (old_L_b + 1) + [0] * (T - old_L_b - 1). The `past` tensors may be longer
    than any row (a preallocated buffer): the present tensors then keep that length
    (T = past length, ONNX Runtime's shared past/present buffer mode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from gguf import MODEL_TENSOR

from cheapest.model_layout import LOGITS, present_names

from .gguf_reader import QKV, GGUFModel, HParams
from .graph_builder import FLOAT, MS_DOMAIN, GraphBuilder, GraphIO, declare_io, ffn_norm_name, rope_tables
from .quant_blocks import BlockLinear, DenseLinear, Linear, concat_rows, linear_weight

RESCORE_TOP = 64  # LM-head logits recomputed exactly at accuracy_level 0 (see _lm_head_rescored)
ACCURACY_LEVEL = 0  # fp32 activations; 4 = int8 activations (faster, llama.cpp-like precision)
MAX_PART_K = 768  # see _linear


# --- linear layers ----------------------------------------------------------------------------------------------


def _linear(g: GraphBuilder, x: str, lin: Linear, name: str, level: int, bias: np.ndarray | None = None) -> str:
    if isinstance(lin, DenseLinear):
        y = g.op("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(lin.weight.T))], name=name)
    else:
        y = _block_linear(g, x, lin, name, level)
    if bias is not None:
        y = g.op("Add", [y, g.weight(f"{name}.bias", bias.astype(np.float32))])
    return y


def _block_linear(g: GraphBuilder, x: str, lin: BlockLinear, name: str, level: int) -> str:
    mins = lin.mins
    if lin.bits == 8 and level != 4:
        # The fp32-activation 8-bit kernel dequantizes the whole matrix per call (~40x slower than 4-bit):
        # run the exact 4-bit nibble planes over [x, x] instead (quant_blocks.py).
        planes = lin.nibble_planes()
        y = _matmul_nbits_split(g, g.op("Concat", [x, x], axis=-1), planes, planes.packed_zero_points(), name,
                                level)
    elif mins is not None and lin.bits == 4 and not lin.zero_points.any():
        # d*q + m == d*(q - 8) + (m + 8d). The operator's default zero point (8) avoids the zero-point input,
        # which makes the fp32-activation kernel ~5% slower; m + 8d is rounded once to fp32 (the weights stay
        # the GGUF's 4-bit codes, scales and minimums).
        mins = mins + np.float32(lin.default_zero_point) * lin.scales
        y = _matmul_nbits_split(g, x, lin, None, name, level)
    else:
        y = _matmul_nbits_split(g, x, lin, lin.packed_zero_points(), name, level)
    if mins is None:
        return y
    # The additive block term: + the sum over each block of x, times the block's term. The block sums are one
    # product with a 0/1 block indicator (fewer nodes than Reshape + ReduceSum).
    indicator = np.zeros((lin.k, lin.n_blocks), np.float32)
    indicator[np.arange(lin.k), np.arange(lin.k) // lin.block_size] = 1.0
    sums = g.op("MatMul", [x, g.const(indicator, np.float32)])
    corr = g.op("MatMul", [sums, g.weight(f"{name}.mins", np.ascontiguousarray(mins.T))])
    return g.op("Add", [y, corr])


def _matmul_nbits_split(g: GraphBuilder, x: str, lin: BlockLinear, zp: np.ndarray | None, name: str,
                        level: int) -> str:
    parts = _k_parts(lin, level)
    if parts == 1:
        return _matmul_nbits(g, x, lin.codes, lin.scales, zp, name, lin.k, lin.n, lin.bits, lin.block_size, level)
    # ONNX Runtime's fp32-activation 4-bit kernel runs ~1.6x fewer MACs/s at K=1536 than at K<=768
    # (measured, SmolLM2's down projection): split the input axis at block boundaries and add.
    step = lin.n_blocks // parts
    xs = g.ops("Split", [x, g.const([step * lin.block_size] * parts)], outputs=parts, axis=-1)
    y: str | None = None
    for j, xj in enumerate(xs):
        blocks = slice(j * step, (j + 1) * step)
        zpj = None if zp is None else zp[:, j * step // 2:(j + 1) * step // 2]
        yj = _matmul_nbits(g, xj, lin.codes[:, blocks], lin.scales[:, blocks], zpj, f"{name}.{j}",
                           step * lin.block_size, lin.n, lin.bits, lin.block_size, level)
        y = yj if y is None else g.op("Add", [y, yj])
    assert y is not None  # parts >= 2
    return y


def _k_parts(lin: BlockLinear, level: int) -> int:
    """Input-axis pieces for one projection: 1 unless K > MAX_PART_K at fp32 activations and the blocks split
    evenly (zero points, packed two per byte, must split on a byte boundary)."""
    if lin.bits != 4 or level == 4:
        return 1
    for parts in range(1, lin.n_blocks + 1):
        step, rest = divmod(lin.n_blocks, parts)
        if step * lin.block_size <= MAX_PART_K and not rest and (parts == 1 or step % 2 == 0):
            return parts
    return 1


def _matmul_nbits(g: GraphBuilder, x: str, codes: np.ndarray | str, scales: np.ndarray, zp: np.ndarray | None,
                  name: str, k: int, n: int, bits: int, block_size: int, level: int) -> str:
    """`codes`: the code array, or the name of an initializer already holding it (a tied embedding)."""
    code_input = codes if isinstance(codes, str) else g.weight(f"{name}.qweight", np.ascontiguousarray(codes))
    inputs = [x, code_input, g.weight(f"{name}.scales", np.ascontiguousarray(scales))]
    if zp is not None:
        inputs.append(g.weight(f"{name}.qzeros", np.ascontiguousarray(zp)))
    return g.op("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=bits, block_size=block_size,
                accuracy_level=level)


def _linear_group(g: GraphBuilder, x: str, parts: list[Linear], name: str, level: int,
                  biases: list[np.ndarray] | None = None, *, split: bool = True) -> list[str]:
    """Weights sharing an input: one product, split into the parts' outputs (or, split=False, left packed as
    one output); separate products if their encodings differ."""
    merged = concat_rows(parts)
    if merged is None:
        return [_linear(g, x, p, f"{name}.{j}", level, None if biases is None else biases[j])
                for j, p in enumerate(parts)]
    y = _linear(g, x, merged, name, level, None if biases is None else np.concatenate(biases))
    if not split:
        return [y]
    return g.ops("Split", [y, g.const([p.n for p in parts])], outputs=len(parts), axis=-1)


# --- embedding --------------------------------------------------------------------------------------------------

EMBED_CODES = "model.embed_tokens.qweight"  # shared with the LM head when the embedding is tied
EMBED_GATHER_SCALES = "model.embed_tokens.gather_scales"


def _embedding(g: GraphBuilder, ids: str, lin: Linear, hidden: int, scale: float) -> str:
    h = _embedding_rows(g, ids, lin, hidden)
    if scale != 1.0:
        h = g.op("Mul", [h, g.const(np.float32(scale), np.float32)])
    return h


def _embedding_rows(g: GraphBuilder, ids: str, lin: Linear, hidden: int) -> str:
    if isinstance(lin, DenseLinear):
        return g.op("Gather", [g.weight("model.embed_tokens.weight", lin.weight), ids], axis=0)
    data = g.weight(EMBED_CODES, lin.codes)
    if lin.bits == 8 and lin.mins is None:
        # Blocks run along the last axis: one block per [row, block] pair; zero point 128 = default.
        inputs = [data, ids, g.weight(EMBED_GATHER_SCALES, lin.scales[..., None])]
        if not np.all(lin.zero_points == lin.default_zero_point):
            inputs.append(g.weight("model.embed_tokens.gather_zeros", lin.zero_points[..., None]))
        rows = g.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN, bits=8, block_size=lin.block_size,
                    gather_axis=0, quantize_axis=2)
        return g.op("Reshape", [rows, g.const([0, 0, hidden])])
    # Gather the code rows, unpack 4-bit ones with plain operators (runs once per step, on S rows only), then
    # apply scale, zero point and additive term.
    packed = g.op("Gather", [data, ids], axis=0)
    if lin.bits == 4:
        lo = g.op("Unsqueeze", [g.op("BitwiseAnd", [packed, g.const(15, np.uint8)]), g.const([-1])])
        hi = g.op("Unsqueeze", [g.op("BitShift", [packed, g.const(4, np.uint8)], direction="RIGHT"),
                                g.const([-1])])
        packed = g.op("Concat", [lo, hi], axis=-1)
    q = g.op("Cast", [g.op("Reshape", [packed, g.const([0, 0, lin.n_blocks, lin.block_size])])], to=FLOAT)
    zp = g.weight("model.embed_tokens.gather_zeros", lin.zero_points[..., None].astype(np.float32))
    sc = g.weight(EMBED_GATHER_SCALES, lin.scales[..., None])
    w = g.op("Mul", [g.op("Sub", [q, g.op("Gather", [zp, ids], axis=0)]), g.op("Gather", [sc, ids], axis=0)])
    if lin.mins is not None:
        mins = g.weight("model.embed_tokens.gather_mins", lin.mins[..., None])
        w = g.op("Add", [w, g.op("Gather", [mins, ids], axis=0)])
    return g.op("Reshape", [w, g.const([0, 0, hidden])])


# --- decoder layers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attention:
    """GroupQueryAttention's per-step inputs, shared by every layer."""

    seqlens_k: str  # int32 [B]: real tokens per row - 1
    total_len: str  # int32 scalar: T
    lengths: str  # int64 [B]: real tokens per row
    t_len: str  # int64 [1]: T
    rotary: dict[float, tuple[str, str]]  # rope base -> (cos, sin) caches


def _attention_inputs(g: GraphBuilder, io: GraphIO, hp: HParams) -> _Attention:
    # seqlens_k = real tokens per row - 1; total_sequence_length = T (GroupQueryAttention's contract).
    lengths = g.op("ReduceSum", [io.attention_mask, g.const([1])], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.const(1)])], to=6)
    t_len = g.op("Gather", [g.op("Shape", [io.attention_mask]), g.const(1)], axis=0)
    total_len = g.op("Cast", [t_len], to=6)
    rotary = {}
    for j, base in enumerate(hp.rope_bases):
        cos_t, sin_t = rope_tables(hp.head_dim, base, hp.context_length)
        suffix = "" if j == 0 else f"_{j}"
        rotary[base] = (g.weight(f"rotary.cos_cache{suffix}", cos_t), g.weight(f"rotary.sin_cache{suffix}", sin_t))
    return _Attention(seqlens_k, total_len, lengths, t_len, rotary)


class _Residual:
    """The residual stream: `pending` is the value still to be added before the next norm, which fuses the add
    (SkipSimplifiedLayerNormalization)."""

    def __init__(self, first: str) -> None:
        self.pending = first
        self.residual: str | None = None

    def norm(self, g: GraphBuilder, weight: str, eps: float) -> str:
        if self.residual is None:
            self.residual = self.pending
            return g.op("SimplifiedLayerNormalization", [self.pending, weight], axis=-1, epsilon=eps, stash_type=1)
        x, _, _, self.residual = g.ops("SkipSimplifiedLayerNormalization", [self.pending, self.residual, weight],
                                       domain=MS_DOMAIN, outputs=[g.fresh("norm"), "", "", g.fresh("residual")],
                                       epsilon=eps)
        return x

    def total(self, g: GraphBuilder) -> str:
        assert self.residual is not None  # at least one layer ran
        return g.op("Add", [self.pending, self.residual])


def _norm_weight(g: GraphBuilder, model: GGUFModel, i: int, kind: MODEL_TENSOR, name: str) -> str:
    return g.weight(f"model.layers.{i}.{name}.weight", model.layer(i, kind).vector())


def _head_norm(g: GraphBuilder, x: str, weight: str, heads: int, head_dim: int, eps: float) -> str:
    """RMSNorm of each head: [B, S, heads * D] -> the same shape, normalised over every D-wide slice."""
    split = g.op("Reshape", [x, g.const([0, 0, heads, head_dim])])
    normed = g.op("SimplifiedLayerNormalization", [split, weight], axis=-1, epsilon=eps, stash_type=1)
    return g.op("Reshape", [normed, g.const([0, 0, heads * head_dim])])


def _attention(g: GraphBuilder, model: GGUFModel, i: int, x: str, att: _Attention, past: tuple[str, str],
               level: int) -> str:
    hp = model.hparams
    eps = float(hp.rms_norm_eps)
    prefix = f"model.layers.{i}"
    biases = [model.bias(i, kind) for kind in QKV]
    qkv = _linear_group(g, x, [linear_weight(model.layer(i, kind)) for kind in QKV], f"{prefix}.attn.qkv_proj", level,
                        None if biases[0] is None else [b for b in biases if b is not None], split=hp.qk_norm)
    q, k, v = qkv if len(qkv) == 3 else (qkv[0], "", "")  # packed QKV: no separate key / value inputs
    if hp.qk_norm:
        q = _head_norm(g, q, _norm_weight(g, model, i, MODEL_TENSOR.ATTN_Q_NORM, "self_attn.q_norm"), hp.n_head,
                       hp.head_dim, eps)
        k = _head_norm(g, k, _norm_weight(g, model, i, MODEL_TENSOR.ATTN_K_NORM, "self_attn.k_norm"), hp.n_head_kv,
                       hp.head_dim, eps)
    cos, sin = att.rotary[hp.rope_base(i)]
    window = hp.window(i)
    # local_window_size = W reproduces "query position - key position < W" (checked against numpy in tests)
    attrs: dict[str, int | float] = {} if window is None else {"local_window_size": window}
    if hp.attention_scale is not None:
        attrs["scale"] = hp.scale
    attn, _, _ = g.ops("GroupQueryAttention", [q, k, v, past[0], past[1], att.seqlens_k, att.total_len, cos, sin],
                       domain=MS_DOMAIN, name=f"{prefix}.attn.gqa", outputs=[g.fresh("attn"), *present_names(i)],
                       num_heads=hp.n_head, kv_num_heads=hp.n_head_kv, do_rotary=1, rotary_interleaved=0, **attrs)
    o = _linear(g, attn, linear_weight(model.layer(i, MODEL_TENSOR.ATTN_OUT)), f"{prefix}.attn.o_proj", level)
    if hp.post_norms:
        o = g.op("SimplifiedLayerNormalization",
                 [o, _norm_weight(g, model, i, MODEL_TENSOR.ATTN_POST_NORM, "post_attention_layernorm")],
                 axis=-1, epsilon=eps, stash_type=1)
    return o


def _mlp(g: GraphBuilder, model: GGUFModel, i: int, x: str, level: int) -> str:
    hp = model.hparams
    prefix = f"model.layers.{i}"
    gate_up = [linear_weight(model.layer(i, MODEL_TENSOR.FFN_GATE)), linear_weight(model.layer(i, MODEL_TENSOR.FFN_UP))]
    gate, up = _linear_group(g, x, gate_up, f"{prefix}.mlp.gate_up_proj", level)
    if hp.activation == "gelu_tanh":
        act = g.op("FastGelu", [gate], domain=MS_DOMAIN)  # GELU, tanh approximation
    else:
        act = g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0)  # QuickGelu(alpha=1) = SiLU
    y = _linear(g, g.op("Mul", [act, up]), linear_weight(model.layer(i, MODEL_TENSOR.FFN_DOWN)),
                f"{prefix}.mlp.down_proj", level)
    if hp.post_norms:
        y = g.op("SimplifiedLayerNormalization",
                 [y, _norm_weight(g, model, i, MODEL_TENSOR.FFN_POST_NORM, "post_feedforward_layernorm")],
                 axis=-1, epsilon=float(hp.rms_norm_eps), stash_type=1)
    return y


def _decoder_layer(g: GraphBuilder, model: GGUFModel, i: int, stream: _Residual, att: _Attention,
                   past: tuple[str, str], level: int) -> None:
    eps = float(model.hparams.rms_norm_eps)
    x = stream.norm(g, _norm_weight(g, model, i, MODEL_TENSOR.ATTN_NORM, "input_layernorm"), eps)
    stream.pending = _attention(g, model, i, x, att, past, level)
    x2 = stream.norm(g, _norm_weight(g, model, i, MODEL_TENSOR.FFN_NORM, ffn_norm_name(model.hparams)), eps)
    stream.pending = _mlp(g, model, i, x2, level)


def _last_token(g: GraphBuilder, io: GraphIO, att: _Attention, hidden_states: str, hidden: int) -> str:
    """[B, 1, H]: the hidden state of each row's last real token, slot L_b - 1, i.e. index L_b - 1 - past within
    this step (clipped for decode rows shorter than the longest one, whose only new token is index 0)."""
    s_len = g.op("Gather", [g.op("Shape", [io.input_ids]), g.const(1)], axis=0)
    idx = g.op("Sub", [g.op("Sub", [att.lengths, g.const(1)]), g.op("Sub", [att.t_len, s_len])])
    idx = g.op("Max", [g.op("Min", [idx, g.op("Sub", [s_len, g.const(1)])]), g.const(0)])
    gather_idx = g.op("Expand", [g.op("Reshape", [idx, g.const([-1, 1, 1])]),
                                 g.op("Concat", [g.op("Shape", [idx]), g.const([1, hidden])], axis=0)])
    return g.op("GatherElements", [hidden_states, gather_idx], axis=1)


# --- LM head ----------------------------------------------------------------------------------------------------


def _lm_head(g: GraphBuilder, normed: str, head: Linear, tied: bool, hp: HParams, level: int) -> None:
    if isinstance(head, BlockLinear) and head.bits == 8 and np.all(head.zero_points == head.default_zero_point) \
            and head.mins is None:
        logits = _lm_head_rescored(g, normed, head, tied, hp.hidden_size, level)
    elif tied and isinstance(head, BlockLinear) and head.bits == 4:
        logits = _matmul_nbits(g, normed, EMBED_CODES, head.scales, head.packed_zero_points(), "lm_head", head.k,
                               head.n, head.bits, head.block_size, level)
        if head.mins is not None:
            blocks = g.op("Reshape", [normed, g.const([0, 0, head.n_blocks, head.block_size])])
            sums = g.op("ReduceSum", [blocks, g.const([-1])], keepdims=0)
            mins = g.weight("lm_head.mins", np.ascontiguousarray(head.mins.T))
            logits = g.op("Add", [logits, g.op("MatMul", [sums, mins])])
    else:
        logits = _linear(g, normed, head, "lm_head", level)
    cap = hp.final_logit_softcap
    if cap is not None:  # monotonic: the rescored top tokens stay the top tokens
        capped = g.op("Tanh", [g.op("Div", [logits, g.const(np.float32(cap), np.float32)])])
        logits = g.op("Mul", [capped, g.const(np.float32(cap), np.float32)])
    g.op("Identity", [logits], output=LOGITS)


def _lm_head_rescored(g: GraphBuilder, normed: str, head: BlockLinear, tied: bool, hidden: int, level: int) -> str:
    """An 8-bit head: every token scored with int8 activations, the RESCORE_TOP best recomputed in fp32.

    ONNX Runtime has no fast fp32-activation 8-bit kernel (it dequantizes the whole matrix per call). Scoring
    every token with int8 activations errs by <= ~0.3 on SmolLM2's logits; recomputing the RESCORE_TOP best
    exactly from the same blocks makes the logits that decide greedy / top-k / top-p choices exact, while the
    far tail carries the int8 error."""
    codes = EMBED_CODES if tied else g.weight("lm_head.qweight", head.codes)
    approx = _matmul_nbits(g, normed, codes, head.scales, None, "lm_head", head.k, head.n, 8, head.block_size, 4)
    if level == 4:
        return approx
    scales = EMBED_GATHER_SCALES if tied else g.weight("lm_head.gather_scales", head.scales[..., None])
    top_k = min(RESCORE_TOP, head.n)
    _, top = g.ops("TopK", [approx, g.const([top_k])], outputs=2, axis=-1, largest=1, sorted=0)
    rows = g.op("GatherBlockQuantized", [codes, top, scales], domain=MS_DOMAIN, bits=8, block_size=head.block_size,
                gather_axis=0, quantize_axis=2)
    rows = g.op("Reshape", [rows, g.const([0, 0, top_k, hidden])])  # [B, 1, k, H]
    exact = g.op("MatMul", [rows, g.op("Unsqueeze", [normed, g.const([-1])])])  # [B, 1, k, 1]
    exact = g.op("Reshape", [exact, g.const([0, 0, top_k])])
    return g.op("ScatterElements", [approx, top, exact], axis=-1)


# --- the graph --------------------------------------------------------------------------------------------------


def build_fused_graph(model: GGUFModel, progress: Callable | None = None,
                      accuracy_level: int = ACCURACY_LEVEL) -> onnx.ModelProto:
    hp = model.hparams
    g = GraphBuilder(f"cheapest_{hp.arch}_fused")
    io = declare_io(g, n_layer=hp.n_layer, n_kv_heads=hp.n_head_kv, head_dim=hp.head_dim, vocab_size=hp.vocab_size,
                    logits_positions=1)
    att = _attention_inputs(g, io, hp)
    embedding = linear_weight(model.tensor(MODEL_TENSOR.TOKEN_EMBD))
    stream = _Residual(_embedding(g, io.input_ids, embedding, hp.hidden_size, hp.embedding_scale))
    layers = range(hp.n_layer)
    for i in (progress(layers, desc="fused graph", unit="layer") if progress else layers):
        _decoder_layer(g, model, i, stream, att, io.past[i], accuracy_level)
    last = _last_token(g, io, att, stream.total(g), hp.hidden_size)
    norm = g.weight("model.norm.weight", model.tensor(MODEL_TENSOR.OUTPUT_NORM).vector())
    normed = g.op("SimplifiedLayerNormalization", [last, norm], axis=-1, epsilon=float(hp.rms_norm_eps),
                  stash_type=1)
    tied = hp.tie_word_embeddings
    head = embedding if tied else linear_weight(model.tensor(MODEL_TENSOR.OUTPUT))
    _lm_head(g, normed, head, tied, hp, accuracy_level)
    return g.model(doc="cheapest fused graph (ONNX Runtime contrib operators)")
