"""The model directory: the files the converter writes, the engine reads, and the JSON keys between them.

A model directory follows Hugging Face's ONNX export layout, so exports made elsewhere load too:

  onnx/model.onnx (+ model.onnx_data)            the served graph (the converter's fused graph)
  onnx/model_fp32.onnx (+ model_fp32.onnx_data)  the converter's fp32 reference graph
  config.json                                    `ModelConfig`: dimensions, token ids, attention windows, and
                                                 a "cheapest" section (`CheapestSection`) saying how to drive
                                                 each graph (`GraphContract`)
  generation_config.json                         `GenerationConfig`
  tokenizer.json, tokenizer_config.json          the `tokenizers` pipeline; the chat template, if any
  licence files (e.g. GEMMA_TERMS.html)          the model's licence notice, when its source ships one
  cheapest_manifest.json                         `Manifest`, written LAST: the directory is complete when it
                                                 exists

Graph inputs and outputs use the export names: input_ids, attention_mask, position_ids,
past_key_values.{i}.key/.value -> logits, present.{i}.key/.value.

A sentence-embedding model (a BERT-family encoder) has the same onnx/ files and config.json, tokenizer.json
(without padding or truncation: the engine batches and caps inputs itself), and sentence-transformers' own files:
1_Pooling/config.json, modules.json, sentence_bert_config.json. Its graphs take input_ids, attention_mask,
token_type_ids (right-padded) and give last_hidden_state and sentence_embedding (pooled and normalized as those
files say).

Both sides encode and decode these files through the Structs below, so a key is spelled once; decoding
ignores keys it does not know (config.json carries Hugging Face's descriptive keys besides ours).
"""

from __future__ import annotations

from typing import Literal

import msgspec

ONNX_DIR = "onnx"
FUSED_GRAPH = "onnx/model.onnx"
# The fused graph with the core's ONNX Runtime custom operators (convert/graph_passes.py), served on CPU.
CPU_GRAPH = "onnx/model_cpu.onnx"
REFERENCE_GRAPH = "onnx/model_fp32.onnx"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MANIFEST = "cheapest_manifest.json"
# Sentence-embedding models (the sentence-transformers layout, beside the ONNX export's files):
POOLING_CONFIG = "1_Pooling/config.json"  # pooling_mode_mean_tokens / pooling_mode_cls_token / ...
MODULES = "modules.json"  # the module list; a ...models.Normalize entry means L2-normalized vectors
SENTENCE_CONFIG = "sentence_bert_config.json"  # max_seq_length: tokens per input the model was trained on

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
TOKEN_TYPE_IDS = "token_type_ids"
LAST_HIDDEN_STATE = "last_hidden_state"
SENTENCE_EMBEDDING = "sentence_embedding"  # [batch, hidden]: pooled (and normalized) inside the graph


def past_names(layer: int) -> tuple[str, str]:
    """The (key, value) cache inputs of one layer."""
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    """The (key, value) cache outputs of one layer."""
    return f"present.{layer}.key", f"present.{layer}.value"


class GraphContract(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """How the engine must drive one graph file (see the converter's graph modules for the two kinds).

    kv_padding "right": one shared, preallocated KV buffer per layer, rows right-padded, positions from the
    attention mask; "left": the graph concatenates past and new K/V, rows left-padded, explicit position_ids."""

    graph: Literal["fused", "reference"]
    kv_padding: Literal["right", "left"]
    logits: Literal["last", "all"]  # the last real token of each row, or every position
    position_ids: Literal["ignored", "required"]
    batched_prefill: Literal["no_past_only", "any"]
    kv_buffer_sharing: bool
    seqlens_from: Literal["attention_mask"] | None = None
    accuracy_level: int | None = None  # MatMulNBits accuracy_level (fused graph only)
    execution_provider: str | None = None  # the only provider that can run it (the CPU graph's custom operators)
    custom_ops: str | None = None  # the library registering its custom operators ("cheapest_core")


class Source(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The file a directory was converted from."""

    file: str
    sha256: str
    name: str | None = None  # general.name of the GGUF


class CheapestSection(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """config.json's "cheapest" section, present in directories the converter wrote."""

    converter_version: str
    source: Source
    graphs: dict[str, GraphContract]  # by path relative to the directory (FUSED_GRAPH, CPU_GRAPH, REFERENCE_GRAPH)
    model_id: str | None = None


TokenIds = int | list[int] | None


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The keys of config.json the engine reads (Hugging Face names)."""

    num_hidden_layers: int
    num_attention_heads: int
    hidden_size: int
    vocab_size: int
    num_key_value_heads: int | None = None  # default: num_attention_heads
    head_dim: int | None = None  # default: hidden_size // num_attention_heads
    max_position_embeddings: int | None = None
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None
    sliding_window: int | None = None  # tokens a windowed layer attends to, itself included
    name_or_path: str | None = msgspec.field(default=None, name="_name_or_path")
    cheapest: CheapestSection | None = None


class GenerationConfig(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    bos_token_id: TokenIds = None
    eos_token_id: TokenIds = None
    pad_token_id: TokenIds = None


class PoolingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """1_Pooling/config.json (sentence-transformers); the modes this service builds."""

    word_embedding_dimension: int
    pooling_mode_cls_token: bool = False
    pooling_mode_mean_tokens: bool = False
    pooling_mode_max_tokens: bool = False
    pooling_mode_mean_sqrt_len_tokens: bool = False


class SentenceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """sentence_bert_config.json."""

    max_seq_length: int = 512


class Module(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of modules.json."""

    type: str
    path: str = ""


NORMALIZE_MODULE = "sentence_transformers.models.Normalize"


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a complete conversion holds: the converter version, the source, and every file's SHA-256."""

    converter_version: str
    source: Source
    files: dict[str, str]


def token_ids(value: TokenIds) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def encode_json(value: msgspec.Struct | dict) -> bytes:
    """Indented, key order as declared, UTF-8 kept: the converter's files are byte-for-byte reproducible."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2) + b"\n"
