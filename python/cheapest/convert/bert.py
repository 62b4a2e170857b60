"""BERT-family sentence-embedding model (safetensors + sentence-transformers files) -> model directory.

The source is a folder or a zip (all-MiniLM-L6-v2 ships as model.zip) holding model.safetensors, config.json,
tokenizer.json and sentence-transformers' modules.json, 1_Pooling/config.json and sentence_bert_config.json.
The weights are read with the `safetensors` package; the output (cheapest.model_layout) has:

  onnx/model.onnx       the served graph: ONNX Runtime's fused encoder operators (EmbedLayerNormalization,
                        Attention, SkipLayerNormalization, BiasGelu / FastGelu), fp32 weights
  onnx/model_fp32.onnx  the reference: the same network in plain ONNX operators
  both end in the pooling the pooling config names (mean over the attention mask, or CLS) and, when modules.json
  has a Normalize module, L2 normalization: output `sentence_embedding` [batch, hidden], beside
  `last_hidden_state`.

Not built (yet): an int8 or fp16 variant; it would have to keep cosine >= 0.999 against the fp32 graph on every
input. The one served graph is the exact fp32 one (bench/bench_embeddings.py measures it).

The output is a pure function of the source bytes and BERT_CONVERTER_VERSION; the directory is built beside its
destination, the manifest written last, and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from cheapest.model_layout import (
    ATTENTION_MASK, CONFIG, FUSED_GRAPH, INPUT_IDS, LAST_HIDDEN_STATE, MODULES, NORMALIZE_MODULE, POOLING_CONFIG,
    REFERENCE_GRAPH, SENTENCE_CONFIG, SENTENCE_EMBEDDING, TOKEN_TYPE_IDS, TOKENIZER, TOKENIZER_CONFIG, Module,
    PoolingConfig, SentenceConfig, Source,
)

from .converter import write_manifest
from .gguf_reader import file_sha256

BERT_CONVERTER_VERSION = "bert-1"
WEIGHTS = "model.safetensors"
OPSET = 17
MS = "com.microsoft"
# Hugging Face's names for the activation; the tanh approximation maps onto FastGelu.
_EXACT_GELU, _TANH_GELU = {"gelu"}, {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}


class UnsupportedEncoderError(ValueError):
    """The source is not a BERT-family sentence-embedding model this converter builds."""


class BertConfig(msgspec.Struct, frozen=True, kw_only=True):
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    model_type: str = "bert"
    position_embedding_type: str = "absolute"


@dataclass(frozen=True)
class EncoderSource:
    config: BertConfig
    weights: dict[str, np.ndarray]
    files: dict[str, bytes]  # the source's JSON files by layout name
    pooling: str  # "mean" or "cls"
    normalize: bool


_COPIED = (CONFIG, TOKENIZER_CONFIG, POOLING_CONFIG, MODULES, SENTENCE_CONFIG, "special_tokens_map.json",
           "config_sentence_transformers.json")


def _read_files(source: Path) -> dict[str, bytes]:
    """The source's files by relative name: from a zip, or a folder."""
    wanted = (WEIGHTS, TOKENIZER, *_COPIED)
    if source.is_dir():
        return {name: (source / name).read_bytes() for name in wanted if (source / name).is_file()}
    with zipfile.ZipFile(source) as zf:
        members = [n for n in zf.namelist() if not n.endswith("/")]
        # A zip of the folder itself ("all-MiniLM-L6-v2/config.json") or of its contents ("config.json").
        top = {n.split("/", 1)[0] for n in members}
        strip = len(top) == 1 and all("/" in n for n in members) and CONFIG not in members
        names = {n.split("/", 1)[1] if strip else n: n for n in members}
        return {name: zf.read(names[name]) for name in wanted if name in names}


