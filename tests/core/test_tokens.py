"""cheapest_core.Tokenizer against the `tokenizers` package: same counts, same ids, same text.

The tokenizer is trained here (tests/tokenizer_corpus.py, SmolLM2's pipeline); SmolLM2's own
tokenizer.json is used too when the converter has produced it in the checkout.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cheapest_core import IncrementalDecoder, Tokenizer, TokenizerError
from tokenizer_corpus import FRAGMENTS, SPECIAL_TOKENS, generated_text, python_source, smollm2_tokenizer_path
from tokenizer_corpus import SPM_CONTROL, spm_tokenizer_json, trained_tokenizer_json

class Pair(tuple[Tokenizer, tokenizers.Tokenizer]):
    """Ours and the reference, loaded from the same tokenizer.json (short repr for failure reports)."""

    name: str

    @classmethod
    def load(cls, name: str, json: str) -> Pair:
        pair = cls((Tokenizer.from_str(json), tokenizers.Tokenizer.from_str(json)))
        pair.name = name
        return pair

    def __repr__(self) -> str:
        return f"<{self.name} tokenizer pair>"


@pytest.fixture(scope="module")
def trained() -> Pair:
    return Pair.load("trained", trained_tokenizer_json())


@pytest.fixture(scope="module")
def smollm2() -> Pair:
    path = smollm2_tokenizer_path()
    if path is None:
        pytest.skip("SmolLM2's tokenizer.json has not been converted in this checkout")
    return Pair.load("SmolLM2", path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def spm_plain() -> Pair:
    """SentencePiece BPE as the converter writes it (Gemma 3's shape): read without the crate."""
    return Pair.load("SentencePiece", spm_tokenizer_json(add_space_prefix=False))


@pytest.fixture(scope="module")
def spm_prefixed() -> Pair:
    """The same with a space prefix (Llama 2's shape: Prepend("▁") before each segment)."""
    return Pair.load("SentencePiece+prefix", spm_tokenizer_json(add_space_prefix=True))


@pytest.fixture(scope="module", params=["spm_plain", "spm_prefixed"])
def spm(request: pytest.FixtureRequest) -> Pair:
    value: Pair = request.getfixturevalue(request.param)
    return value


@pytest.fixture(scope="module", params=["trained", "smollm2", "spm_plain", "spm_prefixed"])
def pair(request: pytest.FixtureRequest) -> Pair:
    value: Pair = request.getfixturevalue(request.param)
    return value


# Random Unicode (no surrogates: they are not text), fragments that stress the pre-tokenizer, and
# both mixed. Hypothesis shrinks any mismatch to a minimal text.
unicode_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=60)
fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(alphabet=" \t\n\r\u00a0\u3000'0123456789", max_size=6)),
    max_size=25,
).map("".join)
any_text = st.one_of(unicode_text, fragment_text, st.lists(st.one_of(unicode_text, fragment_text), max_size=4).map("".join))

EQUALITY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_fast_path_is_used(pair: Pair) -> None:
    # Otherwise every equality test below would compare the crate with itself.
    assert pair[0].fast_path


@EQUALITY
@given(text=any_text)
def test_count_and_ids_equal_the_tokenizers_package(pair: Pair, text: str) -> None:
    ours, ref = pair
    ids = ref.encode(text).ids
    assert ours.count(text) == len(ids)
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids


def test_large_real_texts(pair: Pair) -> None:
    ours, ref = pair
    rng = random.Random(7)
    source = python_source(600_000)  # above the size counted in parallel parts
    mixed = "".join(generated_text(rng, 50) + "\n" for _ in range(3000))
    chat = "".join(f"<|im_start|>user\n{generated_text(rng, 30)}<|im_end|>\n" for _ in range(500))
    for text in (source, mixed, chat, source[:1000], mixed + source):
        ids = ref.encode(text).ids
        assert ours.count(text) == len(ids)
        assert ours.encode(text) == ids


def test_count_batch(pair: Pair) -> None:
    ours, ref = pair
    rng = random.Random(3)
    small = [generated_text(rng, rng.randint(0, 30)) for _ in range(200)]
    large = [python_source(300_000), *small]  # large enough to go to the thread pool
    for batch in ([], ["one"], small, large):
        assert ours.count_batch(batch) == [len(e.ids) for e in ref.encode_batch(batch)]


