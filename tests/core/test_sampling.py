"""Next-token sampling in the core (cheapest_core.Sampler, sampling.rs) against the definition."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cheapest_core import Sampler, SamplerError

F32 = np.float32


def kept_set(logits: np.ndarray, temperature: float, top_p: float, top_k: int,
             allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The tokens the definition may draw and their probabilities (float64): candidates are allowed
    and not -inf; top_k keeps the largest logits, top_p the heaviest weights reaching top_p of what
    top_k kept; ties go to the lower id."""
    ids = np.arange(len(logits))
    ok = logits > -np.inf
    if allowed is not None:
        ok &= allowed
    ids, x = ids[ok], logits[ok].astype(np.float64)
    order = np.lexsort((ids, -x))  # logit descending, then id ascending
    ids, x = ids[order], x[order]
    if 0 < top_k < len(ids):
        ids, x = ids[:top_k], x[:top_k]
    w = np.exp((x - x[0]) / temperature)
    if top_p < 1.0:
        order = np.lexsort((ids, -w))
        ids, w = ids[order], w[order]
        keep = int(np.searchsorted(np.cumsum(w), top_p * w.sum())) + 1
        ids, w = ids[:keep], w[:keep]
    return ids, w / w.sum()


def bitmask(allowed: np.ndarray) -> np.ndarray:
    """Bit i % 32 of word i // 32 set where allowed[i] (the layout constrained decoders produce)."""
    padded = np.zeros(-(-len(allowed) // 32) * 32, dtype=bool)
    padded[: len(allowed)] = allowed
    return np.packbits(padded.reshape(-1, 32)[:, ::-1].reshape(-1, 4, 8), axis=-1, bitorder="big").reshape(
        -1, 4)[:, ::-1].copy().view(np.uint32).ravel()


def test_the_bitmask_helper_matches_the_documented_layout() -> None:
    allowed = np.zeros(70, dtype=bool)
    allowed[[0, 5, 31, 32, 69]] = True
    words = bitmask(allowed)
    assert list(words) == [(1 << 0) | (1 << 5) | (1 << 31), 1 << 0, 1 << 5]


logit_arrays = hnp.arrays(
    F32,
    st.integers(1, 300),
    elements=st.one_of(st.floats(-30, 30, width=32), st.sampled_from([0.0, 1.0, -np.inf])),
)


@settings(max_examples=300, deadline=None)
@given(logits=logit_arrays, data=st.data())
def test_greedy_is_the_first_argmax_among_the_allowed(logits: np.ndarray, data: st.DataObject) -> None:
    allowed = np.array(data.draw(st.lists(st.booleans(), min_size=len(logits), max_size=len(logits))))
    for sampler in (Sampler(0.0), Sampler(0.8, top_k=1, seed=1)):
        assert sampler.greedy
        if np.all(logits == -np.inf):
            with pytest.raises(SamplerError, match="no token is allowed"):
                sampler.sample(logits)
        else:
            assert sampler.sample(logits) == int(np.argmax(logits))
        masked = np.where(allowed, logits, -np.inf)
        if np.all(masked == -np.inf):
            with pytest.raises(SamplerError):
                sampler.sample(logits, bitmask(allowed))
        else:
            assert sampler.sample(logits, bitmask(allowed)) == int(np.argmax(masked))


@settings(max_examples=150, deadline=None)
@given(
    logits=logit_arrays,
    data=st.data(),
    temperature=st.sampled_from([0.3, 1.0, 1.7]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.1]),
    top_k=st.sampled_from([0, 1, 3, 40]),
    seed=st.integers(0, 2**64 - 1),
)
def test_every_draw_is_allowed_and_in_the_kept_set(
    logits: np.ndarray, data: st.DataObject, temperature: float, top_p: float, top_k: int, seed: int
) -> None:
    allowed = np.array(data.draw(st.lists(st.booleans(), min_size=len(logits), max_size=len(logits))))
    if not np.any(allowed & (logits > -np.inf)):
        with pytest.raises(SamplerError):
            Sampler(temperature, top_p, top_k, seed).sample(logits, bitmask(allowed))
        return
    ids, p = kept_set(logits, temperature, top_p, top_k, allowed)
    # Up to rounding at the nucleus edge, where the definition's float64 and the core's float32
    # weights may differ: a token within 1e-5 of the boundary may be in or out.
    edge = set(ids.tolist())
    if top_p < 1.0:
        loose, _ = kept_set(logits, temperature, min(1.0, top_p + 1e-5), top_k, allowed)
        edge |= set(loose.tolist())
    sampler = Sampler(temperature, top_p, top_k, seed)
    for _ in range(30):
        token = sampler.sample(logits, bitmask(allowed))
        assert allowed[token] and token in edge


def chi_square(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(np.sum((counts - expected) ** 2 / expected))


# P(chi2 > x) = 0.001 for these degrees of freedom.
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32, 9: 27.88, 11: 31.26, 15: 37.70, 19: 43.82}


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"),
    [(1.0, 1.0, 0), (0.6, 1.0, 0), (1.5, 1.0, 0), (1.0, 0.8, 0), (1.0, 1.0, 8), (0.9, 0.7, 12)],
)
def test_draws_follow_the_defined_distribution(temperature: float, top_p: float, top_k: int) -> None:
    """Chi-square with a fixed seed, a test that a wrong distribution fails (checked below)."""
    logits = (np.sin(np.arange(20) * 0.9) * 2.0).astype(F32)
    ids, p = kept_set(logits, temperature, top_p, top_k)
    sampler = Sampler(temperature, top_p, top_k, seed=2024)
    draws = np.array([sampler.sample(logits) for _ in range(60_000)])
    assert set(np.unique(draws).tolist()) == set(ids.tolist())
    counts = np.array([np.sum(draws == i) for i in ids])
    assert chi_square(counts, p) < CHI2_999[len(ids) - 1]
    # The same counts against a distribution 10% off on one token fail the same test.
    wrong = p.copy()
    wrong[0] *= 1.1
    assert chi_square(counts, wrong / wrong.sum()) > CHI2_999[len(ids) - 1]


