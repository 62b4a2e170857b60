"""BERT-family safetensors -> ONNX: the fp32 graph against an independent numpy forward of the weights, the fused
graph against the fp32 graph, byte-for-byte reproducible output, the manifest-guarded skip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tokenizers

from fixtures_embedding import numpy_encoder_forward

from cheapest.convert.bert import UnsupportedEncoderError, convert_encoder, is_encoder_converted, read_encoder

SENTENCES = ["the man is eating food.", "a girl is carrying a baby", "hello", "the dog runs in the park " * 3]


def _run(model_dir: Path, graph: str, ids: list[list[int]]) -> np.ndarray:
    longest = max(map(len, ids))
    x = np.zeros((len(ids), longest), np.int64)
    mask = np.zeros_like(x)
    for i, row in enumerate(ids):
        x[i, : len(row)], mask[i, : len(row)] = row, 1
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "onnx" / graph), so)
    return session.run(["sentence_embedding"], {"input_ids": x, "attention_mask": mask,
                                                "token_type_ids": np.zeros_like(x)})[0]


def _ids(model_dir: Path) -> list[list[int]]:
    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return [tok.encode(s).ids for s in SENTENCES]


def test_fp32_graph_matches_a_numpy_forward_of_the_weights(tiny_encoder_source: Path, tiny_encoder_dir: Path) -> None:
    ids = _ids(tiny_encoder_dir)
    got = _run(tiny_encoder_dir, "model_fp32.onnx", ids)  # one right-padded batch
    for row, seq in zip(got, ids):
        np.testing.assert_allclose(row, numpy_encoder_forward(tiny_encoder_source, seq), atol=2e-6, rtol=0)
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_fused_graph_uses_the_fused_operators_and_matches_fp32(tiny_encoder_dir: Path) -> None:
    ops = {n.op_type for n in onnx.load(str(tiny_encoder_dir / "onnx/model.onnx")).graph.node}
    assert {"EmbedLayerNormalization", "Attention", "SkipLayerNormalization", "BiasGelu"} <= ops
    ids = _ids(tiny_encoder_dir)
    fused, ref = _run(tiny_encoder_dir, "model.onnx", ids), _run(tiny_encoder_dir, "model_fp32.onnx", ids)
    np.testing.assert_allclose(fused, ref, atol=1e-5, rtol=0)


def test_output_is_reproducible_and_a_converted_directory_is_recognised(tiny_encoder_source: Path,
                                                                         tiny_encoder_dir: Path,
                                                                         tmp_path: Path) -> None:
    again = convert_encoder(tiny_encoder_source, tmp_path / "tiny-minilm")
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tiny_encoder_dir) for p in tiny_encoder_dir.rglob("*") if p.is_file())
    for name in files:
        assert (again / name).read_bytes() == (tiny_encoder_dir / name).read_bytes(), name
    manifest = (again / "cheapest_manifest.json").read_text()
    sha = manifest.split('"sha256": "')[1].split('"')[0]
    assert is_encoder_converted(again, sha) and not is_encoder_converted(again, "0" * 64)
    assert b'"padding": null' in (again / "tokenizer.json").read_bytes()  # the engine pads and caps itself


def test_an_unsupported_source_is_refused_by_name(tiny_encoder_source: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "max"
    shutil.copytree(tiny_encoder_source, bad)
    (bad / "1_Pooling" / "config.json").write_text('{"word_embedding_dimension": 32, "pooling_mode_max_tokens": true}')
    with pytest.raises(UnsupportedEncoderError, match="pooling max"):
        read_encoder(bad)
