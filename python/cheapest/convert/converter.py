"""GGUF -> model directory (the layout and its JSON are described in cheapest.model_layout).

  onnx/model.onnx (+ model.onnx_data)            fused graph, the one served (graph_fused.py)
  onnx/model_cpu.onnx (+ model_cpu.onnx_data)    the same with the core's custom operators, served on CPU
                                                 (graph_passes.py)
  onnx/model_fp32.onnx (+ model_fp32.onnx_data)  fp32 reference graph (graph_reference.py)
  tokenizer.json, tokenizer_config.json          (tokenizer_build.py; chat_template from the GGUF)
  config.json                                    Hugging Face config + a "cheapest" section: graph I/O contract
  generation_config.json
  cheapest_manifest.json                         written LAST: the directory is complete when it exists

The output is a pure function of the GGUF bytes and CONVERTER_VERSION (same bytes twice). The directory
is built beside its destination and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import onnx

from cheapest.model_layout import (
    CONFIG, CPU_GRAPH, FUSED_GRAPH, GENERATION_CONFIG, MANIFEST, REFERENCE_GRAPH, TOKENIZER, TOKENIZER_CONFIG, CheapestSection,
    GenerationConfig, GraphContract, Manifest, ModelConfig, Source, encode_json,
)

from .gguf_reader import GEMMA3, LLAMA, PHI3, QWEN2, QWEN3, GGUFModel, file_sha256, read_gguf
from .graph_builder import save_with_external_data
from .graph_fused import ACCURACY_LEVEL, build_fused_graph
from .graph_passes import cpu_graph
from .graph_reference import build_reference_graph
from .tokenizer_build import tokenizer_config_json, tokenizer_json

# Bump whenever the output for the same GGUF changes: `model pull` reconverts when it differs.
CONVERTER_VERSION = "18"


def graph_contracts(accuracy_level: int) -> dict[str, GraphContract]:
    """How the engine must drive each graph (see graph_fused.py and graph_reference.py)."""
    fused = GraphContract(graph="fused", kv_padding="right", logits="last", position_ids="ignored",
                          seqlens_from="attention_mask", batched_prefill="no_past_only", kv_buffer_sharing=True,
                          accuracy_level=accuracy_level)
    reference = GraphContract(graph="reference", kv_padding="left", logits="all", position_ids="required",
                              batched_prefill="any", kv_buffer_sharing=False)
    cpu = msgspec.structs.replace(fused, execution_provider="CPUExecutionProvider", custom_ops="cheapest_core")
    return {FUSED_GRAPH: fused, CPU_GRAPH: cpu, REFERENCE_GRAPH: reference}


# GGUF architecture -> Hugging Face (class, model_type); a llama GGUF with a sliding window is a Mistral.
_HF_NAMES = {
    LLAMA: ("LlamaForCausalLM", "llama"), QWEN2: ("Qwen2ForCausalLM", "qwen2"), QWEN3: ("Qwen3ForCausalLM", "qwen3"),
    PHI3: ("Phi3ForCausalLM", "phi3"), GEMMA3: ("Gemma3ForCausalLM", "gemma3_text"),
}


def _descriptive_config(model: GGUFModel) -> dict[str, Any]:
    """Hugging Face's keys that describe the architecture (the engine reads none of them)."""
    hp = model.hparams
    cls, model_type = _HF_NAMES[hp.arch]
    if hp.arch == LLAMA and hp.sliding_window is not None:
        cls, model_type = "MistralForCausalLM", "mistral"
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_act": "gelu_pytorch_tanh" if hp.activation == "gelu_tanh" else "silu",
        "intermediate_size": hp.intermediate_size,
        "rope_theta": hp.rope_theta,
        "rms_norm_eps": hp.rms_norm_eps,
        "tie_word_embeddings": hp.tie_word_embeddings,
        "torch_dtype": "float32",
    }
    if hp.arch == GEMMA3:
        config["rope_local_base_freq"] = hp.rope_theta_local
        config["layer_types"] = ["sliding_attention" if hp.window(i) else "full_attention" for i in range(hp.n_layer)]
        config["query_pre_attn_scalar"] = hp.scale ** -2
        config["final_logit_softcapping"] = hp.final_logit_softcap
    return config


