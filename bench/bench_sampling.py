"""One next-token choice: cheapest_core.Sampler (the engine's) vs the numpy sampler the engine used before it
(kept here as the peer), same logits and settings.

    make bench   (or: .venv/bin/python -m pytest bench/bench_sampling.py --benchmark-enable)
    .venv/bin/python bench/bench_sampling.py [--repeat 200]     # medians and ratios as a table

Vocabularies of 49,152 (SmolLM2) and 262,144 (Gemma 3) float32 logits, normally distributed with a
standard deviation of 2.5; four settings: greedy, temperature 0.8, temperature 0.8 with top_p 0.9,
and with top_k 50. One measured call is one `sample` (Python call included) for the core and one
`__call__` for numpy. Goal (issue 15): move per-step work out of Python at no cost; report the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import pytest

from cheapest_core import Sampler

VOCABS = {"49k": 49_152, "262k": 262_144}
SETTINGS: dict[str, dict[str, float]] = {
    "greedy": {"temperature": 0.0},
    "temperature": {"temperature": 0.8},
    "top_p": {"temperature": 0.8, "top_p": 0.9},
    "top_k": {"temperature": 0.8, "top_k": 50},
}


class NumpySampler:
    """The engine's former sampler: temperature, then top-k (argpartition), then top-p (a sort), in numpy."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None) -> None:
        self._greedy = temperature == 0 or top_k == 1
        self._temperature, self._top_k, self._top_p = float(temperature), int(top_k), float(top_p)
        self._rng = np.random.Generator(np.random.PCG64(seed))

    def __call__(self, logits: np.ndarray) -> int:
        if self._greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64, copy=False) / self._temperature
        candidates: np.ndarray | None = None
        if 0 < self._top_k < scores.shape[0]:
            candidates = np.argpartition(scores, -self._top_k)[-self._top_k :]
            scores = scores[candidates]
        if self._top_p < 1.0:
            order = np.lexsort((candidates if candidates is not None else np.arange(scores.shape[0]), -scores))
            scores = scores[order]
            candidates = order if candidates is None else candidates[order]
            cumulative = np.cumsum(np.exp(scores - scores[0]))
            keep = int(np.searchsorted(cumulative, self._top_p * cumulative[-1])) + 1
            scores, candidates = scores[:keep], candidates[:keep]
        cumulative = np.cumsum(np.exp(scores - scores.max()))
        index = min(int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right")),
                    cumulative.shape[0] - 1)
        return int(candidates[index]) if candidates is not None else index


def logits_of(vocab: str) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal(VOCABS[vocab]) * 2.5).astype(np.float32)


def peer(name: str, setting: str) -> Callable[[np.ndarray], int]:
    kwargs = SETTINGS[setting]
    if name == "core":
        return Sampler(seed=1, **kwargs).sample  # type: ignore[arg-type]
    return NumpySampler(seed=1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("vocab", list(VOCABS))
@pytest.mark.parametrize("name", ["core", "numpy"])
def test_sample_one_token(benchmark, name: str, vocab: str, setting: str) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"sampling: one token, {vocab} vocabulary, {setting}"
    logits = logits_of(vocab)
    token = benchmark(peer(name, setting), logits)
    assert 0 <= token < len(logits)
    if setting == "greedy":
        assert token == int(np.argmax(logits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    print(f"{'vocab':<6} {'setting':<12} {'core us':>9} {'numpy us':>9} {'numpy/core':>11}")
    for vocab in VOCABS:
        logits = logits_of(vocab)
        for setting in SETTINGS:
            medians = {}
            for name in ("core", "numpy"):
                sample = peer(name, setting)
                times = []
                for _ in range(args.repeat):
                    start = time.perf_counter()
                    sample(logits)
                    times.append(time.perf_counter() - start)
                medians[name] = statistics.median(times) * 1e6
            ratio = medians["numpy"] / medians["core"]
            print(f"{vocab:<6} {setting:<12} {medians['core']:>9.1f} {medians['numpy']:>9.1f} {ratio:>10.1f}x")


if __name__ == "__main__":
    main()