def test_sentencepiece_path_decodes_and_looks_up_like_the_package(spm: Pair) -> None:
    ours, ref = spm
    assert ours.vocab_size == ref.get_vocab_size()
    for tid in range(ours.vocab_size):
        token = ref.id_to_token(tid)
        assert ours.id_to_token(tid) == token
        assert ours.token_to_id(token) == tid
    assert ours.id_to_token(ours.vocab_size) is None and ours.token_to_id("no such piece") is None
    rng = random.Random(5)
    texts = [generated_text(rng, 25) for _ in range(300)]
    texts += [f"{SPM_CONTROL[0]}user\n{t}{SPM_CONTROL[1]}<tool>" for t in texts[:50]]
    for text in texts:
        ids = ours.encode(text)
        assert ids == ref.encode(text).ids
        random_ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(0, 12))]
        for some in (ids, random_ids, [*ids[:3], 300, 301, *ids[3:]]):  # <0x..> runs that are not UTF-8
            for skip in (False, True):
                want = ref.decode(some, skip_special_tokens=skip)
                assert ours.decode(some, skip_special_tokens=skip) == want
                dec = ours.decoder(skip_special_tokens=skip)
                assert "".join(dec.push(i) for i in some) + dec.flush() == want


def test_token_bytes_concatenate_to_the_decoded_text(pair: Pair) -> None:
    """Each token's bytes (what logprobs report) joined are the text `decode` gives (SentencePiece's decoder
    strips one leading space of a whole text, not of a token)."""
    ours, ref = pair
    rng = random.Random(8)
    for _ in range(300):
        ids = ours.encode(generated_text(rng, 20))
        joined = b"".join(ours.token_bytes(i) or b"?" for i in ids).decode()
        want = ref.decode(ids, skip_special_tokens=False)
        assert joined == want or (pair.name == "SentencePiece+prefix" and joined == " " + want)
    with pytest.raises(TokenizerError):
        ours.token_bytes(ours.vocab_size)


def test_special_tokens_are_single_ids(trained: Pair) -> None:
    ours, ref = trained
    for special in SPECIAL_TOKENS:
        sid = ours.token_to_id(special)
        assert sid is not None and sid == ref.token_to_id(special)
        assert ours.encode(f"a{special}b") == ref.encode(f"a{special}b").ids
        assert sid in ours.encode(f"a{special}b")
        assert ours.id_to_token(sid) == special


def test_vocabulary_lookups(trained: Pair) -> None:
    ours, ref = trained
    assert ours.vocab_size == ref.get_vocab_size() == 16_000
    for token, tid in list(ref.get_vocab().items())[:2000]:
        assert ours.token_to_id(token) == tid
        assert ours.id_to_token(tid) == token
    assert ours.token_to_id("definitely not a token \u2603\u2603") is None
    assert ours.id_to_token(ours.vocab_size + 10) is None
    assert ours.id_to_token(-1) is None


# --- decoding -------------------------------------------------------------------------------------

