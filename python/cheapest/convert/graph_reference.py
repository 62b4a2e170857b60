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
`j <= past + s` whose attention_mask is 1. LEFT padding is the natural layout for batched decode: pad each
row on the left, set attention_mask 0 there, and pass position_ids = (cumsum(attention_mask) - 1) of the
new tokens (clipped at 0). Padded query rows produce finite, meaningless logits.
"""

from __future__ import annotations

import numpy as np

from .gguf_reader import GGUFModel
from .graph_builder import FLOAT, INT64, GraphBuilder, rope_tables

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


def build_reference_graph(model: GGUFModel, progress=None):
    hp = model.hparams
    g = GraphBuilder("cheapest_llama_fp32")
    input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    position_ids = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
    past = []
    for i in range(hp.n_layer):
        k = g.input(f"past_key_values.{i}.key", FLOAT, ["batch_size", hp.n_head_kv, "past_sequence_length", hp.head_dim])
        v = g.input(f"past_key_values.{i}.value", FLOAT, ["batch_size", hp.n_head_kv, "past_sequence_length", hp.head_dim])
        past.append((k, v))
    g.output("logits", FLOAT, ["batch_size", "sequence_length", hp.vocab_size])

    embedding = model.tensors["token_embd.weight"].dequantize()
    emb = g.weight("model.embed_tokens.weight", embedding)
    h = g.op("Gather", [emb, input_ids], axis=0)

    # Rotary: one table lookup by position id, shared by every layer.
    cos_t, sin_t = rope_tables(hp.head_dim, hp.rope_theta, hp.context_length)
    cos_full = np.concatenate([cos_t, cos_t], axis=1)
    sin_full = np.concatenate([sin_t, sin_t], axis=1)
    cos = g.op("Unsqueeze", [g.op("Gather", [g.weight(f"{ROTARY_TABLE_NAME}.cos", cos_full), position_ids], axis=0),
                             g.const([1])])
    sin = g.op("Unsqueeze", [g.op("Gather", [g.weight(f"{ROTARY_TABLE_NAME}.sin", sin_full), position_ids], axis=0),
                             g.const([1])])

    # Mask [B, 1, S, T]: causal by slot, and the slot must hold a real token.
    s_len = g.op("Gather", [g.op("Shape", [input_ids]), g.const(1)], axis=0)
    t_len = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1)], axis=0)
    k_slots = g.op("Range", [g.const(0), t_len, g.const(1)])
    q_slots = g.op("Add", [g.op("Range", [g.const(0), s_len, g.const(1)]), g.op("Sub", [t_len, s_len])])
    causal = g.op("LessOrEqual", [g.op("Unsqueeze", [k_slots, g.const([0])]), g.op("Unsqueeze", [q_slots, g.const([1])])])
    real = g.op("Unsqueeze", [g.op("Cast", [attention_mask], to=9), g.const([1, 2])])
    allowed = g.op("And", [causal, real])
    neg = g.const(np.finfo(np.float32).min, np.float32)

    scale = g.const(np.float32(1.0 / np.sqrt(hp.head_dim)), np.float32)
    half = hp.head_dim // 2
    n_rep = hp.n_head // hp.n_head_kv
    layers = range(hp.n_layer)
    for i in (progress(layers, desc="fp32 graph", unit="layer") if progress else layers):
        prefix = f"model.layers.{i}"
        x = _rms_norm(g, h, model.layer(i, "attn_norm").vector(), hp.rms_norm_eps, f"{prefix}.input_layernorm.weight")

        def proj(inp: str, part: str, wname: str) -> str:
            w = model.layer(i, part).dequantize()
            return g.op("MatMul", [inp, g.weight(wname, np.ascontiguousarray(w.T))])

        def heads(t: str, n: int) -> str:
            r = g.op("Reshape", [t, g.const([0, 0, n, hp.head_dim])])
            return g.op("Transpose", [r], perm=[0, 2, 1, 3])

        q = heads(proj(x, "attn_q", f"{prefix}.self_attn.q_proj.weight"), hp.n_head)
        k = heads(proj(x, "attn_k", f"{prefix}.self_attn.k_proj.weight"), hp.n_head_kv)
        v = heads(proj(x, "attn_v", f"{prefix}.self_attn.v_proj.weight"), hp.n_head_kv)
        q = _rotate(g, q, cos, sin, half)
        k = _rotate(g, k, cos, sin, half)
        k_all = g.op("Concat", [past[i][0], k], axis=2, output=f"present.{i}.key")
        v_all = g.op("Concat", [past[i][1], v], axis=2, output=f"present.{i}.value")
        g.output(f"present.{i}.key", FLOAT, ["batch_size", hp.n_head_kv, "total_sequence_length", hp.head_dim])
        g.output(f"present.{i}.value", FLOAT, ["batch_size", hp.n_head_kv, "total_sequence_length", hp.head_dim])
        if n_rep > 1:
            def repeat(t: str) -> str:
                shape = g.op("Shape", [t])
                b, tl = (g.op("Gather", [shape, g.const([j])], axis=0) for j in (0, 2))
                expand_shape = g.op("Concat", [b, g.const([hp.n_head_kv, n_rep]), tl, g.const([hp.head_dim])], axis=0)
                e = g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), expand_shape])
                return g.op("Reshape", [e, g.const([0, hp.n_head, -1, hp.head_dim])])
            k_rep, v_rep = repeat(k_all), repeat(v_all)
        else:
            k_rep, v_rep = k_all, v_all
        scores = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k_rep], perm=[0, 1, 3, 2])]), scale])
        probs = g.op("Softmax", [g.op("Where", [allowed, scores, neg])], axis=-1)
        attn = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, v_rep])], perm=[0, 2, 1, 3]),
                                g.const([0, 0, hp.q_size])])
        h = g.op("Add", [h, proj(attn, "attn_output", f"{prefix}.self_attn.o_proj.weight")])

        x = _rms_norm(g, h, model.layer(i, "ffn_norm").vector(), hp.rms_norm_eps,
                      f"{prefix}.post_attention_layernorm.weight")
        gate = proj(x, "ffn_gate", f"{prefix}.mlp.gate_proj.weight")
        up = proj(x, "ffn_up", f"{prefix}.mlp.up_proj.weight")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        h = g.op("Add", [h, proj(act, "ffn_down", f"{prefix}.mlp.down_proj.weight")])

    h = _rms_norm(g, h, model.tensors["output_norm.weight"].vector(), hp.rms_norm_eps, "model.norm.weight")
    if hp.tie_word_embeddings:
        head, trans_b = emb, 1
    else:
        head, trans_b = g.weight("lm_head.weight", model.tensors["output.weight"].dequantize()), 1
    flat = g.op("Reshape", [h, g.const([-1, hp.hidden_size])])
    logits2d = g.op("Gemm", [flat, head], transB=trans_b)
    out_shape = g.op("Concat", [g.op("Shape", [input_ids]), g.const([hp.vocab_size])], axis=0)
    g.op("Reshape", [logits2d, out_shape], output="logits")
    # Present outputs were declared per layer; move logits first as in Hugging Face exports.
    g.outputs.sort(key=lambda o: o.name != "logits")
    return g.model(doc="cheapest fp32 reference graph (plain ONNX operators)")
