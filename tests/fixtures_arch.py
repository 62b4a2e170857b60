"""Tiny random-weight GGUFs of every supported architecture, and an independent numpy forward pass.

`write_arch_gguf(path, arch, types=...)` writes a model whose tensors may be of any GGUF type the converter
reads: K-quant and legacy blocks are random bytes with finite, rescaled fp16 scales (gguf has no K-quant
quantizer), so every code and scale pattern occurs. `numpy_forward(path, ids)` computes float64 logits from the
file with `gguf.GGUFReader` and gguf's own dequantizer, following llama.cpp's graphs (llama's interleaved
rotary on the stored, permuted rows; half-split rotary elsewhere; Gemma 3's scaled embedding, norms before and
after each block, GeGLU and interleaved sliding-window layers with their own rope base).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from fixtures_model import TINY_CHAT_TEMPLATE, gguf_writer, tiny_vocab
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

# Byte offsets of each block type's fp16 fields (scales, minimums).
FP16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0],
    Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208],
}
BLOCK_TYPES = list(FP16_FIELDS)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator, std: float) -> np.ndarray:
    """uint8 [rows, bytes per row]: random codes, fp16 scale fields rescaled so the weights' std is `std`."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    fields = FP16_FIELDS[qtype]
    values = rng.standard_normal((rows, cols // block, len(fields))).astype(np.float32)
    if qtype in (Q.Q2_K, Q.Q4_K, Q.Q5_K):
        values = np.abs(values)  # d and dmin are non-negative in llama.cpp's K-quants
    for factor in (None, 1.0):
        for j, off in enumerate(fields):
            raw[..., off:off + 2] = values[..., j:j + 1].astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        if factor is None:  # second pass: rescale to the wanted spread
            w = dequantize(raw.reshape(rows, -1), qtype)
            values *= std / max(float(np.std(w)), 1e-12)
    return raw.reshape(rows, -1)


def weight_bytes(qtype: Q, rows: int, cols: int, rng: np.random.Generator, std: float) -> np.ndarray:
    if qtype in FP16_FIELDS:
        return random_blocks(qtype, rows, cols, rng, std)
    data = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
    if qtype == Q.F32:
        return data
    if qtype == Q.F16:
        return data.astype(np.float16)
    if qtype == Q.BF16:
        return quantize(data, qtype)
    block, size = GGML_QUANT_SIZES[qtype]  # a type the converter refuses: any bytes will do
    return rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)


def write_arch_gguf(path: Path, arch: str, *, types: dict[str, Q] | None = None, n_layer: int = 2,
                    hidden: int = 256, n_head: int = 4, n_head_kv: int = 2, head_dim: int | None = None,
                    ff: int = 512, context: int = 128, sliding_window: int | None = None,
                    softcap: float | None = None, seed: int = 7) -> Path:
    """`types`: tensor role ("embd", "output", "q", "k", "v", "o", "gate", "up", "down") -> GGUF type
    (default Q8_0; a role absent with "output" means a tied embedding)."""
    types = types or {}
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // n_head
    tokens, token_types, merges = tiny_vocab()
    vocab = len(tokens)
    w = gguf_writer(path, arch, name=f"tiny-test-{arch}", n_layer=n_layer, context=context, hidden=hidden, ff=ff,
                    n_head=n_head, n_head_kv=n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1_000_000.0 if arch == "gemma3" else 10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(head_dim)
    if sliding_window is not None:
        w.add_sliding_window(sliding_window)
    if softcap is not None:
        w.add_final_logit_softcapping(softcap)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def add(name: str, role: str, rows: int, cols: int, std: float) -> None:
        w.add_tensor(name, weight_bytes(types.get(role, Q.Q8_0), rows, cols, rng, std),
                     raw_dtype=types.get(role, Q.Q8_0) if types.get(role, Q.Q8_0) not in (Q.F32, Q.F16) else None)

    def norm(name: str, size: int) -> None:
        w.add_tensor(name, (1.0 + 0.2 * rng.standard_normal(size)).astype(np.float32))

    q_size, kv_size = n_head * head_dim, n_head_kv * head_dim
    add("token_embd.weight", "embd", vocab, hidden, 1.0)
    for i in range(n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", hidden)
        if arch == "phi3":
            add(p + "attn_qkv.weight", "q", q_size + 2 * kv_size, hidden, hidden ** -0.5)
        else:
            add(p + "attn_q.weight", "q", q_size, hidden, hidden ** -0.5)
            add(p + "attn_k.weight", "k", kv_size, hidden, hidden ** -0.5)
            add(p + "attn_v.weight", "v", kv_size, hidden, hidden ** -0.5)
        if arch == "qwen2":
            for part, size in (("attn_q", q_size), ("attn_k", kv_size), ("attn_v", kv_size)):
                w.add_tensor(p + part + ".bias", (0.5 * rng.standard_normal(size)).astype(np.float32))
        if arch in ("qwen3", "gemma3"):
            norm(p + "attn_q_norm.weight", head_dim)
            norm(p + "attn_k_norm.weight", head_dim)
        add(p + "attn_output.weight", "o", hidden, q_size, q_size ** -0.5)
        norm(p + "ffn_norm.weight", hidden)
        if arch == "phi3":
            add(p + "ffn_up.weight", "up", 2 * ff, hidden, hidden ** -0.5)
        else:
            add(p + "ffn_gate.weight", "gate", ff, hidden, hidden ** -0.5)
            add(p + "ffn_up.weight", "up", ff, hidden, hidden ** -0.5)
        add(p + "ffn_down.weight", "down", hidden, ff, ff ** -0.5)
        if arch == "gemma3":
            norm(p + "post_attention_norm.weight", hidden)
            norm(p + "post_ffw_norm.weight", hidden)
    norm("output_norm.weight", hidden)
    if "output" in types:
        add("output.weight", "output", vocab, hidden, 1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@functools.lru_cache(maxsize=8)
def _read(gguf_path: str) -> tuple[GGUFReader, dict[str, np.ndarray]]:
    r = GGUFReader(gguf_path)
    return r, {t.name: np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape(
        [int(x) for x in reversed(t.shape)]) for t in r.tensors}


def numpy_forward(gguf_path: str | Path, ids: Sequence[int]) -> np.ndarray:
    """float64 logits [S, vocab] for one sequence, straight from the GGUF."""
    r, weights = _read(str(gguf_path))

    def f(key: str, default: object = None) -> object:
        field = r.fields.get(key.format(arch=arch))
        return default if field is None else field.contents()

    arch = str(r.fields["general.architecture"].contents())
    n_layer, n_head, n_kv = (int(f(k)) for k in ("{arch}.block_count", "{arch}.attention.head_count",
                                                  "{arch}.attention.head_count_kv"))
    hidden, ff = int(f("{arch}.embedding_length")), int(f("{arch}.feed_forward_length"))
    eps, theta = float(f("{arch}.attention.layer_norm_rms_epsilon")), float(f("{arch}.rope.freq_base"))
    D = int(f("{arch}.attention.key_length", hidden // n_head))
    window = f("{arch}.attention.sliding_window")
    softcap = f("{arch}.final_logit_softcapping")
    W = dict(weights)
    for i in range(n_layer):  # phi3's fused tensors
        p = f"blk.{i}."
        if p + "attn_qkv.weight" in W:
            W[p + "attn_q.weight"], W[p + "attn_k.weight"], W[p + "attn_v.weight"] = np.split(
                W.pop(p + "attn_qkv.weight"), [n_head * D, (n_head + n_kv) * D])
        if p + "ffn_gate.weight" not in W:
            W[p + "ffn_gate.weight"], W[p + "ffn_up.weight"] = np.split(W[p + "ffn_up.weight"], [ff])

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    ids = np.asarray(ids)
    S = len(ids)
    pos = np.arange(S)

    def rope(t: np.ndarray, base: float) -> np.ndarray:
        ang = pos[:, None] * base ** (-np.arange(0, D, 2) / D)[None]
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        out = np.empty_like(t)
        if arch == "llama":  # interleaved pairs (2i, 2i+1) on the permuted rows as stored
            a, b = t[..., 0::2], t[..., 1::2]
            out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
        else:  # half-split pairs (i, i + D/2)
            a, b = t[..., : D // 2], t[..., D // 2:]
            out[..., : D // 2], out[..., D // 2:] = a * c - b * s, a * s + b * c
        return out

    gemma = arch == "gemma3"
    x = W["token_embd.weight"][ids] * (np.sqrt(hidden) if gemma else 1.0)
    rep = n_head // n_kv
    for i in range(n_layer):
        p = f"blk.{i}."
        windowed = window is not None and (not gemma or (i + 1) % 6 != 0)
        base = 10000.0 if gemma and windowed else theta
        distance = pos[:, None] - pos[None, :]
        allowed = (distance >= 0) & ((distance < int(window)) if windowed else True)
        y = norm(x, W[p + "attn_norm.weight"])
        q, k, v = ((y @ W[p + f"attn_{n}.weight"].T + W.get(p + f"attn_{n}.bias", 0.0)) for n in "qkv")
        q, k, v = q.reshape(S, n_head, D), k.reshape(S, n_kv, D), v.reshape(S, n_kv, D)
        if p + "attn_q_norm.weight" in W:
            q, k = norm(q, W[p + "attn_q_norm.weight"]), norm(k, W[p + "attn_k_norm.weight"])
        q, k = rope(q, base), np.repeat(rope(k, base), rep, axis=1)
        v = np.repeat(v, rep, axis=1)
        sc = np.einsum("shd,thd->hst", q, k) / np.sqrt(D) + np.where(allowed, 0.0, -np.inf)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = np.einsum("hst,thd->shd", sc, v).reshape(S, n_head * D) @ W[p + "attn_output.weight"].T
        x = x + (norm(o, W[p + "post_attention_norm.weight"]) if gemma else o)
        y = norm(x, W[p + "ffn_norm.weight"])
        g, u = y @ W[p + "ffn_gate.weight"].T, y @ W[p + "ffn_up.weight"].T
        if gemma:
            act = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))
        else:
            act = g / (1 + np.exp(-g))
        d = (act * u) @ W[p + "ffn_down.weight"].T
        x = x + (norm(d, W[p + "post_ffw_norm.weight"]) if gemma else d)
    logits = norm(x, W["output_norm.weight"]) @ W.get("output.weight", W["token_embd.weight"]).T
    return np.tanh(logits / float(softcap)) * float(softcap) if softcap else logits
