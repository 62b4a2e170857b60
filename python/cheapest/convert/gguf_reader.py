"""Read a decoder-only GGUF: hyper-parameters, tokenizer data and raw tensors.

Architectures: llama (and Mistral, a llama GGUF with a sliding window), qwen2 (q/k/v biases), qwen3 (q/k
norms), phi3 (fused qkv and gate|up, split here into their parts) and gemma3 (see `HParams`). Each becomes one
`HParams` plus per-layer tensors under the same names, so the graph builders need no architecture branches
beyond the flags in `HParams`.

Tensors stay in their GGUF block encoding (`GGUFTensor.raw`, memory-mapped); the graph builders decide whether
to dequantize them (the fp32 reference graph) or to repack the blocks as they are (the fused graph).

Rows are in numpy order: a GGUF weight with `ne = [K, N]` is a `[N, K]` matrix (out-features x in-features),
the same as a PyTorch `nn.Linear.weight`. llama's Q and K projections come out of the reader already
un-permuted (see `_unpermute_rows`), so every consumer sees Hugging Face's half-split rotary layout.

A file of an unsupported architecture or tensor type is refused from its header alone (gguf_header.py),
before any tensor is read. Metadata keys and tensor names are the `gguf` package's own constants.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, Keys
from gguf.quants import dequantize

from .gguf_header import GGUFHeader, TensorInfo, read_header

Q = GGMLQuantizationType
LLAMA, QWEN2, QWEN3, PHI3, GEMMA3 = (MODEL_ARCH_NAMES[a] for a in (
    MODEL_ARCH.LLAMA, MODEL_ARCH.QWEN2, MODEL_ARCH.QWEN3, MODEL_ARCH.PHI3, MODEL_ARCH.GEMMA3))
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, QWEN3, PHI3, GEMMA3)
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                   Q.Q6_K)
LAYER_TENSORS = (
    MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_OUT,
    MODEL_TENSOR.FFN_NORM, MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN,
)
QK_NORMS = (MODEL_TENSOR.ATTN_Q_NORM, MODEL_TENSOR.ATTN_K_NORM)
POST_NORMS = (MODEL_TENSOR.ATTN_POST_NORM, MODEL_TENSOR.FFN_POST_NORM)
QKV = (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V)
GEMMA3_SLIDING_PATTERN = 6  # every 6th layer attends globally (llama.cpp and transformers hard-code it)
GEMMA3_LOCAL_ROPE_BASE = 10000.0


class UnsupportedModelError(ValueError):
    """The GGUF uses an architecture, tensor type or feature the converter does not handle."""


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a tensor, e.g. (ATTN_Q, 3) -> "blk.3.attn_q.weight"."""
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


@dataclass(frozen=True)
class HParams:
    arch: str
    n_layer: int
    hidden_size: int
    intermediate_size: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    vocab_size: int
    tie_word_embeddings: bool
    # Attention windows: a windowed layer's query at position p sees keys at p - sliding_window + 1 .. p.
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] = ()  # per layer (empty: none)
    rope_theta_local: float | None = None  # rope base of windowed layers, when it differs (gemma3)
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    embedding_scale: float = 1.0  # gemma3: sqrt(hidden_size)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    qkv_bias: bool = False  # qwen2
    qk_norm: bool = False  # qwen3, gemma3: RMSNorm of each head of q and k before rotary
    post_norms: bool = False  # gemma3: RMSNorm of the attention and feed-forward outputs before the residual add
    activation: str = "silu"  # gated feed-forward: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_head_kv * self.head_dim

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.sliding_layers and self.sliding_layers[layer] else None

    def rope_base(self, layer: int) -> float:
        if self.window(layer) is not None and self.rope_theta_local is not None:
            return self.rope_theta_local
        return self.rope_theta

    @property
    def rope_bases(self) -> list[float]:
        """Distinct rope bases, in first-use order."""
        return list(dict.fromkeys(self.rope_base(i) for i in range(self.n_layer)))

    @property
    def scale(self) -> float:
        return self.attention_scale if self.attention_scale is not None else 1.0 / math.sqrt(self.head_dim)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    rows: int  # N (out-features; 1 for vectors)
    cols: int  # K (in-features, the axis GGUF blocks run along)
    raw: np.ndarray  # uint8 [rows, bytes per row] exactly as stored, rows already un-permuted

    def dequantize(self) -> np.ndarray:
        """fp32 [rows, cols]."""
        return np.asarray(dequantize(self.raw, self.qtype), dtype=np.float32).reshape(self.rows, self.cols)

    def row_slice(self, start: int, stop: int, name: str) -> GGUFTensor:
        """Rows start..stop as a tensor of its own (blocks run along the columns, so rows split exactly)."""
        return GGUFTensor(name, self.qtype, stop - start, self.cols, self.raw[start:stop])

    def vector(self) -> np.ndarray:
        """fp32 [cols] for a 1-D tensor (norm weights)."""
        return self.dequantize().reshape(-1)