def model_config(model: GGUFModel, *, accuracy_level: int, source_sha256: str) -> ModelConfig:
    hp, tok = model.hparams, model.tokenizer
    return ModelConfig(
        num_hidden_layers=hp.n_layer,
        num_attention_heads=hp.n_head,
        hidden_size=hp.hidden_size,
        vocab_size=hp.vocab_size,
        num_key_value_heads=hp.n_head_kv,
        head_dim=hp.head_dim,
        max_position_embeddings=hp.context_length,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        sliding_window=hp.sliding_window,
        cheapest=CheapestSection(
            converter_version=CONVERTER_VERSION,
            source=Source(file=model.path.name, name=model.name, sha256=source_sha256),
            graphs=graph_contracts(accuracy_level),
        ),
    )


def config_json(model: GGUFModel, *, accuracy_level: int, source_sha256: str) -> bytes:
    ours = model_config(model, accuracy_level=accuracy_level, source_sha256=source_sha256)
    return encode_json({**_descriptive_config(model), **msgspec.to_builtins(ours)})


def generation_config(model: GGUFModel) -> GenerationConfig:
    tok = model.tokenizer
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id)


def read_manifest(model_dir: Path) -> Manifest | None:
    try:
        return msgspec.json.decode((Path(model_dir) / MANIFEST).read_bytes(), type=Manifest)
    except (OSError, msgspec.DecodeError):
        return None


def is_converted(model_dir: Path, source_sha256: str, version: str = CONVERTER_VERSION) -> bool:
    manifest = read_manifest(model_dir)
    return (
        manifest is not None
        and manifest.converter_version == version
        and manifest.source.sha256 == source_sha256
    )


def _write_graphs(model: GGUFModel, work: Path, progress: Callable | None, accuracy_level: int) -> None:
    """One graph in memory at a time: SmolLM2's fused graph alone holds ~100 MB of initializers."""
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


def _write_metadata(model: GGUFModel, work: Path, accuracy_level: int, sha: str) -> None:
    ctx = model.hparams.context_length
    (work / TOKENIZER).write_text(tokenizer_json(model.tokenizer), encoding="utf-8")
    (work / TOKENIZER_CONFIG).write_text(tokenizer_config_json(model.tokenizer, context_length=ctx), encoding="utf-8")
    (work / CONFIG).write_bytes(config_json(model, accuracy_level=accuracy_level, source_sha256=sha))
    (work / GENERATION_CONFIG).write_bytes(encode_json(generation_config(model)))


def write_manifest(work: Path, source: Source, version: str = CONVERTER_VERSION) -> None:
    """The manifest of every file in `work`, written last: the directory is complete once it exists."""
    files = sorted(p for p in work.rglob("*") if p.is_file())
    manifest = Manifest(converter_version=version, source=source,
                        files={p.relative_to(work).as_posix(): file_sha256(p) for p in files})
    (work / MANIFEST).write_bytes(encode_json(manifest))


def convert(gguf_path: str | Path, out_dir: str | Path, *, progress: Callable | None = None,
            accuracy_level: int = ACCURACY_LEVEL, source_sha256: str | None = None,
            notices: dict[str, bytes] | None = None) -> Path:
    """Convert; `progress` is a tqdm-like callable (or None for silence); `notices`: licence files shipped in the
    directory under these names. Returns out_dir."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    model = read_gguf(gguf_path)  # first: an unsupported file is refused from its header, before hashing
    sha = source_sha256 or file_sha256(gguf_path)
    work = out_dir.with_name(out_dir.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    (work / FUSED_GRAPH).parent.mkdir(parents=True)
    _write_graphs(model, work, progress, accuracy_level)
    _write_metadata(model, work, accuracy_level, sha)
    for name, data in (notices or {}).items():
        (work / Path(name).name).write_bytes(data)
    write_manifest(work, Source(file=gguf_path.name, sha256=sha))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(work, out_dir)
    return out_dir
