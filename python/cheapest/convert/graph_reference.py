"""The fp32 reference graph: standard ONNX operators only, dequantized weights (`onnx/model_fp32.onnx`).

It is the yardstick the fused graph is tested against, and it runs on any ONNX runtime.

Inputs / outputs (Hugging Face export names):
  input_ids       int64 [B, S]
  attention_mask  int64 [B, T]       T = past + S; 1 = a real token in that cache slot, 0 = padding
  position_ids    int64 [B, S]       rotary position of each new token
  past_key_values.{i}.key / .value   float32 [B, n_kv_heads, past, head_dim]
  -> logits       float32 [B, S, vocab]   (every position)
  -> present.{i}.key / .value        float32 [B, n_kv_heads, T, head_dim] = past ++ new, slot by slot

Padding convention: any. Cache slots are appended in order; a query at slot `past + s` sees every slot
`j <= past + s` whose attention_mask is 1 (and, in a windowed layer, whose position, counted over the real
slots of its row, is within the window of the query's position_id). LEFT padding is the natural layout for batched decode: pad each
row on the left, set attention_mask 0 there, and pass position_ids = (cumsum(attention_mask) - 1) of the
new tokens (clipped at 0). Padded query rows produce finite, meaningless logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from gguf import MODEL_TENSOR

from cheapest.model_layout import LOGITS, present_names

from .gguf_reader import GGUFModel, HParams
from .graph_builder import GraphBuilder, GraphIO, declare_io, ffn_norm_name, rope_tables

ROTARY_TABLE_NAME = "rotary"


def _rms_norm(g: GraphBuilder, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    w = g.weight(name, weight.astype(np.float32))
    sq = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
    std = g.op("Sqrt", [g.op("Add", [mean, g.const(np.float32(eps), np.float32)])])
    return g.op("Mul", [g.op("Div", [x, std]), w])


def _rotate(g: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin, x: [B, H, S, D], cos/sin: [B, 1, S, D]."""
    x1, x2 = g.ops("Split", [x, g.const([half, half])], outputs=2, axis=-1)
    rotated = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])


@dataclass(frozen=True)
class _Attention:
    """Per-step values every layer's attention uses."""

    rotary: dict[float, tuple[str, str]]  # rope base -> cos, sin [B, 1, S, D]
    allowed: str  # bool [B, 1, S, T]: causal and real
    windowed: str | None  # the same, and within the sliding window


def _rotary(g: GraphBuilder, io: GraphIO, hp: HParams) -> dict[float, tuple[str, str]]:
    """One table lookup by position id per rope base, shared by every layer."""
    rotary = {}
    for j, base in enumerate(hp.rope_bases):
        cos_t, sin_t = rope_tables(hp.head_dim, base, hp.context_length)
        tables = []
        for part, table in (("cos", cos_t), ("sin", sin_t)):
            name = f"{ROTARY_TABLE_NAME}.{part}" + ("" if j == 0 else f"_{j}")
            full = g.weight(name, np.concatenate([table, table], axis=1))
            tables.append(g.op("Unsqueeze", [g.op("Gather", [full, io.position_ids], axis=0), g.const([1])]))
        rotary[base] = (tables[0], tables[1])
    return rotary


def _attention_mask(g: GraphBuilder, io: GraphIO) -> str:
    """bool [B, 1, S, T]: causal by slot, and the slot must hold a real token."""
    s_len = g.op("Gather", [g.op("Shape", [io.input_ids]), g.const(1)], axis=0)
    t_len = g.op("Gather", [g.op("Shape", [io.attention_mask]), g.const(1)], axis=0)
    k_slots = g.op("Range", [g.const(0), t_len, g.const(1)])
    q_slots = g.op("Add", [g.op("Range", [g.const(0), s_len, g.const(1)]), g.op("Sub", [t_len, s_len])])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_slots, g.const([0])]),
                                  g.op("Unsqueeze", [q_slots, g.const([1])])])
    real = g.op("Unsqueeze", [g.op("Cast", [io.attention_mask], to=9), g.const([1, 2])])
    return g.op("And", [causal, real])