def test_a_mask_of_int32_words_constrains_a_large_vocabulary() -> None:
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(49_152) * 3).astype(F32)
    allowed = rng.random(49_152) < 0.01
    words = bitmask(allowed)
    for sampler in (Sampler(1.0, seed=3), Sampler(0.7, top_p=0.9, seed=3), Sampler(1.2, top_k=50, seed=3)):
        for mask in (words, words.view(np.int32)):
            assert all(allowed[sampler.sample(logits, mask)] for _ in range(200))
    # A mask shorter than the vocabulary allows nothing past its end.
    assert all(Sampler(1.0, seed=1).sample(logits, np.full(2, 0xFFFFFFFF, np.uint32)) < 64 for _ in range(200))


def test_a_seed_reproduces_the_draws_whatever_runs_beside_it() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(5000) * 2).astype(F32)
    for kwargs in ({}, {"top_p": 0.9}, {"top_k": 40}, {"top_p": 0.8, "top_k": 100}):
        alone = Sampler(0.8, seed=42, **kwargs)
        first = [alone.sample(logits) for _ in range(50)]
        again, other = Sampler(0.8, seed=42, **kwargs), Sampler(0.8, seed=7, **kwargs)
        mixed = []
        for _ in range(50):
            other.sample(logits)
            mixed.append(again.sample(logits))
            other.sample(logits[:100])
        assert mixed == first
        out: list[int] = []

        def in_a_thread(sampler: Sampler) -> None:
            out.extend(sampler.sample(logits) for _ in range(50))

        thread = threading.Thread(target=in_a_thread, args=(Sampler(0.8, seed=42, **kwargs),))
        thread.start()
        thread.join()
        assert out == first
        assert [Sampler(0.8, seed=43, **kwargs).sample(logits) for _ in range(50)] != first
    flat = np.zeros(1 << 16, F32)
    unseeded = [[Sampler(1.0).sample(flat) for _ in range(4)] for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_threads_sample_concurrently_with_the_gil_released() -> None:
    logits = np.random.default_rng(1).standard_normal(262_144).astype(F32)
    results: dict[int, list[int]] = {}

    def work(seed: int) -> None:
        sampler = Sampler(1.0, top_p=0.9, seed=seed)
        results[seed] = [sampler.sample(logits) for _ in range(20)]

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, got in results.items():
        sampler = Sampler(1.0, top_p=0.9, seed=seed)
        assert got == [sampler.sample(logits) for _ in range(20)]


def test_logprobs_are_the_raw_log_softmax() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(1000) * 4).astype(F32)
    x = logits.astype(np.float64)
    log_softmax = x - (x.max() + np.log(np.sum(np.exp(x - x.max()))))
    sampler = Sampler(0.2, top_p=0.5, top_k=3)  # none of which changes logprobs
    lp, top = sampler.logprobs(logits, 17, top_n=5)
    assert lp == pytest.approx(log_softmax[17], abs=1e-5)
    order = np.lexsort((np.arange(1000), -x))[:5]
    assert [i for i, _ in top] == order.tolist()
    assert [v for _, v in top] == pytest.approx(log_softmax[order].tolist(), abs=1e-5)
    assert sampler.logprobs(logits, 3) == (pytest.approx(log_softmax[3], abs=1e-5), [])
    tied = np.array([1.0, 3.0, 3.0, -np.inf], F32)
    lp, top = sampler.logprobs(tied, 3, top_n=10)
    assert lp == -math.inf and [i for i, _ in top] == [1, 2, 0]


def test_bad_parameters_and_buffers_are_value_errors() -> None:
    logits = np.zeros(10, F32)
    for kwargs in ({"temperature": -0.5}, {"temperature": math.nan}, {"temperature": math.inf},
                   {"top_p": 0.0}, {"top_p": 1.01}, {"top_k": -1}, {"seed": -1}, {"seed": 2**64}):
        with pytest.raises(SamplerError):
            Sampler(**kwargs)  # type: ignore[arg-type]
    sampler = Sampler(1.0, seed=1)
    for bad in (logits.astype(np.float64), logits.reshape(2, 5), logits[::2], [0.0, 1.0], b"\0" * 40):
        with pytest.raises(SamplerError):
            sampler.sample(bad)  # type: ignore[arg-type]
    with pytest.raises(SamplerError, match="NaN"):
        sampler.sample(np.array([0.0, np.nan], F32))
    assert Sampler(0.0).sample(np.array([np.nan, 1.0], F32), np.array([2], np.uint32)) == 1
    with pytest.raises(SamplerError, match="empty"):
        sampler.sample(np.zeros(0, F32))
    with pytest.raises(SamplerError):
        sampler.sample(logits, np.zeros(1, np.uint8))
    with pytest.raises(SamplerError, match="no token is allowed"):
        sampler.sample(logits, np.zeros(1, np.uint32))
    for token in (-1, 10, 2**70):
        with pytest.raises(SamplerError):
            sampler.logprobs(logits, token)
    with pytest.raises(SamplerError):
        sampler.logprobs(logits, 0, top_n=-1)
    assert isinstance(SamplerError("x"), ValueError)