def read_encoder(source: str | os.PathLike[str]) -> EncoderSource:
    from safetensors.numpy import load

    files = _read_files(Path(source))
    for needed in (WEIGHTS, CONFIG, TOKENIZER, POOLING_CONFIG):
        if needed not in files:
            raise UnsupportedEncoderError(f"the source has no {needed}")
    config = msgspec.json.decode(files[CONFIG], type=BertConfig)
    if config.model_type not in ("bert", "roberta", "xlm-roberta") or config.position_embedding_type != "absolute":
        raise UnsupportedEncoderError(f"unsupported encoder {config.model_type!r} "
                                      f"({config.position_embedding_type} positions)")
    if config.hidden_act not in _EXACT_GELU | _TANH_GELU:
        raise UnsupportedEncoderError(f"unsupported activation {config.hidden_act!r}")
    pooling_config = msgspec.json.decode(files[POOLING_CONFIG], type=PoolingConfig)
    modes = [m for m, on in (("cls", pooling_config.pooling_mode_cls_token),
                             ("mean", pooling_config.pooling_mode_mean_tokens),
                             ("max", pooling_config.pooling_mode_max_tokens),
                             ("mean_sqrt_len", pooling_config.pooling_mode_mean_sqrt_len_tokens)) if on]
    if modes not in (["cls"], ["mean"]):
        raise UnsupportedEncoderError(f"unsupported pooling {'+'.join(modes) or 'none'} (mean or cls only)")
    modules = msgspec.json.decode(files.get(MODULES, b"[]"), type=list[Module])
    raw = load(files.pop(WEIGHTS))
    prefix = next((p for p in ("bert.", "roberta.", "") if p + "embeddings.word_embeddings.weight" in raw), None)
    if prefix is None:
        raise UnsupportedEncoderError("the weights have no embeddings.word_embeddings.weight")
    weights = {k[len(prefix):]: np.asarray(v, np.float32) for k, v in raw.items() if k.startswith(prefix)}
    return EncoderSource(config, weights, files, modes[0], any(m.type == NORMALIZE_MODULE for m in modules))


# --- graphs ---------------------------------------------------------------------------------------------------


class _Graph:
    """Nodes and initializers in the order they are added (so the file is the same every time)."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], *, outputs: int = 1, name: str | None = None,
           domain: str = "", **attrs: Any) -> str:
        self._n += 1
        base = name or f"{op_type.lower()}_{self._n}"
        outs = [base] if outputs == 1 else [f"{base}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._n}_{op_type}", domain=domain,
                                           **attrs))
        return outs[0]

    def model(self, outputs: list[onnx.ValueInfoProto], hidden: int) -> onnx.ModelProto:
        dims = ["batch", "sequence"]
        inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims)
                  for n in (INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS)]
        graph = helper.make_graph(self.nodes, "encoder", inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                                  producer_name="cheapest")
        model.ir_version = 8
        return model


def _outputs(hidden: int) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(LAST_HIDDEN_STATE, TensorProto.FLOAT, ["batch", "sequence", hidden]),
            helper.make_tensor_value_info(SENTENCE_EMBEDDING, TensorProto.FLOAT, ["batch", hidden])]


def _pool(g: _Graph, hidden_state: str, mask_f: str, pooling: str, normalize: bool) -> None:
    """[batch, seq, hidden] -> sentence_embedding [batch, hidden]: mean over the mask (or the first token), then
    L2 normalization as sentence-transformers does it (x / max(||x||, 1e-12))."""
    if pooling == "cls":
        pooled = g.op("Gather", [hidden_state, g.const("cls_index", np.array(0, np.int64))], axis=1)
    else:
        weight = g.op("Unsqueeze", [mask_f, g.const("axis_2", np.array([2], np.int64))])
        total = g.op("ReduceSum", [g.op("Mul", [hidden_state, weight]), g.const("axis_1", np.array([1], np.int64))],
                     keepdims=0)
        count = g.op("ReduceSum", [weight, "axis_1"], keepdims=0)
        pooled = g.op("Div", [total, g.op("Max", [count, g.const("min_count", np.array(1e-9, np.float32))])])
    if normalize:
        norm = g.op("ReduceL2", [pooled], axes=[-1], keepdims=1)  # axes an attribute until opset 18
        pooled = g.op("Div", [pooled, g.op("Max", [norm, g.const("min_norm", np.array(1e-12, np.float32))])])
    g.op("Identity", [pooled], name=SENTENCE_EMBEDDING)


def _t(w: np.ndarray) -> np.ndarray:
    """torch Linear weights [out, in] -> MatMul's [in, out]."""
    return np.ascontiguousarray(w.T)