def _window_mask(g: GraphBuilder, io: GraphIO, allowed: str, window: int) -> str:
    """`allowed`, and query position - key position < window. A key's position is its index among its row's
    real slots (left padding shifts slots, not positions)."""
    k_pos = g.op("Sub", [g.op("CumSum", [io.attention_mask, g.const(1)]), g.const(1)])  # [B, T]
    distance = g.op("Sub", [g.op("Unsqueeze", [io.position_ids, g.const([1, 3])]),
                            g.op("Unsqueeze", [k_pos, g.const([1, 2])])])  # [B, 1, S, T]
    return g.op("And", [allowed, g.op("Less", [distance, g.const(window)])])


def _proj(g: GraphBuilder, model: GGUFModel, x: str, i: int, kind: MODEL_TENSOR, name: str) -> str:
    w = model.layer(i, kind).dequantize()
    y = g.op("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(w.T))])
    bias = model.bias(i, kind)
    return y if bias is None else g.op("Add", [y, g.weight(f"{name}.bias", bias)])


def _repeat_kv(g: GraphBuilder, t: str, hp: HParams) -> str:
    """[B, n_kv, T, D] -> [B, n_head, T, D], each KV head shared by n_head / n_kv query heads."""
    n_rep = hp.n_head // hp.n_head_kv
    if n_rep == 1:
        return t
    shape = g.op("Shape", [t])
    b, tl = (g.op("Gather", [shape, g.const([j])], axis=0) for j in (0, 2))
    expand_shape = g.op("Concat", [b, g.const([hp.n_head_kv, n_rep]), tl, g.const([hp.head_dim])], axis=0)
    e = g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), expand_shape])
    return g.op("Reshape", [e, g.const([0, hp.n_head, -1, hp.head_dim])])


def _heads(g: GraphBuilder, model: GGUFModel, i: int, t: str, n: int, norm: MODEL_TENSOR | None, name: str) -> str:
    """[B, S, n * D] -> [B, n, S, D], each head RMS-normalised first where the model has q/k norms."""
    hp = model.hparams
    r = g.op("Reshape", [t, g.const([0, 0, n, hp.head_dim])])
    if norm is not None and hp.qk_norm:
        r = _rms_norm(g, r, model.layer(i, norm).vector(), hp.rms_norm_eps, name)
    return g.op("Transpose", [r], perm=[0, 2, 1, 3])


def _self_attention(g: GraphBuilder, model: GGUFModel, i: int, x: str, att: _Attention,
                    past: tuple[str, str]) -> str:
    hp = model.hparams
    prefix = f"model.layers.{i}.self_attn"
    cos, sin = att.rotary[hp.rope_base(i)]
    half = hp.head_dim // 2
    q = _heads(g, model, i, _proj(g, model, x, i, MODEL_TENSOR.ATTN_Q, f"{prefix}.q_proj"), hp.n_head,
               MODEL_TENSOR.ATTN_Q_NORM, f"{prefix}.q_norm.weight")
    k = _heads(g, model, i, _proj(g, model, x, i, MODEL_TENSOR.ATTN_K, f"{prefix}.k_proj"), hp.n_head_kv,
               MODEL_TENSOR.ATTN_K_NORM, f"{prefix}.k_norm.weight")
    v = _heads(g, model, i, _proj(g, model, x, i, MODEL_TENSOR.ATTN_V, f"{prefix}.v_proj"), hp.n_head_kv, None, "")
    q, k = _rotate(g, q, cos, sin, half), _rotate(g, k, cos, sin, half)
    present_k, present_v = present_names(i)
    k_all = _repeat_kv(g, g.op("Concat", [past[0], k], axis=2, output=present_k), hp)
    v_all = _repeat_kv(g, g.op("Concat", [past[1], v], axis=2, output=present_v), hp)
    scale = g.const(np.float32(hp.scale), np.float32)
    scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_all], perm=[0, 1, 3, 2])]), scale])
    neg = g.const(np.finfo(np.float32).min, np.float32)
    allowed = att.windowed if hp.window(i) is not None and att.windowed is not None else att.allowed
    probs = g.op("Softmax", [g.op("Where", [allowed, scores, neg])], axis=-1)
    attn = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v_all])], perm=[0, 2, 1, 3]),
                            g.const([0, 0, hp.q_size])])
    o = _proj(g, model, attn, i, MODEL_TENSOR.ATTN_OUT, f"{prefix}.o_proj")
    if hp.post_norms:
        o = _rms_norm(g, o, model.layer(i, MODEL_TENSOR.ATTN_POST_NORM).vector(), hp.rms_norm_eps,
                      f"model.layers.{i}.post_attention_layernorm.weight")
    return o


