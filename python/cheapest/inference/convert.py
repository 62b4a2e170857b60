"""GGUF -> model directory in the Hugging Face ONNX export layout.

  onnx/model.onnx (+ model.onnx_data)            fused graph, the one served (graph_fused.py)
  onnx/model_cpu.onnx (+ model_cpu.onnx_data)    the same with the core's custom operators, served on CPU
                                                 (graph_passes.py)
  onnx/model_fp32.onnx (+ model_fp32.onnx_data)  fp32 reference graph (graph_reference.py)
  tokenizer.json, tokenizer_config.json          (tokenizer_build.py; chat_template from the GGUF)
  config.json                                    Llama config + a "cheapest" section: graph I/O contract
  generation_config.json
  cheapest_manifest.json                         written LAST: the directory is complete when it exists

The output is a pure function of the GGUF bytes and CONVERTER_VERSION (same bytes twice). The directory
is built beside its destination and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from pathlib import Path
from typing import Any

import onnx

from .gguf_reader import GGUFModel, file_sha256, read_gguf
from .graph_builder import save_with_external_data
from .graph_fused import ACCURACY_LEVEL, build_fused_graph
from .graph_passes import cpu_graph
from .graph_reference import build_reference_graph
from .tokenizer_build import tokenizer_config_json, tokenizer_json

# Bump whenever the output for the same GGUF changes: `model pull` reconverts when it differs.
CONVERTER_VERSION = "5"
MANIFEST = "cheapest_manifest.json"
FUSED_GRAPH = "onnx/model.onnx"
CPU_GRAPH = "onnx/model_cpu.onnx"
REFERENCE_GRAPH = "onnx/model_fp32.onnx"


def _json(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def graph_contract(accuracy_level: int) -> dict[str, Any]:
    """The "cheapest" section of config.json: how the engine must drive each graph (see graph_*.py)."""
    fused = {
        "graph": "fused",
        "kv_padding": "right",
        "logits": "last",
        "position_ids": "ignored",
        "seqlens_from": "attention_mask",
        "batched_prefill": "no_past_only",
        "kv_buffer_sharing": True,
        "accuracy_level": accuracy_level,
    }
    reference = {
        "graph": "reference",
        "kv_padding": "left",
        "logits": "all",
        "position_ids": "required",
        "batched_prefill": "any",
        "kv_buffer_sharing": False,
    }
    cpu = {**fused, "execution_provider": "CPUExecutionProvider", "custom_ops": "cheapest_core"}
    return {**fused, "graphs": {FUSED_GRAPH: fused, CPU_GRAPH: cpu, REFERENCE_GRAPH: reference}}


def model_config(model: GGUFModel, *, accuracy_level: int, source_sha256: str) -> dict[str, Any]:
    hp, tok = model.hparams, model.tokenizer
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_attention_heads": hp.n_head,
        "num_key_value_heads": hp.n_head_kv,
        "num_hidden_layers": hp.n_layer,
        "head_dim": hp.head_dim,
        "max_position_embeddings": hp.context_length,
        "rope_theta": hp.rope_theta,
        "rms_norm_eps": hp.rms_norm_eps,
        "vocab_size": hp.vocab_size,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "torch_dtype": "float32",
        "cheapest": {
            **graph_contract(accuracy_level),
            "converter_version": CONVERTER_VERSION,
            "source": {"file": model.path.name, "name": model.name, "sha256": source_sha256},
        },
    }


def generation_config(model: GGUFModel) -> dict[str, Any]:
    tok = model.tokenizer
    cfg = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return {k: v for k, v in cfg.items() if v is not None}


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(model_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def is_converted(model_dir: Path, source_sha256: str) -> bool:
    manifest = read_manifest(model_dir)
    return (
        manifest is not None
        and manifest.get("converter_version") == CONVERTER_VERSION
        and manifest.get("source", {}).get("sha256") == source_sha256
    )


def convert(gguf_path: str | Path, out_dir: str | Path, *, progress=None, accuracy_level: int = ACCURACY_LEVEL,
            source_sha256: str | None = None) -> Path:
    """Convert; `progress` is a tqdm-like callable (or None for silence). Returns out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    sha = source_sha256 or file_sha256(gguf_path)
    model = read_gguf(gguf_path)
    work = out_dir.with_name(out_dir.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    (work / "onnx").mkdir(parents=True)

    fused = build_fused_graph(model, progress=progress, accuracy_level=accuracy_level)
    save_with_external_data(fused, work / FUSED_GRAPH)
    del fused
    gc.collect()
    save_with_external_data(cpu_graph(onnx.load(str(work / FUSED_GRAPH))), work / CPU_GRAPH)
    gc.collect()
    reference = build_reference_graph(model, progress=progress)
    save_with_external_data(reference, work / REFERENCE_GRAPH)
    del reference
    gc.collect()

    ctx = model.hparams.context_length
    (work / "tokenizer.json").write_text(tokenizer_json(model.tokenizer), encoding="utf-8")
    (work / "tokenizer_config.json").write_text(tokenizer_config_json(model.tokenizer, context_length=ctx),
                                                encoding="utf-8")
    (work / "config.json").write_text(_json(model_config(model, accuracy_level=accuracy_level, source_sha256=sha)),
                                      encoding="utf-8")
    (work / "generation_config.json").write_text(_json(generation_config(model)), encoding="utf-8")

    files = sorted(p for p in work.rglob("*") if p.is_file())
    manifest = {
        "converter_version": CONVERTER_VERSION,
        "source": {"file": gguf_path.name, "sha256": sha},
        "files": {p.relative_to(work).as_posix(): file_sha256(p) for p in files},
    }
    (work / MANIFEST).write_text(_json(manifest), encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir
