"""Next-token choice from one row of logits: greedy, temperature, top-k, top-p, seeded.

Each sequence owns its sampler and its random generator, so a seed reproduces a completion whatever else
shares the batch, and the draw order never depends on scheduling.
"""

from __future__ import annotations

import numpy as np

from cheapest.engine.types import SamplingParams


class Sampler:
    __slots__ = ("_greedy", "_temperature", "_top_k", "_top_p", "_rng")

    def __init__(self, params: SamplingParams) -> None:
        if params.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if params.top_k < 0:
            raise ValueError("top_k must be >= 0")
        self._greedy = params.temperature == 0 or params.top_k == 1
        self._temperature = float(params.temperature)
        self._top_k = int(params.top_k)
        self._top_p = float(params.top_p)
        # seed=None draws fresh OS entropy: different answers each time, as users expect.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))

    @property
    def greedy(self) -> bool:
        return self._greedy

    def __call__(self, logits: np.ndarray) -> int:
        if self._greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64, copy=False) / self._temperature
        candidates: np.ndarray | None = None  # token ids of `scores` when restricted
        if 0 < self._top_k < scores.shape[0]:
            candidates = np.argpartition(scores, -self._top_k)[-self._top_k :]
            scores = scores[candidates]
        if self._top_p < 1.0:
            # Descending, ties broken by token id, so the nucleus is well defined and reproducible.
            order = np.lexsort((candidates if candidates is not None else np.arange(scores.shape[0]), -scores))
            scores = scores[order]
            candidates = order if candidates is None else candidates[order]
            probs = np.exp(scores - scores[0])
            cumulative = np.cumsum(probs)
            keep = int(np.searchsorted(cumulative, self._top_p * cumulative[-1])) + 1
            scores = scores[:keep]
            candidates = candidates[:keep]
        probs = np.exp(scores - scores.max())
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        index = min(index, cumulative.shape[0] - 1)
        return int(candidates[index]) if candidates is not None else index
