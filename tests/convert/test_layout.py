"""The converter and the engine share only cheapest.model_layout: neither package imports the other, and what
the converter writes decodes into the Structs the engine reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from cheapest.model_layout import CONFIG, FUSED_GRAPH, GENERATION_CONFIG, MANIFEST, GenerationConfig, Manifest, \
    ModelConfig


@pytest.mark.parametrize(("package", "other"), [("cheapest.convert.converter", "cheapest.engine"),
                                                ("cheapest.engine.onnx_engine", "cheapest.convert")])
def test_packages_do_not_import_each_other(package: str, other: str) -> None:
    code = f"import sys, {package}; print(sorted(m for m in sys.modules if m.startswith('{other}')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_converted_directory_decodes_into_the_layout_structs(tiny_model_dir: Path) -> None:
    config = msgspec.json.decode((tiny_model_dir / CONFIG).read_bytes(), type=ModelConfig)
    assert config.cheapest is not None and config.cheapest.graphs[FUSED_GRAPH].kv_padding == "right"
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (2, 2, 16)
    generation = msgspec.json.decode((tiny_model_dir / GENERATION_CONFIG).read_bytes(), type=GenerationConfig)
    assert generation.eos_token_id == 2
    manifest = msgspec.json.decode((tiny_model_dir / MANIFEST).read_bytes(), type=Manifest)
    assert manifest.source.sha256 == config.cheapest.source.sha256
    assert CONFIG in manifest.files and FUSED_GRAPH in manifest.files
