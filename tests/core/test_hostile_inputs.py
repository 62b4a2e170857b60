"""No input reaches a Rust panic. pyo3 turns a panic into PanicException, a BaseException that slips
past every `except Exception` of the service; so every public callable of the core is fed arbitrary
strings (lone surrogates included), bytes, integers of any size and floats (NaN, infinities), and must
answer with a value or an Exception. A PanicException propagates and fails the test."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cheapest_core as core
from tokenizer_corpus import spm_tokenizer_json, trained_tokenizer_json

HOSTILE = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

texts = st.one_of(st.text(st.characters(codec=None, categories=None), max_size=40), st.sampled_from(
    ["", "sk_", "mk_" + "0" * 36, "\ud800", "\x00" * 5, "<|im_start|>", "a" * 300, "\u2028\"\\"]))
ints = st.one_of(st.integers(), st.sampled_from([-1, 0, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63), 2**100]))
floats = st.floats(allow_nan=True, allow_infinity=True)


def answers(call: Callable[[], object]) -> object:
    """The call's value, or None for an Exception; anything else (a PanicException) propagates."""
    try:
        return call()
    except Exception:
        return None


def each(*calls: Callable[[], object]) -> None:
    for call in calls:
        answers(call)


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> core.Tokenizer:
    """Both fast paths: byte-level BPE beside the crate, SentencePiece BPE without it."""
    return core.Tokenizer.from_str(trained_tokenizer_json() if request.param == "byte-level" else spm_tokenizer_json())


@HOSTILE
@given(a=texts, b=texts, raw=st.binary(max_size=40), other=st.binary(max_size=40))
def test_keys(a: str, b: str, raw: bytes, other: bytes) -> None:
    each(lambda: core.generate_key(a), lambda: core.check_key(a, kind=b), lambda: core.check_key(a),
         lambda: core.key_kind(a), lambda: core.hash_key(a, raw), lambda: core.verify_key(a, raw, other),
         lambda: core.key_hint(a))


@HOSTILE
@given(text=texts, batch=st.lists(texts, max_size=4), ids=st.lists(ints, max_size=8), one=ints, flag=st.booleans())
def test_tokenizer(tokenizer: core.Tokenizer, text: str, batch: list[str], ids: list[int], one: int,
                   flag: bool) -> None:
    each(lambda: tokenizer.count(text), lambda: tokenizer.count_batch(batch), lambda: tokenizer.encode(text, flag),
         lambda: tokenizer.decode(ids, flag), lambda: tokenizer.token_to_id(text),
         lambda: tokenizer.id_to_token(one), lambda: tokenizer.token_bytes(one),
         lambda: core.Tokenizer.from_str(text))
    decoder = tokenizer.decoder(flag)
    each(lambda: decoder.push(one), lambda: decoder.push_many(ids), decoder.flush)


@HOSTILE
@given(key=texts, limit=ints, period=floats, cost=ints, now=st.one_of(st.none(), floats), capacity=ints)
def test_rate_limiter(tmp_path: Path, key: str, limit: int, period: float, cost: int, now: float | None,
                      capacity: int) -> None:
    answers(lambda: core.RateLimiter(tmp_path / "other", capacity))
    rl = core.RateLimiter(tmp_path / "rl", capacity=4)
    each(lambda: rl.acquire(key, limit, period, cost, now), lambda: rl.peek(key, limit, period, now),
         lambda: rl.adjust(key, limit, period, cost, now),
         lambda: rl.acquire_all([(key, limit, period, cost), (key + "x", 1, 1.0, 1)], now),
         lambda: rl.forget(key), lambda: rl.occupancy(now))


@HOSTILE
@given(a=texts, b=texts, c=st.one_of(st.none(), texts), created=ints, n=ints, m=ints)
def test_sse_framer(a: str, b: str, c: str | None, created: int, n: int, m: int) -> None:
    framer = answers(lambda: core.SseFramer(a, b, created, c or "chat.completion.chunk"))
    if isinstance(framer, core.SseFramer):
        each(framer.role, lambda: framer.delta(a), lambda: framer.finish(b), lambda: framer.usage(n, m),
             lambda: framer.error(a, b, c))
    answers(lambda: core.json_escape(a))


@HOSTILE
@given(stops=st.lists(texts, max_size=20), pieces=st.lists(texts, max_size=6))
def test_stop_matcher(stops: list[str], pieces: list[str]) -> None:
    matcher = answers(lambda: core.StopMatcher(stops))
    if isinstance(matcher, core.StopMatcher):
        for piece in pieces:
            answers(lambda: matcher.push(piece))
        answers(matcher.flush)


logits = hnp.arrays(np.float32, st.integers(0, 80), elements=st.floats(allow_nan=True, allow_infinity=True, width=32))
masks = st.one_of(st.none(), hnp.arrays(st.sampled_from([np.uint32, np.int32, np.uint8, np.float32]),
                                        st.integers(0, 4)))


@HOSTILE
@given(temperature=floats, top_p=floats, top_k=ints, seed=st.one_of(st.none(), ints), x=logits, mask=masks,
       token=ints, top_n=ints)
def test_sampler(temperature: float, top_p: float, top_k: int, seed: int | None, x: np.ndarray,
                 mask: np.ndarray | None, token: int, top_n: int) -> None:
    sampler = answers(lambda: core.Sampler(temperature, top_p, top_k, seed))
    if not isinstance(sampler, core.Sampler):
        sampler = core.Sampler(0.7, 0.9, 5, 1)
    for arr in (x, x[::2], x.reshape(1, -1), x.astype(np.float64), x.view(np.int32)):
        answers(lambda: sampler.sample(arr, mask))
        answers(lambda: sampler.logprobs(arr, token, top_n))
    answers(lambda: sampler.sample(b"\x00\x00\x80\x7f" * 3))  # bytes: a buffer of the wrong kind