@dataclass(frozen=True)
class TokenizerData:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    token_types: list[int]  # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    merges: list[str]
    scores: list[float] | None
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    add_space_prefix: bool  # SentencePiece: prepend "▁" to the text
    chat_template: str | None


@dataclass
class GGUFModel:
    path: Path
    name: str
    hparams: HParams
    tokenizer: TokenizerData
    tensors: dict[str, GGUFTensor] = field(repr=False)

    def tensor(self, kind: MODEL_TENSOR, layer: int | None = None) -> GGUFTensor:
        return self.tensors[tensor_name(kind, layer)]

    def layer(self, i: int, kind: MODEL_TENSOR) -> GGUFTensor:
        return self.tensor(kind, i)

    def bias(self, i: int, kind: MODEL_TENSOR) -> np.ndarray | None:
        t = self.tensors.get(tensor_name(kind, i, "bias"))
        return None if t is None else t.vector()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Metadata:
    """A GGUF's key/value fields; `{arch}` in a key (gguf.Keys.LLM and friends) is the file's architecture."""

    def __init__(self, fields: dict[str, Any], path: Path) -> None:
        self._fields = fields
        self.file = path.name
        self.arch = str(self.get(Keys.General.ARCHITECTURE, ""))

    def get(self, key: str, default: Any = None) -> Any:
        value = self._fields.get(key.format(arch=self.arch) if "{arch}" in key else key)
        if value is None:
            return default
        return value.item() if isinstance(value, np.generic) else value

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UnsupportedModelError(f"{self.file}: missing GGUF key {key.format(arch=self.arch)}")
        return value

    def optional_int(self, key: str) -> int | None:
        value = self.get(key)
        return None if value is None else int(value)


