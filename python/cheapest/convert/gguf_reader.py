"""Read a llama-architecture GGUF: hyper-parameters, tokenizer data and raw tensors.

Tensors stay in their GGUF block encoding (`GGUFTensor.raw`); the graph builders decide whether to
dequantize them (the fp32 reference graph) or to repack the blocks as they are (the fused graph).

Rows are in numpy order: a GGUF weight with `ne = [K, N]` is a `[N, K]` matrix (out-features x in-features),
the same as a PyTorch `nn.Linear.weight`. The Q and K projections come out of the reader already
un-permuted (see `_unpermute_rows`), so every consumer sees Hugging Face's half-split rotary layout.

Metadata keys and tensor names are the `gguf` package's own constants (`Keys`, `TENSOR_NAMES`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSOR, TENSOR_NAMES, GGMLQuantizationType, GGUFReader, Keys
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = (MODEL_ARCH_NAMES[MODEL_ARCH.LLAMA],)
SUPPORTED_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
)
LAYER_TENSORS = (
    MODEL_TENSOR.ATTN_NORM, MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_OUT,
    MODEL_TENSOR.FFN_NORM, MODEL_TENSOR.FFN_GATE, MODEL_TENSOR.FFN_UP, MODEL_TENSOR.FFN_DOWN,
)


class UnsupportedModelError(ValueError):
    """The GGUF uses an architecture, tensor type or feature the converter does not handle."""


def tensor_name(kind: MODEL_TENSOR, layer: int | None = None, suffix: str = "weight") -> str:
    """The GGUF name of a tensor, e.g. (ATTN_Q, 3) -> "blk.3.attn_q.weight"."""
    base = TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


@dataclass(frozen=True)
class LlamaHParams:
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

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: GGMLQuantizationType
    rows: int  # N (out-features; 1 for vectors)
    cols: int  # K (in-features, the axis GGUF blocks run along)
    raw: np.ndarray  # [rows, bytes or elements per row] exactly as stored, rows already un-permuted

    def dequantize(self) -> np.ndarray:
        """fp32 [rows, cols]."""
        return np.asarray(dequantize(self.raw, self.qtype), dtype=np.float32).reshape(self.rows, self.cols)

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
    hparams: LlamaHParams
    tokenizer: TokenizerData
    tensors: dict[str, GGUFTensor] = field(repr=False)

    def tensor(self, kind: MODEL_TENSOR, layer: int | None = None) -> GGUFTensor:
        return self.tensors[tensor_name(kind, layer)]

    def layer(self, i: int, kind: MODEL_TENSOR) -> GGUFTensor:
        return self.tensor(kind, i)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Metadata:
    """A GGUF's key/value fields; `{arch}` in a key (gguf.Keys.LLM and friends) is the file's architecture."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._reader = reader
        self.file = path.name
        self.arch = str(self.get(Keys.General.ARCHITECTURE, ""))

    def get(self, key: str, default: Any = None) -> Any:
        f = self._reader.fields.get(key.format(arch=self.arch) if "{arch}" in key else key)
        return default if f is None else f.contents()

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


def _check_architecture(meta: _Metadata) -> None:
    if meta.arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {meta.arch!r} in {meta.file}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope_scaling = meta.get(Keys.Rope.SCALING_TYPE)
    if rope_scaling not in (None, "none"):
        raise UnsupportedModelError(f"{meta.file}: unsupported rope scaling {rope_scaling!r}")
    if meta.get(Keys.LLM.EXPERT_COUNT, 0):
        raise UnsupportedModelError(f"{meta.file}: mixture-of-experts llama models are not supported")


def _read_hparams(meta: _Metadata, tensors: dict[str, GGUFTensor]) -> LlamaHParams:
    n_head = int(meta.require(Keys.Attention.HEAD_COUNT))
    hidden = int(meta.require(Keys.LLM.EMBEDDING_LENGTH))
    head_dim = int(meta.get(Keys.Attention.KEY_LENGTH, hidden // n_head))
    rope_dim = int(meta.get(Keys.Rope.DIMENSION_COUNT, head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{meta.file}: partial rotary (rope dim {rope_dim} != head dim {head_dim})")
    emb = tensors.get(tensor_name(MODEL_TENSOR.TOKEN_EMBD))
    if emb is None:
        raise UnsupportedModelError(f"{meta.file}: no {tensor_name(MODEL_TENSOR.TOKEN_EMBD)} tensor")
    return LlamaHParams(
        n_layer=int(meta.require(Keys.LLM.BLOCK_COUNT)),
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
    )


def _read_tensors(reader: GGUFReader, path: Path) -> dict[str, GGUFTensor]:
    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}; "
                f"supported: {', '.join(q.name for q in SUPPORTED_TYPES)}"
            )
        ne = [int(x) for x in t.shape]  # GGUF order: ne[0] = columns
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        raw = np.asarray(t.data).reshape(rows, -1)
        tensors[t.name] = GGUFTensor(t.name, GGMLQuantizationType(t.tensor_type), rows, ne[0], raw)
    return tensors


def _check_layers(tensors: dict[str, GGUFTensor], hp: LlamaHParams, file: str) -> None:
    for i in range(hp.n_layer):
        for kind in LAYER_TENSORS:
            if tensor_name(kind, i) not in tensors:
                raise UnsupportedModelError(f"{file}: missing tensor {tensor_name(kind, i)}")
        for kind in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V, MODEL_TENSOR.ATTN_OUT):
            if tensor_name(kind, i, "bias") in tensors:
                raise UnsupportedModelError(f"{file}: attention biases are not supported")


def _unpermute_qk(tensors: dict[str, GGUFTensor], hp: LlamaHParams) -> None:
    for kind, heads in ((MODEL_TENSOR.ATTN_Q, hp.n_head), (MODEL_TENSOR.ATTN_K, hp.n_head_kv)):
        for i in range(hp.n_layer):
            t = tensors[tensor_name(kind, i)]
            tensors[t.name] = GGUFTensor(t.name, t.qtype, t.rows, t.cols, _unpermute_rows(t.raw, heads))


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
    reader = GGUFReader(path)
    meta = _Metadata(reader, path)
    _check_architecture(meta)
    tensors = _read_tensors(reader, path)
    hparams = _read_hparams(meta, tensors)
    _check_layers(tensors, hparams, path.name)
    _unpermute_qk(tensors, hparams)
    name = str(meta.get(Keys.General.NAME, path.stem))
    return GGUFModel(path=path, name=name, hparams=hparams, tokenizer=_read_tokenizer(meta), tensors=tensors)
