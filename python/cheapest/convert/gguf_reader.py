"""Read a llama-architecture GGUF: hyper-parameters, tokenizer data and raw tensors.

Tensors stay in their GGUF block encoding (`GGUFTensor.raw`); the graph builders decide whether to
dequantize them (the fp32 reference graph) or to repack the blocks as they are (the fused graph).

Rows are in numpy order: a GGUF weight with `ne = [K, N]` is a `[N, K]` matrix (out-features x in-features),
the same as a PyTorch `nn.Linear.weight`. The Q and K projections come out of the reader already
un-permuted (see `_unpermute_rows`), so every consumer sees Hugging Face's half-split rotary layout.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = (
    GGMLQuantizationType.F32,
    GGMLQuantizationType.F16,
    GGMLQuantizationType.Q8_0,
    GGMLQuantizationType.Q4_0,
    GGMLQuantizationType.Q4_1,
)


class UnsupportedModelError(ValueError):
    """The GGUF uses an architecture, tensor type or feature the converter does not handle."""


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

    def layer(self, i: int, part: str) -> GGUFTensor:
        return self.tensors[f"blk.{i}.{part}.weight"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader: GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute_rows(raw: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    llama.cpp's converter reorders each head's rows from Hugging Face's half-split rotary layout
    (pairs (i, i + d/2)) to the interleaved GPT-J layout (pairs (2i, 2i + 1)). Blocks run along the
    columns, so whole rows can be moved without touching the quantized data."""
    rows = raw.shape[0]
    half = rows // n_head // 2
    return np.ascontiguousarray(raw.reshape(n_head, half, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape))


def read_gguf(path: str | Path) -> GGUFModel:
    path = Path(path)
    reader = GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported GGUF architecture {arch!r} in {path.name}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def hp(key: str, default=None):
        value = _field(reader, f"{arch}.{key}", default)
        if value is None:
            raise UnsupportedModelError(f"{path.name}: missing GGUF key {arch}.{key}")
        return value

    rope_scaling = _field(reader, f"{arch}.rope.scaling.type")
    if rope_scaling not in (None, "none"):
        raise UnsupportedModelError(f"{path.name}: unsupported rope scaling {rope_scaling!r}")
    if _field(reader, f"{arch}.expert_count", 0):
        raise UnsupportedModelError(f"{path.name}: mixture-of-experts llama models are not supported")

    n_head = int(hp("attention.head_count"))
    hidden = int(hp("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UnsupportedModelError(f"{path.name}: partial rotary (rope dim {rope_dim} != head dim {head_dim})")

    tensors: dict[str, GGUFTensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} has unsupported type {t.tensor_type.name}; "
                f"supported: {', '.join(q.name for q in SUPPORTED_TYPES)}"
            )
        ne = [int(x) for x in t.shape]  # GGUF order: ne[0] = columns
        cols = ne[0]
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        raw = np.asarray(t.data).reshape(rows, -1)
        tensors[t.name] = GGUFTensor(t.name, GGMLQuantizationType(t.tensor_type), rows, cols, raw)

    n_head_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    for name, heads in (("attn_q", n_head), ("attn_k", n_head_kv)):
        for key in [k for k in tensors if k.endswith(f".{name}.weight")]:
            qk = tensors[key]
            tensors[key] = GGUFTensor(qk.name, qk.qtype, qk.rows, qk.cols, _unpermute_rows(qk.raw, heads))

    tokens = list(_field(reader, "tokenizer.ggml.tokens", []))
    emb = tensors.get("token_embd.weight")
    if emb is None:
        raise UnsupportedModelError(f"{path.name}: no token_embd.weight tensor")
    n_layer = int(hp("block_count"))
    for i in range(n_layer):
        for part in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                     "ffn_down"):
            if f"blk.{i}.{part}.weight" not in tensors:
                raise UnsupportedModelError(f"{path.name}: missing tensor blk.{i}.{part}.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            if f"blk.{i}.{part}.bias" in tensors:
                raise UnsupportedModelError(f"{path.name}: attention biases are not supported")

    hparams = LlamaHParams(
        n_layer=n_layer,
        hidden_size=hidden,
        intermediate_size=int(hp("feed_forward_length")),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(hp("attention.layer_norm_rms_epsilon")),
        context_length=int(hp("context_length")),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", emb.rows)),
        tie_word_embeddings="output.weight" not in tensors,
    )

    def opt_int(key: str) -> int | None:
        v = _field(reader, key)
        return None if v is None else int(v)

    scores = _field(reader, "tokenizer.ggml.scores")
    tok_model = str(_field(reader, "tokenizer.ggml.model", ""))
    spm = tok_model == "llama"  # llama.cpp's defaults differ for SentencePiece vocabularies
    tok = TokenizerData(
        model=tok_model,
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))],
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        scores=None if scores is None else [float(s) for s in scores],
        bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
        unk_token_id=opt_int("tokenizer.ggml.unknown_token_id"),
        pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", spm)),
        add_eos_token=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", spm)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    name = str(_field(reader, "general.name", path.stem))
    return GGUFModel(path=path, name=name, hparams=hparams, tokenizer=tok, tensors=tensors)
