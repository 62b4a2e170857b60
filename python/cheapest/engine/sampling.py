"""Next-token choice from one row of logits: logit bias, frequency and presence penalties, a grammar's mask,
then greedy, temperature, top-k, top-p, seeded; and, when asked, the step's logprobs.

Each sequence owns its sampler and its random generator, so a seed reproduces a completion whatever else
shares the batch, and the draw order never depends on scheduling. The n sequences of one request draw from
independent streams of the same seed (stream 0 is the seed's own, so n=1 and the first of n agree).

A request that asks for none of bias, penalties, masks or logprobs runs exactly the plain path.
"""

from __future__ import annotations

import numpy as np

from cheapest.engine.logprobs import TokenTexts, token_logprob
from cheapest.engine.types import SamplingParams, TokenLogprob


class Sampler:
    __slots__ = ("_greedy", "_temperature", "_top_k", "_top_p", "_rng", "_bias", "_frequency", "_presence",
                 "_counts", "_logprobs", "_texts", "last")

    def __init__(self, params: SamplingParams, *, stream: int = 0, texts: TokenTexts | None = None) -> None:
        if params.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if params.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if params.logprobs is not None and texts is None:
            raise ValueError("logprobs need the vocabulary's token texts")
        self._greedy = params.temperature == 0 or params.top_k == 1
        self._temperature = float(params.temperature)
        self._top_k = int(params.top_k)
        self._top_p = float(params.top_p)
        # seed=None draws fresh OS entropy: different answers each time, as users expect.
        bits = np.random.PCG64(params.seed)
        self._rng = np.random.Generator(bits.jumped(stream) if stream else bits)
        self._bias = (np.fromiter((t for t, _ in params.logit_bias), np.int64),
                      np.fromiter((b for _, b in params.logit_bias), np.float64)) if params.logit_bias else None
        self._frequency = float(params.frequency_penalty)
        self._presence = float(params.presence_penalty)
        self._counts: dict[int, int] | None = {} if self._frequency or self._presence else None
        self._logprobs = params.logprobs
        self._texts = texts
        self.last: TokenLogprob | None = None  # the latest token's logprobs, when asked for

    @property
    def greedy(self) -> bool:
        return self._greedy

    def __call__(self, logits: np.ndarray, allowed: np.ndarray | None = None, fallback: int = -1) -> int:
        """The next token. `allowed`: one 0/1 per vocabulary entry (a grammar's mask); when it allows nothing,
        `fallback` (the end of the sequence) is the answer. `logits` is never written to."""
        if allowed is not None and not allowed.any():
            token = fallback
        elif self._bias is None and self._counts is None and allowed is None:
            token = self._choose(logits)
        else:
            scores = logits.astype(np.float64)  # a copy: the caller's row may be the runner's buffer
            if self._bias is not None:
                np.add.at(scores, self._bias[0], self._bias[1])
            if self._counts:
                ids = np.fromiter(self._counts, np.int64, len(self._counts))
                counts = np.fromiter(self._counts.values(), np.float64, len(self._counts))
                scores[ids] -= counts * self._frequency + self._presence
            if allowed is not None:
                scores[allowed == 0] = -np.inf
            token = self._choose(scores)
        if self._counts is not None:
            self._counts[token] = self._counts.get(token, 0) + 1
        if self._logprobs is not None:
            assert self._texts is not None
            self.last = token_logprob(logits, token, self._logprobs, self._texts)
        return token

    def _choose(self, logits: np.ndarray) -> int:
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