def _unpermute_rows(raw: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows from Hugging Face's half-split rotary layout
    (pairs (i, i + d/2)) to the interleaved GPT-J layout (pairs (2i, 2i + 1)). Blocks run along the
    columns, so whole rows can be moved without touching the quantized data."""
    rows = raw.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(raw.reshape(n_head, half, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape))


def _check_header(meta: _Metadata, tensors: list[TensorInfo]) -> None:
    """Everything that can be refused from the header alone."""
    if meta.arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {meta.arch!r} in {meta.file}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    for t in tensors:
        if t.qtype not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{meta.file}: tensor {t.name} has unsupported type {t.type_name}; "
                f"supported: {', '.join(q.name for q in SUPPORTED_TYPES)}"
            )
    rope_scaling = meta.get(Keys.Rope.SCALING_TYPE)
    if rope_scaling not in (None, "none"):
        raise UnsupportedModelError(f"{meta.file}: unsupported rope scaling {rope_scaling!r}")
    if meta.get(Keys.LLM.EXPERT_COUNT, 0):
        raise UnsupportedModelError(f"{meta.file}: mixture-of-experts models are not supported")
    if meta.get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING):
        raise UnsupportedModelError(f"{meta.file}: attention logit softcapping is not supported")
    names = {t.name for t in tensors}
    for kind in (MODEL_TENSOR.ROPE_FACTORS_LONG, MODEL_TENSOR.ROPE_FACTORS_SHORT, MODEL_TENSOR.ROPE_FREQS):
        if tensor_name(kind) in names:
            raise UnsupportedModelError(f"{meta.file}: rope frequency factors ({tensor_name(kind)}) are not supported")


def _sliding_layers(meta: _Metadata, n_layer: int) -> tuple[int | None, tuple[bool, ...]]:
    window = meta.optional_int(Keys.Attention.SLIDING_WINDOW)
    if not window:
        return None, ()
    pattern = meta.get(Keys.Attention.SLIDING_WINDOW_PATTERN)
    if pattern is not None and not isinstance(pattern, int | float):
        return window, tuple(bool(x) for x in pattern)  # per-layer flags
    if meta.arch == GEMMA3:  # windowed except every n-th layer
        every = int(pattern or GEMMA3_SLIDING_PATTERN)
        return window, tuple((i + 1) % every != 0 for i in range(n_layer))
    return window, (True,) * n_layer  # Mistral, Phi-3: every layer


def _read_hparams(meta: _Metadata, tensors: dict[str, GGUFTensor]) -> HParams:
    n_head = int(meta.require(Keys.Attention.HEAD_COUNT))
    hidden = int(meta.require(Keys.LLM.EMBEDDING_LENGTH))
    head_dim = int(meta.get(Keys.Attention.KEY_LENGTH, hidden // n_head))
    if int(meta.get(Keys.Attention.VALUE_LENGTH, head_dim)) != head_dim:
        raise UnsupportedModelError(f"{meta.file}: key and value head sizes differ")
    rope_dim = int(meta.get(Keys.Rope.DIMENSION_COUNT, head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{meta.file}: partial rotary (rope dim {rope_dim} != head dim {head_dim})")
    emb = tensors.get(tensor_name(MODEL_TENSOR.TOKEN_EMBD))
    if emb is None:
        raise UnsupportedModelError(f"{meta.file}: no {tensor_name(MODEL_TENSOR.TOKEN_EMBD)} tensor")
    n_layer = int(meta.require(Keys.LLM.BLOCK_COUNT))
    window, sliding = _sliding_layers(meta, n_layer)
    gemma = meta.arch == GEMMA3
    softcap = meta.get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
    return HParams(
        arch=meta.arch,
        n_layer=n_layer,
        hidden_size=hidden,
        intermediate_size=int(meta.require(Keys.LLM.FEED_FORWARD_LENGTH)),
        n_head=n_head,
        n_head_kv=int(meta.get(Keys.Attention.HEAD_COUNT_KV, n_head)),
        head_dim=head_dim,
        rope_theta=float(meta.get(Keys.Rope.FREQ_BASE, 10000.0)),
        rms_norm_eps=float(meta.require(Keys.Attention.LAYERNORM_RMS_EPS)),
        context_length=int(meta.require(Keys.LLM.CONTEXT_LENGTH)),
        vocab_size=int(meta.get(Keys.LLM.VOCAB_SIZE, emb.rows)),
        tie_word_embeddings=tensor_name(MODEL_TENSOR.OUTPUT) not in tensors,
        sliding_window=window,
        sliding_layers=sliding,
        rope_theta_local=(float(meta.get(Keys.Rope.FREQ_BASE_SWA, GEMMA3_LOCAL_ROPE_BASE)) if gemma
                          else meta.get(Keys.Rope.FREQ_BASE_SWA)),
        attention_scale=meta.get(Keys.Attention.SCALE),
        embedding_scale=math.sqrt(hidden) if gemma else 1.0,
        final_logit_softcap=float(softcap) if softcap else None,
        qkv_bias=tensor_name(MODEL_TENSOR.ATTN_Q, 0, "bias") in tensors,
        qk_norm=tensor_name(MODEL_TENSOR.ATTN_Q_NORM, 0) in tensors,
        post_norms=tensor_name(MODEL_TENSOR.ATTN_POST_NORM, 0) in tensors,
        activation="gelu_tanh" if gemma else "silu",
    )


def _read_tensors(header: GGUFHeader) -> dict[str, GGUFTensor]:
    tensors: dict[str, GGUFTensor] = {}
    for t in header.tensors:
        assert t.qtype is not None  # _check_header refused unknown types
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        tensors[t.name] = GGUFTensor(t.name, t.qtype, rows, t.shape[0], header.data(t))
    return tensors


def _split_fused(tensors: dict[str, GGUFTensor], hp: HParams) -> None:
    """phi3 stores q|k|v as one attn_qkv and gate|up as one ffn_up (gate first): split them by rows."""
    for i in range(hp.n_layer):
        qkv = tensors.pop(tensor_name(MODEL_TENSOR.ATTN_QKV, i), None)
        if qkv is not None:
            bounds = [0, hp.q_size, hp.q_size + hp.kv_size, hp.q_size + 2 * hp.kv_size]
            for kind, start, stop in zip(QKV, bounds, bounds[1:]):
                tensors[tensor_name(kind, i)] = qkv.row_slice(start, stop, tensor_name(kind, i))
        up_name = tensor_name(MODEL_TENSOR.FFN_UP, i)
        if tensor_name(MODEL_TENSOR.FFN_GATE, i) not in tensors and up_name in tensors:
            up, ff = tensors[up_name], hp.intermediate_size
            if up.rows == 2 * ff:
                tensors[tensor_name(MODEL_TENSOR.FFN_GATE, i)] = up.row_slice(0, ff, tensor_name(MODEL_TENSOR.FFN_GATE, i))
                tensors[up_name] = up.row_slice(ff, 2 * ff, up_name)


def _check_layers(tensors: dict[str, GGUFTensor], hp: HParams, file: str) -> None:
    needed = list(LAYER_TENSORS)
    if hp.qk_norm:
        needed += QK_NORMS
    if hp.post_norms:
        needed += POST_NORMS
    for i in range(hp.n_layer):
        for kind in needed:
            if tensor_name(kind, i) not in tensors:
                raise UnsupportedModelError(f"{file}: missing tensor {tensor_name(kind, i)}")
        for kind in QKV:
            if (tensor_name(kind, i, "bias") in tensors) != hp.qkv_bias:
                raise UnsupportedModelError(f"{file}: q/k/v biases on some layers only")
        if tensor_name(MODEL_TENSOR.ATTN_OUT, i, "bias") in tensors:
            raise UnsupportedModelError(f"{file}: attention output biases are not supported")


def _unpermute_qk(tensors: dict[str, GGUFTensor], hp: HParams) -> None:
    """llama.cpp permutes Q/K rows of llama models only (other architectures keep the half-split layout)."""
    if hp.arch != LLAMA:
        return
    for kind, heads in ((MODEL_TENSOR.ATTN_Q, hp.n_head), (MODEL_TENSOR.ATTN_K, hp.n_head_kv)):
        for i in range(hp.n_layer):
            t = tensors[tensor_name(kind, i)]
            tensors[t.name] = replace(t, raw=_unpermute_rows(t.raw, heads))


def _read_tokenizer(meta: _Metadata) -> TokenizerData:
    tokens = list(meta.get(Keys.Tokenizer.LIST, []))
    scores = meta.get(Keys.Tokenizer.SCORES)
    tok_model = str(meta.get(Keys.Tokenizer.MODEL, ""))
    spm = tok_model == "llama"  # llama.cpp's defaults differ for SentencePiece vocabularies
    return TokenizerData(
        model=tok_model,
        pre=str(meta.get(Keys.Tokenizer.PRE, "default")),
        tokens=tokens,
        token_types=[int(x) for x in meta.get(Keys.Tokenizer.TOKEN_TYPE, [1] * len(tokens))],
        merges=list(meta.get(Keys.Tokenizer.MERGES, [])),
        scores=None if scores is None else [float(s) for s in scores],
        bos_token_id=meta.optional_int(Keys.Tokenizer.BOS_ID),
        eos_token_id=meta.optional_int(Keys.Tokenizer.EOS_ID),
        unk_token_id=meta.optional_int(Keys.Tokenizer.UNK_ID),
        pad_token_id=meta.optional_int(Keys.Tokenizer.PAD_ID),
        add_bos_token=bool(meta.get(Keys.Tokenizer.ADD_BOS, spm)),
        add_eos_token=bool(meta.get(Keys.Tokenizer.ADD_EOS, False)),
        add_space_prefix=bool(meta.get(Keys.Tokenizer.ADD_PREFIX, spm)),
        chat_template=meta.get(Keys.Tokenizer.CHAT_TEMPLATE),
    )


def read_gguf(path: str | Path) -> GGUFModel:
    path = Path(path)
    header = read_header(path)
    meta = _Metadata(header.fields, path)
    _check_header(meta, header.tensors)
    tensors = _read_tensors(header)
    hparams = _read_hparams(meta, tensors)
    _split_fused(tensors, hparams)
    _check_layers(tensors, hparams, path.name)
    _unpermute_qk(tensors, hparams)
    name = str(meta.get(Keys.General.NAME, path.stem))
    return GGUFModel(path=path, name=name, hparams=hparams, tokenizer=_read_tokenizer(meta), tensors=tensors)
