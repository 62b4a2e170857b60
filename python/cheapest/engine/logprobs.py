"""Token logprobs as OpenAI reports them: from one step's raw logits (the model's own distribution, before
temperature, top_p, penalties, biases and grammar masks), the chosen token's logprob and the k most likely
tokens, each with its text and UTF-8 bytes.

A token's bytes come from the vocabulary (llguidance's view of tokenizer.json decodes each token alone); a
token that is part of a multi-byte character is shown the way OpenAI shows it, its bytes escaped (`\\xe2`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from cheapest.engine.types import TokenLogprob


class TokenTexts:
    """Each vocabulary entry's (text, bytes), made on first use from a bytes-of-one-token function."""

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __getitem__(self, token: int) -> tuple[str, bytes]:
        got = self._cache.get(token)
        if got is None:
            raw = self._token_bytes(token)
            got = self._cache[token] = (raw.decode("utf-8", "backslashreplace"), raw)
        return got


def log_softmax_at(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """(logits as float64, their log-sum-exp): logprob(t) = logits[t] - lse."""
    scores = logits.astype(np.float64, copy=False)
    top = float(scores.max())
    return scores, top + float(np.log(np.exp(scores - top).sum()))


def token_logprob(logits: np.ndarray, token: int, k: int, texts: TokenTexts) -> TokenLogprob:
    """The chosen token and the k most likely tokens of this step (k = 0: the chosen token only)."""
    scores, lse = log_softmax_at(logits)
    text, raw = texts[token]
    top: tuple[tuple[str, bytes, float], ...] = ()
    if k > 0:
        k = min(k, scores.shape[0])
        best = np.argpartition(-scores, k - 1)[:k]
        best = best[np.lexsort((best, -scores[best]))]  # most likely first, ties by token id
        top = tuple((*texts[int(t)], float(scores[t] - lse)) for t in best)
    return TokenLogprob(text, raw, float(scores[token] - lse), top)


def sequence_logprob(logits: np.ndarray, token: int) -> float:
    """The chosen token's logprob alone (best_of ranks sequences by their mean)."""
    scores, lse = log_softmax_at(logits)
    return float(scores[token] - lse)