def byte_char(b: int) -> str:
    """GPT-2's byte-level alphabet: the printable character standing for byte `b`."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if b in printable:
        return chr(b)
    return chr(0x100 + [x for x in range(256) if x not in printable].index(b))


def byte_ids(tok: Tokenizer, data: bytes) -> list[int]:
    ids = [tok.token_to_id(byte_char(b)) for b in data]
    assert None not in ids
    return ids  # type: ignore[return-value]


def byte_and_partial_ids(tok: Tokenizer) -> list[int]:
    """Ids of tokens that are single bytes 0x80-0xFF or end in the middle of a UTF-8 character."""
    # GPT-2 byte-level alphabet: bytes 0xA1-0xAC and 0xAE-0xFF are their own code points.
    ids = [tok.token_to_id(chr(b)) for b in [*range(0xA1, 0xAD), *range(0xAE, 0x100)]]
    ids += [tok.token_to_id(chr(0x100 + i)) for i in range(68)]  # remapped bytes (0x00-0x20, 0x7F-0xA0, 0xAD)
    return [i for i in ids if i is not None]


def id_lists(tok: Tokenizer) -> st.SearchStrategy[list[int]]:
    partial = byte_and_partial_ids(tok)
    assert len(partial) > 150
    return st.one_of(
        any_text.map(tok.encode),  # real sequences: multi-byte characters split across tokens
        st.lists(st.sampled_from(partial), max_size=12),  # bytes alone: invalid and partial UTF-8
        st.lists(st.one_of(st.sampled_from(partial), st.integers(0, tok.vocab_size - 1)), max_size=16),
    )


def stream(dec: IncrementalDecoder, ids: list[int], chunks: list[int]) -> str:
    """Pushes `ids` one by one or in chunks of the given sizes, then flushes."""
    out, i = [], 0
    for size in chunks:
        if i >= len(ids):
            break
        if size == 1:
            piece = dec.push(ids[i])
        else:
            piece = dec.push_many(ids[i:i + size])
        out.append(piece)
        i += size
    out.extend(dec.push(x) for x in ids[i:])
    out.append(dec.flush())
    return "".join(out)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_incremental_decoder_concatenates_to_decode(trained: Pair, data: st.DataObject, skip: bool) -> None:
    ours, ref = trained
    ids = data.draw(id_lists(ours))
    chunks = data.draw(st.lists(st.integers(1, 4), max_size=10))
    expected = ref.decode(ids, skip_special_tokens=skip)
    assert ours.decode(ids, skip_special_tokens=skip) == expected
    assert stream(ours.decoder(skip_special_tokens=skip), ids, chunks) == expected


def test_incremental_decoder_never_splits_a_character(trained: Pair) -> None:
    ours, _ = trained
    text = "日本語 😀 👨‍👩‍👧 café Привет"
    dec = ours.decoder()
    pieces = [dec.push(i) for i in ours.encode(text)]
    pieces.append(dec.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # A 4-byte emoji pushed as its separate byte tokens: nothing until the last byte.
    emoji = byte_ids(ours, "😀".encode())
    dec = ours.decoder()
    assert [dec.push(i) for i in emoji] == ["", "", "", "😀"]
    # A truncated character is replaced once, at flush, as decode does; a broken one at once.
    dec = ours.decoder()
    assert dec.push_many(emoji[:2]) == ""
    assert dec.flush() == "\ufffd" == ours.decode(emoji[:2])
    dec = ours.decoder()
    assert dec.push_many(emoji[:2]) == ""
    assert dec.push_many(byte_ids(ours, b"A")) == "\ufffdA" == ours.decode(emoji[:2] + byte_ids(ours, b"A"))


def test_decoder_skips_special_tokens(trained: Pair) -> None:
    ours, ref = trained
    ids = ours.encode("<|im_start|>user\nhi<|im_end|>")
    dec = ours.decoder(skip_special_tokens=True)
    assert dec.push_many(ids) + dec.flush() == ref.decode(ids, skip_special_tokens=True) == "user\nhi"


# --- the crate fallback for other shapes ----------------------------------------------------------

@pytest.fixture(scope="module")
def wordpiece_like() -> Pair:
    """A non-byte-level tokenizer (Metaspace + BPE with byte fallback, Llama-2 style)."""
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    rng = random.Random(5)
    corpus = [generated_text(rng, 20) for _ in range(3000)]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", *SPECIAL_TOKENS],
                                  initial_alphabet=[f"<0x{b:02X}>" for b in range(256)], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_tokens([f"<0x{b:02X}>" for b in range(256)])
    return Pair.load("Metaspace+byte-fallback", tok.to_str())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=any_text)
def test_other_shapes_use_the_crate_exactly(wordpiece_like: Pair, text: str) -> None:
    ours, ref = wordpiece_like
    assert not ours.fast_path
    ids = ref.encode(text).ids
    assert ours.count(text) == len(ids)
    assert ours.encode(text) == ids
    assert ours.count_batch([text, text]) == [len(ids)] * 2
    expected = ref.decode(ids, skip_special_tokens=False)  # the package's default is True
    assert ours.decode(ids) == expected
    assert all(ours.token_bytes(i) is None for i in ids)  # no exact per-token bytes: the engine asks llguidance
    dec = ours.decoder()
    assert "".join(dec.push(i) for i in ids) + dec.flush() == expected


def test_damaged_sentencepiece_files_load_through_the_crate_or_fail_cleanly() -> None:
    """Every part the SentencePiece path reads, damaged: the file is then refused by that path and loaded (or
    refused, with a TokenizerError) by the crate, never a panic; what loads still equals the package."""
    import json

    base = json.loads(spm_tokenizer_json())
    first_merge = base["model"]["merges"][0]
    damage: list[tuple[str, Callable[[dict], None]]] = [
        ("vocab id gap", lambda t: t["model"]["vocab"].update({"<pad>": 10**6})),
        ("duplicate id", lambda t: t["model"]["vocab"].update({"<pad>": 1})),
        ("negative id", lambda t: t["model"]["vocab"].update({"<pad>": -1})),
        ("merge of unknown", lambda t: t["model"]["merges"].insert(0, "zzqq ▁▁▁▁x")),
        ("three-part merge", lambda t: t["model"]["merges"].insert(0, first_merge + " x")),
        ("mixed merge forms", lambda t: t["model"]["merges"].insert(0, ["a", "b"])),
        ("added id mismatch", lambda t: t["added_tokens"][0].update({"id": 5})),
        ("empty added", lambda t: t["added_tokens"][0].update({"content": ""})),
        ("unknown unk", lambda t: t["model"].update({"unk_token": "no such piece"})),
        ("regex replace", lambda t: t["normalizer"].update({"normalizers": [
            {"type": "Replace", "pattern": {"Regex": " +"}, "content": "\u2581"}]})),
        ("empty pattern", lambda t: t["decoder"]["decoders"][0]["pattern"].update({"String": ""})),
        ("strip stop", lambda t: t["decoder"]["decoders"].append({"type": "Strip", "content": " ", "start": 0,
                                                                  "stop": 1})),
        ("huge strip", lambda t: t["decoder"]["decoders"].append({"type": "Strip", "content": " ",
                                                                  "start": 2**62, "stop": 0})),
        ("template id", lambda t: t["post_processor"]["special_tokens"]["<bos>"].update({"ids": [10**9]})),
        ("no model type", lambda t: t["model"].pop("type")),
    ]
    for name, harm in damage:
        tree = json.loads(json.dumps(base))
        harm(tree)
        text = json.dumps(tree)
        try:
            ours = Tokenizer.from_str(text)
        except TokenizerError:
            with pytest.raises(Exception):  # noqa: B017 - the package refuses it too, in its own words
                tokenizers.Tokenizer.from_str(text)
            continue
        ref = tokenizers.Tokenizer.from_str(text)
        for sample in ("Hello  world <start_of_turn>日本 😀", ""):
            assert ours.encode(sample) == ref.encode(sample).ids, name
            ids = [i for i in ref.encode(sample).ids if i < ours.vocab_size]  # ours refuses unknown ids, by name
            assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False), name


# --- errors never quote the text ------------------------------------------------------------------

CANARY = "canary-3f1c-secret"


def raises_without_canary(call: Callable[[], object]) -> TokenizerError:
    with pytest.raises(TokenizerError) as info:
        call()
    assert isinstance(info.value, ValueError)
    assert CANARY not in str(info.value)
    return info.value


def test_load_errors(tmp_path: Path) -> None:
    raises_without_canary(lambda: Tokenizer.from_str('{"' + CANARY + '": [1, 2'))
    raises_without_canary(lambda: Tokenizer.from_str('{"model": {"type": "' + CANARY + '"}}'))
    raises_without_canary(lambda: Tokenizer.from_str(CANARY))
    err = raises_without_canary(lambda: Tokenizer.from_file(tmp_path / "missing.json"))
    assert "missing.json" in str(err)
    bad = tmp_path / "bad.json"
    bad.write_text("[" + CANARY)
    raises_without_canary(lambda: Tokenizer.from_file(bad))
    good = tmp_path / "tokenizer.json"
    good.write_text(trained_tokenizer_json())
    assert Tokenizer.from_file(good).fast_path and Tokenizer.from_file(str(good)).vocab_size == 16_000


def test_bad_ids_and_bad_text(trained: Pair) -> None:
    ours, _ = trained
    for ids in ([1, ours.vocab_size], [-1], [2**40]):
        raises_without_canary(lambda: ours.decode(ids))
        dec = ours.decoder()
        raises_without_canary(lambda: dec.push_many(ids))
    dec = ours.decoder()
    raises_without_canary(lambda: dec.push(ours.vocab_size + 1))
    # A failed push changes nothing: the stream goes on.
    ids = ours.encode("héllo")
    assert dec.push_many(ids) + dec.flush() == "héllo"
    lone = CANARY + "\ud800"
    raises_without_canary(lambda: ours.count(lone))
    raises_without_canary(lambda: ours.encode(lone))
    raises_without_canary(lambda: ours.count_batch(["ok", lone]))
    with pytest.raises(TypeError):
        ours.count_batch("not a list")  # type: ignore[arg-type]


# --- threads ----------------------------------------------------------------------------------------

def test_threads_share_one_tokenizer(trained: Pair) -> None:
    ours, ref = trained
    rng = random.Random(11)
    texts = [generated_text(rng, rng.randint(0, 200)) * rng.randint(1, 40) for _ in range(64)]
    expected = [len(e.ids) for e in ref.encode_batch(texts)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ours.count, texts)) == expected
        assert list(pool.map(lambda t: ours.count_batch([t, t]), texts)) == [[n, n] for n in expected]


def test_count_releases_the_gil(trained: Pair) -> None:
    """While one thread counts a large batch, another runs Python code."""
    import time

    ours, _ = trained
    text = python_source(2_000_000) * 2
    stamps: list[float] = []
    done = threading.Event()

    def spin() -> None:
        while not done.is_set():
            stamps.append(time.perf_counter())
            time.sleep(0.001)

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        time.sleep(0.01)
        start = time.perf_counter()
        ours.count_batch([text, text])
        end = time.perf_counter()
    finally:
        done.set()
        spinner.join()
    # Holding the GIL, the call would leave the spinner no moment to run between its start and end.
    margin = (end - start) * 0.2
    inside = [t for t in stamps if start + margin < t < end - margin]
    assert len(inside) >= 5
