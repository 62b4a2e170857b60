"""Token logprobs as OpenAI reports them: from one step's raw logits (the model's own distribution, before
temperature, top_p, penalties, biases and grammar masks), the chosen token's logprob and the k most likely
tokens, each with its text and UTF-8 bytes.

A token's bytes come from the vocabulary (the core tokenizer's `token_bytes`, or llguidance's view of
tokenizer.json for shapes the core cannot answer exactly); a token that is part of a multi-byte character is
shown the way OpenAI shows it, its bytes escaped (`\\xe2`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import cheapest_core
import numpy as np

from cheapest.engine.types import TokenLogprob

if TYPE_CHECKING:
    from typing_extensions import Buffer


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


def token_logprob(sampler: cheapest_core.Sampler, logits: np.ndarray, token: int, k: int,
                  texts: TokenTexts) -> TokenLogprob:
    """The chosen token and the k most likely tokens of this step (k = 0: the chosen token only), from the raw
    logits (the core's log-softmax)."""
    logprob, best = sampler.logprobs(cast("Buffer", logits), token, k)  # numpy arrays are buffers
    text, raw = texts[token]
    return TokenLogprob(text, raw, logprob, tuple((*texts[t], lp) for t, lp in best))