def _layers(src: EncoderSource, progress: Callable | None, desc: str) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    n = src.config.num_hidden_layers
    bar = progress(total=n, desc=desc, unit="layer") if progress is not None else None
    for i in range(n):
        p = f"encoder.layer.{i}."
        yield i, {k[len(p):]: v for k, v in src.weights.items() if k.startswith(p)}
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def build_fused_encoder(src: EncoderSource, progress: Callable | None = None) -> onnx.ModelProto:
    c, w, g = src.config, src.weights, _Graph()
    eps = float(c.layer_norm_eps)
    ids32 = g.op("Cast", [INPUT_IDS], to=TensorProto.INT32)
    types32 = g.op("Cast", [TOKEN_TYPE_IDS], to=TensorProto.INT32)
    mask32 = g.op("Cast", [ATTENTION_MASK], to=TensorProto.INT32)
    x = g.op("EmbedLayerNormalization", [
        ids32, types32, g.const("word_embeddings", w["embeddings.word_embeddings.weight"]),
        g.const("position_embeddings", w["embeddings.position_embeddings.weight"]),
        g.const("token_type_embeddings", w["embeddings.token_type_embeddings.weight"]),
        g.const("embeddings_ln_weight", w["embeddings.LayerNorm.weight"]),
        g.const("embeddings_ln_bias", w["embeddings.LayerNorm.bias"]), mask32,
    ], outputs=2, domain=MS, epsilon=eps, name="embeddings")
    mask_index = "embeddings_1"
    for i, lw in _layers(src, progress, "fused graph"):
        a = f"layer{i}_"
        qkv_w = np.concatenate([_t(lw[f"attention.self.{n}.weight"]) for n in ("query", "key", "value")], axis=1)
        qkv_b = np.concatenate([lw[f"attention.self.{n}.bias"] for n in ("query", "key", "value")])
        attn = g.op("Attention", [x, g.const(a + "qkv_weight", qkv_w), g.const(a + "qkv_bias", qkv_b), mask_index],
                    domain=MS, num_heads=c.num_attention_heads)
        proj = g.op("MatMul", [attn, g.const(a + "attn_out_weight", _t(lw["attention.output.dense.weight"]))])
        x = g.op("SkipLayerNormalization", [
            proj, x, g.const(a + "attn_ln_weight", lw["attention.output.LayerNorm.weight"]),
            g.const(a + "attn_ln_bias", lw["attention.output.LayerNorm.bias"]),
            g.const(a + "attn_out_bias", lw["attention.output.dense.bias"])], domain=MS, epsilon=eps)
        up = g.op("MatMul", [x, g.const(a + "ffn_up_weight", _t(lw["intermediate.dense.weight"]))])
        act = g.op("BiasGelu" if c.hidden_act in _EXACT_GELU else "FastGelu",
                   [up, g.const(a + "ffn_up_bias", lw["intermediate.dense.bias"])], domain=MS)
        down = g.op("MatMul", [act, g.const(a + "ffn_down_weight", _t(lw["output.dense.weight"]))])
        x = g.op("SkipLayerNormalization", [
            down, x, g.const(a + "ffn_ln_weight", lw["output.LayerNorm.weight"]),
            g.const(a + "ffn_ln_bias", lw["output.LayerNorm.bias"]),
            g.const(a + "ffn_down_bias", lw["output.dense.bias"])], domain=MS, epsilon=eps)
    g.op("Identity", [x], name=LAST_HIDDEN_STATE)
    _pool(g, x, g.op("Cast", [ATTENTION_MASK], to=TensorProto.FLOAT), src.pooling, src.normalize)
    return g.model(_outputs(c.hidden_size), c.hidden_size)


