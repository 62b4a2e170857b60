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

import numpy as np

from .gguf_reader import GGUFModel, GGUFTensor
from .graph_builder import FLOAT, INT64, MS_DOMAIN, GraphBuilder, rope_tables
from .quant_blocks import BLOCK, BlockLinear, block_linear, concat_rows

RESCORE_TOP = 64  # LM-head logits recomputed exactly at accuracy_level 0 (see the LM head below)
ACCURACY_LEVEL = 0  # fp32 activations; 4 = int8 activations (faster, llama.cpp-like precision)


def _linear(g: GraphBuilder, x: str, lin: BlockLinear, name: str, level: int) -> str:
    if lin.bits == 0:
        assert lin.dense is not None
        return g.op("MatMul", [x, g.weight(f"{name}.weight", np.ascontiguousarray(lin.dense.T))], name=name)
    assert lin.codes is not None and lin.scales is not None and lin.zero_points is not None  # bits 4 / 8
    zp = lin.packed_zero_points()
    mins = lin.mins
    if mins is not None and lin.bits == 4 and not lin.zero_points.any():
        # Q4_1: d*q + m == d*(q - 8) + (m + 8d). The operator's default zero point (8) avoids the zero-point
        # input, which makes the fp32-activation kernel ~5% slower; m + 8d is rounded once to fp32 (the
        # weights stay the GGUF's 4-bit codes, scales and minimums).
        zp = None
        mins = mins + np.float32(8) * lin.scales
    parts = _k_parts(lin, level)
    y: str | None
    if parts == 1:
        y = _matmul_nbits(g, x, lin.codes, lin.scales, zp, name, lin.k, lin.n, lin.bits, level)
    else:
        # ONNX Runtime's fp32-activation 4-bit kernel runs ~1.6x fewer MACs/s at K=1536 than at K<=768
        # (measured, SmolLM2's down projection): split the input axis at block boundaries and add.
        step = lin.n_blocks // parts
        xs = g.ops("Split", [x, g.const([step * BLOCK] * parts)], outputs=parts, axis=-1)
        y = None
        for j, xj in enumerate(xs):
            blocks = slice(j * step, (j + 1) * step)
            zpj = None if zp is None else zp[:, j * step // 2:(j + 1) * step // 2]
            yj = _matmul_nbits(g, xj, lin.codes[:, blocks], lin.scales[:, blocks], zpj, f"{name}.{j}",
                               step * BLOCK, lin.n, lin.bits, level)
            y = yj if y is None else g.op("Add", [y, yj])
        assert y is not None  # parts >= 2
    if mins is None:
        return y
    # Q4_1: + sum over each 32-wide block of x, times the block minimums. The block sums are one product
    # with a 0/1 block indicator (fewer nodes than Reshape + ReduceSum).
    indicator = np.zeros((lin.k, lin.n_blocks), np.float32)
    indicator[np.arange(lin.k), np.arange(lin.k) // BLOCK] = 1.0
    sums = g.op("MatMul", [x, g.const(indicator, np.float32)])
    corr = g.op("MatMul", [sums, g.weight(f"{name}.mins", np.ascontiguousarray(mins.T))])
    return g.op("Add", [y, corr])


MAX_PART_K = 768  # see _linear


def _k_parts(lin: BlockLinear, level: int) -> int:
    """Input-axis pieces for one projection: 1 unless K > MAX_PART_K at fp32 activations and the blocks split
    evenly (zero points, packed two per byte, must split on a byte boundary)."""
    if lin.bits != 4 or level == 4:
        return 1
    for parts in range(1, lin.n_blocks + 1):
        step, rest = divmod(lin.n_blocks, parts)
        if step * BLOCK <= MAX_PART_K and not rest and (parts == 1 or step % 2 == 0):
            return parts
    return 1


def _matmul_nbits(g: GraphBuilder, x: str, codes: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, name: str,
                  k: int, n: int, bits: int, level: int) -> str:
    inputs = [x, g.weight(f"{name}.qweight", np.ascontiguousarray(codes)),
              g.weight(f"{name}.scales", np.ascontiguousarray(scales))]
    if zp is not None:
        inputs.append(g.weight(f"{name}.qzeros", np.ascontiguousarray(zp)))
    return g.op("MatMulNBits", inputs, domain=MS_DOMAIN, name=name, K=k, N=n, bits=bits, block_size=BLOCK,
                accuracy_level=level)


def _linear_group(g: GraphBuilder, x: str, tensors: list[GGUFTensor], name: str, level: int) -> list[str]:
    """One MatMulNBits for weights sharing an input, split afterwards; separate ones if encodings differ."""
    parts = [block_linear(t) for t in tensors]
    merged = concat_rows(parts)
    if merged is None:
        return [_linear(g, x, p, f"{name}.{j}", level) for j, p in enumerate(parts)]
    y = _linear(g, x, merged, name, level)
    return [y]  # caller splits (GroupQueryAttention takes packed QKV as is)


def _embedding(g: GraphBuilder, ids: str, t: GGUFTensor, hidden: int) -> tuple[str, BlockLinear]:
    lin = block_linear(t)
    if lin.bits == 0:
        assert lin.dense is not None
        return g.op("Gather", [g.weight("model.embed_tokens.weight", lin.dense), ids], axis=0), lin
    assert lin.codes is not None and lin.scales is not None and lin.zero_points is not None  # bits 4 / 8
    # The code tensor [V, K/32, blob] is shared with the MatMulNBits LM head when the embedding is tied.
    data = g.weight("model.embed_tokens.qweight", lin.codes)
    if lin.bits == 8:
        # Blocks run along the last axis: one 32-wide block per [row, block] pair; zero point 128 = default.
        inputs = [data, ids, g.weight("model.embed_tokens.gather_scales", lin.scales[..., None])]
        if not np.all(lin.zero_points == 128):
            inputs.append(g.weight("model.embed_tokens.gather_zeros", lin.zero_points[..., None]))
        rows = g.op("GatherBlockQuantized", inputs, domain=MS_DOMAIN, bits=8, block_size=BLOCK,
                    gather_axis=0, quantize_axis=2)
        return g.op("Reshape", [rows, g.const([0, 0, hidden])]), lin
    # 4-bit (Q4_0 / Q4_1): gather the packed rows, unpack with plain operators (runs once per step, on
    # S rows only), then apply scale, zero point and block minimum.
    packed = g.op("Gather", [data, ids], axis=0)
    lo = g.op("Unsqueeze", [g.op("BitwiseAnd", [packed, g.const(15, np.uint8)]), g.const([-1])])
    hi = g.op("Unsqueeze", [g.op("BitShift", [packed, g.const(4, np.uint8)], direction="RIGHT"), g.const([-1])])
    q = g.op("Cast", [g.op("Reshape", [g.op("Concat", [lo, hi], axis=-1), g.const([0, 0, lin.n_blocks, BLOCK])])],
             to=FLOAT)
    zp = g.weight("model.embed_tokens.gather_zeros", lin.zero_points[..., None].astype(np.float32))
    sc = g.weight("model.embed_tokens.gather_scales", lin.scales[..., None])
    w = g.op("Mul", [g.op("Sub", [q, g.op("Gather", [zp, ids], axis=0)]), g.op("Gather", [sc, ids], axis=0)])
    if lin.mins is not None:
        mins = g.weight("model.embed_tokens.gather_mins", lin.mins[..., None])
        w = g.op("Add", [w, g.op("Gather", [mins, ids], axis=0)])
    return g.op("Reshape", [w, g.const([0, 0, hidden])]), lin


def build_fused_graph(model: GGUFModel, progress=None, accuracy_level: int = ACCURACY_LEVEL):
    level = accuracy_level
    hp = model.hparams
    g = GraphBuilder("cheapest_llama_fused")
    input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    g.input("position_ids", INT64, ["batch_size", "sequence_length"])
    past = []
    for i in range(hp.n_layer):
        k = g.input(f"past_key_values.{i}.key", FLOAT, ["batch_size", hp.n_head_kv, "past_sequence_length", hp.head_dim])
        v = g.input(f"past_key_values.{i}.value", FLOAT, ["batch_size", hp.n_head_kv, "past_sequence_length", hp.head_dim])
        past.append((k, v))
    g.output("logits", FLOAT, ["batch_size", 1, hp.vocab_size])

    # seqlens_k = real tokens per row - 1; total_sequence_length = T (GroupQueryAttention's contract).
    lengths = g.op("ReduceSum", [attention_mask, g.const([1])], keepdims=0)
    seqlens_k = g.op("Cast", [g.op("Sub", [lengths, g.const(1)])], to=6)
    t_len = g.op("Gather", [g.op("Shape", [attention_mask]), g.const(1)], axis=0)
    total_len = g.op("Cast", [t_len], to=6)
    cos_t, sin_t = rope_tables(hp.head_dim, hp.rope_theta, hp.context_length)
    cos = g.weight("rotary.cos_cache", cos_t)
    sin = g.weight("rotary.sin_cache", sin_t)

    emb_t = model.tensors["token_embd.weight"]
    h, emb_lin = _embedding(g, input_ids, emb_t, hp.hidden_size)

    eps = float(hp.rms_norm_eps)
    residual: str | None = None
    pending = h  # value to add to the residual stream before the next norm
    layers = range(hp.n_layer)
    for i in (progress(layers, desc="fused graph", unit="layer") if progress else layers):
        prefix = f"model.layers.{i}"
        w = g.weight(f"{prefix}.input_layernorm.weight", model.layer(i, "attn_norm").vector())
        if residual is None:
            x = g.op("SimplifiedLayerNormalization", [pending, w], axis=-1, epsilon=eps, stash_type=1)
            residual = pending
        else:
            x, _, _, residual = g.ops("SkipSimplifiedLayerNormalization", [pending, residual, w], domain=MS_DOMAIN,
                                     outputs=[g.fresh("norm"), "", "", g.fresh("residual")], epsilon=eps)
        qkv_t = [model.layer(i, p) for p in ("attn_q", "attn_k", "attn_v")]
        qkv = _linear_group(g, x, qkv_t, f"{prefix}.attn.qkv_proj", level)
        gqa_in = qkv + ["", ""] if len(qkv) == 1 else qkv
        attn, _, _ = g.ops("GroupQueryAttention",
                    gqa_in + [past[i][0], past[i][1], seqlens_k, total_len, cos, sin],
                    domain=MS_DOMAIN, name=f"{prefix}.attn.gqa",
                    outputs=[g.fresh("attn"), f"present.{i}.key", f"present.{i}.value"],
                    num_heads=hp.n_head, kv_num_heads=hp.n_head_kv, do_rotary=1, rotary_interleaved=0)
        g.output(f"present.{i}.key", FLOAT, ["batch_size", hp.n_head_kv, "total_sequence_length", hp.head_dim])
        g.output(f"present.{i}.value", FLOAT, ["batch_size", hp.n_head_kv, "total_sequence_length", hp.head_dim])
        o = _linear(g, attn, block_linear(model.layer(i, "attn_output")), f"{prefix}.attn.o_proj", level)

        w2 = g.weight(f"{prefix}.post_attention_layernorm.weight", model.layer(i, "ffn_norm").vector())
        x2, _, _, residual = g.ops("SkipSimplifiedLayerNormalization", [o, residual, w2], domain=MS_DOMAIN,
                                  outputs=[g.fresh("norm"), "", "", g.fresh("residual")], epsilon=eps)
        gu = _linear_group(g, x2, [model.layer(i, "ffn_gate"), model.layer(i, "ffn_up")], f"{prefix}.mlp.gate_up_proj", level)
        if len(gu) == 1:
            gate, up = g.ops("Split", [gu[0], g.const([hp.intermediate_size, hp.intermediate_size])], outputs=2, axis=-1)
        else:
            gate, up = gu
        act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS_DOMAIN, alpha=1.0), up])
        pending = _linear(g, act, block_linear(model.layer(i, "ffn_down")), f"{prefix}.mlp.down_proj", level)

    # Last real token of each row: slot L_b - 1, i.e. index L_b - 1 - past within this step (clipped for
    # decode rows shorter than the longest one, whose only new token is index 0).
    s_len = g.op("Gather", [g.op("Shape", [input_ids]), g.const(1)], axis=0)
    idx = g.op("Sub", [g.op("Sub", [lengths, g.const(1)]), g.op("Sub", [t_len, s_len])])
    idx = g.op("Max", [g.op("Min", [idx, g.op("Sub", [s_len, g.const(1)])]), g.const(0)])
    gather_idx = g.op("Expand", [g.op("Reshape", [idx, g.const([-1, 1, 1])]),
                                 g.op("Concat", [g.op("Shape", [idx]), g.const([1, hp.hidden_size])], axis=0)])
    assert residual is not None  # n_layer >= 1
    last = g.op("GatherElements", [g.op("Add", [pending, residual]), gather_idx], axis=1)
    wn = g.weight("model.norm.weight", model.tensors["output_norm.weight"].vector())
    normed = g.op("SimplifiedLayerNormalization", [last, wn], axis=-1, epsilon=eps, stash_type=1)
    tied = hp.tie_word_embeddings
    head = emb_lin if tied else block_linear(model.tensors["output.weight"])
    if head.bits == 8 and np.all(head.zero_points == 128):
        assert head.codes is not None and head.scales is not None and head.zero_points is not None  # bits 4 / 8
        codes = "model.embed_tokens.qweight" if tied else g.weight("lm_head.qweight", head.codes)
        approx = g.op("MatMulNBits", [normed, codes, g.weight("lm_head.scales", head.scales)], domain=MS_DOMAIN,
                      name="lm_head", K=head.k, N=head.n, bits=8, block_size=BLOCK, accuracy_level=4)
        if level == 4:
            g.op("Identity", [approx], output="logits")
        else:
            # ONNX Runtime has no fast fp32-activation 8-bit kernel (it dequantizes the whole matrix per call).
            # Score every token with int8 activations (error <= ~0.3 on SmolLM2's logits), then recompute the
            # RESCORE_TOP best exactly in fp32 from the same blocks: the logits that decide greedy / top-k /
            # top-p choices are exact, the far tail carries the int8 error.
            scales = ("model.embed_tokens.gather_scales" if tied
                      else g.weight("lm_head.gather_scales", head.scales[..., None]))
            top_k = min(RESCORE_TOP, head.n)
            _, top = g.ops("TopK", [approx, g.const([top_k])], outputs=2, axis=-1, largest=1, sorted=0)
            rows = g.op("GatherBlockQuantized", [codes, top, scales], domain=MS_DOMAIN, bits=8, block_size=BLOCK,
                        gather_axis=0, quantize_axis=2)
            rows = g.op("Reshape", [rows, g.const([0, 0, top_k, hp.hidden_size])])  # [B, 1, k, H]
            exact = g.op("MatMul", [rows, g.op("Unsqueeze", [normed, g.const([-1])])])  # [B, 1, k, 1]
            exact = g.op("Reshape", [exact, g.const([0, 0, top_k])])
            g.op("ScatterElements", [approx, top, exact], output="logits", axis=-1)
    elif tied and head.bits:
        assert head.scales is not None
        inputs = [normed, "model.embed_tokens.qweight", g.weight("lm_head.scales", head.scales)]
        zp = head.packed_zero_points()
        if zp is not None:
            inputs.append(g.weight("lm_head.qzeros", zp))
        logits = g.op("MatMulNBits", inputs, domain=MS_DOMAIN, name="lm_head", K=head.k, N=head.n, bits=head.bits,
                      block_size=BLOCK, accuracy_level=level)
        if head.mins is not None:
            blocks = g.op("Reshape", [normed, g.const([0, 0, head.n_blocks, BLOCK])])
            sums = g.op("ReduceSum", [blocks, g.const([-1])], keepdims=0)
            mins = g.weight("lm_head.mins", np.ascontiguousarray(head.mins.T))
            logits = g.op("Add", [logits, g.op("MatMul", [sums, mins])])
        g.op("Identity", [logits], output="logits")
    else:
        g.op("Identity", [_linear(g, normed, head, "lm_head", level)], output="logits")
    g.outputs.sort(key=lambda o: o.name != "logits")
    return g.model(doc="cheapest fused graph (ONNX Runtime contrib operators)")