def _gelu_tanh(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))"""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.const(np.float32(0.044715), np.float32)])]),
                         g.const(np.float32(np.sqrt(2.0 / np.pi)), np.float32)])
    one_plus = g.op("Add", [g.op("Tanh", [inner]), g.const(np.float32(1.0), np.float32)])
    return g.op("Mul", [g.op("Mul", [x, one_plus]), g.const(np.float32(0.5), np.float32)])


def _mlp(g: GraphBuilder, model: GGUFModel, i: int, x: str) -> str:
    hp = model.hparams
    prefix = f"model.layers.{i}.mlp"
    gate = _proj(g, model, x, i, MODEL_TENSOR.FFN_GATE, f"{prefix}.gate_proj")
    up = _proj(g, model, x, i, MODEL_TENSOR.FFN_UP, f"{prefix}.up_proj")
    if hp.activation == "gelu_tanh":
        act = _gelu_tanh(g, gate)
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
    y = _proj(g, model, g.op("Mul", [act, up]), i, MODEL_TENSOR.FFN_DOWN, f"{prefix}.down_proj")
    if hp.post_norms:
        y = _rms_norm(g, y, model.layer(i, MODEL_TENSOR.FFN_POST_NORM).vector(), hp.rms_norm_eps,
                      f"model.layers.{i}.post_feedforward_layernorm.weight")
    return y


def _decoder_layer(g: GraphBuilder, model: GGUFModel, i: int, h: str, att: _Attention, past: tuple[str, str]) -> str:
    eps = model.hparams.rms_norm_eps
    prefix = f"model.layers.{i}"
    x = _rms_norm(g, h, model.layer(i, MODEL_TENSOR.ATTN_NORM).vector(), eps, f"{prefix}.input_layernorm.weight")
    h = g.op("Add", [h, _self_attention(g, model, i, x, att, past)])
    x = _rms_norm(g, h, model.layer(i, MODEL_TENSOR.FFN_NORM).vector(), eps,
                  f"{prefix}.{ffn_norm_name(model.hparams)}.weight")
    return g.op("Add", [h, _mlp(g, model, i, x)])


def _lm_head(g: GraphBuilder, model: GGUFModel, io: GraphIO, h: str, embedding: str) -> None:
    hp = model.hparams
    if hp.tie_word_embeddings:
        head = embedding
    else:
        head = g.weight("lm_head.weight", model.tensor(MODEL_TENSOR.OUTPUT).dequantize())
    flat = g.op("Reshape", [h, g.const([-1, hp.hidden_size])])
    logits2d = g.op("Gemm", [flat, head], transB=1)
    if hp.final_logit_softcap is not None:
        cap = g.const(np.float32(hp.final_logit_softcap), np.float32)
        logits2d = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits2d, cap])]), cap])
    out_shape = g.op("Concat", [g.op("Shape", [io.input_ids]), g.const([hp.vocab_size])], axis=0)
    g.op("Reshape", [logits2d, out_shape], output=LOGITS)


def build_reference_graph(model: GGUFModel, progress: Callable | None = None) -> onnx.ModelProto:
    hp = model.hparams
    g = GraphBuilder(f"cheapest_{hp.arch}_fp32")
    io = declare_io(g, n_layer=hp.n_layer, n_kv_heads=hp.n_head_kv, head_dim=hp.head_dim, vocab_size=hp.vocab_size,
                    logits_positions="sequence_length")
    embedding = g.weight("model.embed_tokens.weight", model.tensor(MODEL_TENSOR.TOKEN_EMBD).dequantize())
    h = g.op("Gather", [embedding, io.input_ids], axis=0)
    if hp.embedding_scale != 1.0:
        h = g.op("Mul", [h, g.const(np.float32(hp.embedding_scale), np.float32)])
    allowed = _attention_mask(g, io)
    windowed = None if hp.sliding_window is None else _window_mask(g, io, allowed, hp.sliding_window)
    att = _Attention(_rotary(g, io, hp), allowed, windowed)
    layers = range(hp.n_layer)
    for i in (progress(layers, desc="fp32 graph", unit="layer") if progress else layers):
        h = _decoder_layer(g, model, i, h, att, io.past[i])
    h = _rms_norm(g, h, model.tensor(MODEL_TENSOR.OUTPUT_NORM).vector(), hp.rms_norm_eps, "model.norm.weight")
    _lm_head(g, model, io, h, embedding)
    return g.model(doc="cheapest fp32 reference graph (plain ONNX operators)")