def build_reference_encoder(src: EncoderSource, progress: Callable | None = None) -> onnx.ModelProto:
    c, w, g = src.config, src.weights, _Graph()
    eps, heads = float(c.layer_norm_eps), c.num_attention_heads
    head_dim = c.hidden_size // heads
    # Positions 0..S-1 of every row as a running count (ORT's embedding fusion would rewrite a Shape/Range chain
    # into a Slice it then cannot run).
    ones = g.op("Add", [g.op("Mul", [INPUT_IDS, g.const("zero", np.array(0, np.int64))]),
                        g.const("one", np.array(1, np.int64))])
    positions = g.op("Sub", [g.op("CumSum", [ones, g.const("seq_axis", np.array(1, np.int64))]), "one"])
    x = g.op("Add", [g.op("Add", [
        g.op("Gather", [g.const("word_embeddings", w["embeddings.word_embeddings.weight"]), INPUT_IDS]),
        g.op("Gather", [g.const("position_embeddings", w["embeddings.position_embeddings.weight"]), positions])]),
        g.op("Gather", [g.const("token_type_embeddings", w["embeddings.token_type_embeddings.weight"]),
                        TOKEN_TYPE_IDS])])
    x = g.op("LayerNormalization", [x, g.const("embeddings_ln_weight", w["embeddings.LayerNorm.weight"]),
                                    g.const("embeddings_ln_bias", w["embeddings.LayerNorm.bias"])], axis=-1,
             epsilon=eps)
    mask_f = g.op("Cast", [ATTENTION_MASK], to=TensorProto.FLOAT)
    # Padding keys get -1e9 before the softmax: exactly zero weight in float32.
    bias = g.op("Mul", [g.op("Sub", [g.const("one_f", np.array(1.0, np.float32)), mask_f]),
                        g.const("mask_fill", np.array(-1e9, np.float32))])
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", np.array([1, 2], np.int64))])
    split = g.const("split_heads", np.array([0, 0, heads, head_dim], np.int64))
    merge = g.const("merge_heads", np.array([0, 0, c.hidden_size], np.int64))
    scale = g.const("scale", np.array(1.0 / np.sqrt(head_dim), np.float32))

    def linear(inp: str, name: str, weight: np.ndarray, b: np.ndarray) -> str:
        return g.op("Add", [g.op("MatMul", [inp, g.const(name + "_weight", _t(weight))]), g.const(name + "_bias", b)])

    def layer_norm(inp: str, name: str, weight: np.ndarray, b: np.ndarray) -> str:
        return g.op("LayerNormalization", [inp, g.const(name + "_weight", weight), g.const(name + "_bias", b)],
                    axis=-1, epsilon=eps)

    for i, lw in _layers(src, progress, "reference graph"):
        a = f"layer{i}_"
        q, k, v = (g.op("Reshape", [linear(x, a + n, lw[f"attention.self.{n}.weight"],
                                           lw[f"attention.self.{n}.bias"]), split])
                   for n in ("query", "key", "value"))
        q = g.op("Transpose", [q], perm=[0, 2, 1, 3])
        k = g.op("Transpose", [k], perm=[0, 2, 3, 1])
        v = g.op("Transpose", [v], perm=[0, 2, 1, 3])
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), bias])
        ctx = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        ctx = g.op("Reshape", [g.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        attn = linear(ctx, a + "attn_out", lw["attention.output.dense.weight"], lw["attention.output.dense.bias"])
        x = layer_norm(g.op("Add", [attn, x]), a + "attn_ln", lw["attention.output.LayerNorm.weight"],
                       lw["attention.output.LayerNorm.bias"])
        h = linear(x, a + "ffn_up", lw["intermediate.dense.weight"], lw["intermediate.dense.bias"])
        h = _gelu(g, h, c.hidden_act in _EXACT_GELU)
        out = linear(h, a + "ffn_down", lw["output.dense.weight"], lw["output.dense.bias"])
        x = layer_norm(g.op("Add", [out, x]), a + "ffn_ln", lw["output.LayerNorm.weight"], lw["output.LayerNorm.bias"])
    g.op("Identity", [x], name=LAST_HIDDEN_STATE)
    _pool(g, x, mask_f, src.pooling, src.normalize)
    return g.model(_outputs(c.hidden_size), c.hidden_size)


def _gelu(g: _Graph, x: str, exact: bool) -> str:
    half = g.const(f"half_{len(g.nodes)}", np.array(0.5, np.float32))
    one = g.const(f"one_{len(g.nodes)}", np.array(1.0, np.float32))
    if exact:  # 0.5 x (1 + erf(x / sqrt 2))
        inner = g.op("Erf", [g.op("Mul", [x, g.const(f"rsqrt2_{len(g.nodes)}", np.array(1 / np.sqrt(2), np.float32))])])
    else:  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        cube = g.op("Mul", [g.op("Mul", [x, x]), x])
        poly = g.op("Add", [x, g.op("Mul", [cube, g.const(f"c_{len(g.nodes)}", np.array(0.044715, np.float32))])])
        inner = g.op("Tanh", [g.op("Mul", [poly, g.const(f"k_{len(g.nodes)}",
                                                         np.array(np.sqrt(2 / np.pi), np.float32))])])
    return g.op("Mul", [g.op("Mul", [x, half]), g.op("Add", [inner, one])])


# --- the directory --------------------------------------------------------------------------------------------


def _tokenizer_json(data: bytes) -> bytes:
    """The source tokenizer without its fixed padding and truncation: the engine pads batches and caps inputs
    itself, and token counts must be the text's own."""
    doc = json.loads(data)
    doc["padding"] = None
    doc["truncation"] = None
    return (json.dumps(doc, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def is_encoder_converted(out_dir: Path, source_sha256: str) -> bool:
    from .converter import is_converted

    return is_converted(out_dir, source_sha256, BERT_CONVERTER_VERSION)


def convert_encoder(source: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                    progress: Callable | None = None, source_sha256: str | None = None,
                    notices: dict[str, bytes] | None = None) -> Path:
    """Convert a sentence-embedding model (folder or zip) into `out_dir`; `progress` is tqdm-like or None."""
    source, out_dir = Path(source), Path(out_dir)
    src = read_encoder(source)
    sha = source_sha256 or (file_sha256(source) if source.is_file() else _folder_sha256(source))
    work = out_dir.with_name(out_dir.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    (work / FUSED_GRAPH).parent.mkdir(parents=True)
    for build, path in ((build_fused_encoder, FUSED_GRAPH), (build_reference_encoder, REFERENCE_GRAPH)):
        onnx.save_model(build(src, progress), str(work / path))
    (work / TOKENIZER).write_bytes(_tokenizer_json(src.files[TOKENIZER]))
    for name in _COPIED:
        if name in src.files:
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(src.files[name])
    if SENTENCE_CONFIG not in src.files:  # the engine caps inputs at the model's positions then
        (work / SENTENCE_CONFIG).write_bytes(msgspec.json.encode(
            SentenceConfig(max_seq_length=src.config.max_position_embeddings)) + b"\n")
    for name, data in (notices or {}).items():
        (work / Path(name).name).write_bytes(data)
    write_manifest(work, Source(file=source.name, sha256=sha), BERT_CONVERTER_VERSION)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir


def _folder_sha256(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for piece in iter(lambda: f.read(1 << 20), b""):
                digest.update(piece)
    return digest.hexdigest()
