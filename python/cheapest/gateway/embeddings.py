"""Embeddings, apart from their wire format: which model serves the request, its inputs as token ids within the
caps (inputs per request, tokens per input: refused naming the input's index, or cut when so configured), and
the vectors' encoding.

Inputs pass through here in memory only; no message built here carries any of them.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import numpy as np

from cheapest.api.embeddings import EmbeddingRequest
from cheapest.config import ServingSettings
from cheapest.engine.registry import ServedModels
from cheapest.engine.types import Embedder, Engine, is_embedder
from cheapest.gateway.auth import Caller
from cheapest.gateway.completions import served_model
from cheapest.gateway.errors import Refusal


def embedding_engine(models: ServedModels[Engine | Embedder], caller: Caller, model: str) -> Embedder:
    engine = served_model(models, caller, model)
    if not is_embedder(engine):
        raise Refusal("invalid_request", f"The model {engine.model_id} is not an embedding model: use "
                      "/v1/chat/completions or /v1/completions.", param="model", code="model_not_supported")
    return engine


def _invalid(message: str, code: str = "invalid_value") -> Refusal:
    return Refusal("invalid_request", message, param="input", code=code)


def input_ids(engine: Embedder, request: EmbeddingRequest, serving: ServingSettings) -> list[list[int]]:
    """Each input as the token ids the model reads. Texts go through the model's tokenizer; token ids get the
    model's special tokens. Refused: an empty input, mixed kinds, too many inputs, too many tokens in one."""
    if request.dimensions is not None:
        raise Refusal("invalid_request", f"The model {engine.model_id} has a fixed size of {engine.dimensions} "
                      "dimensions; `dimensions` cannot be set.", param="dimensions", code="invalid_value")
    raw = request.input
    items: Sequence[str | int | list[int]] = [raw] if isinstance(raw, str) else raw
    if not items:
        raise _invalid("`input` must not be empty.")
    if len(items) > serving.embedding_max_inputs:
        raise _invalid(f"`input` has {len(items)} items; the limit is {serving.embedding_max_inputs} per request.")
    if all(isinstance(x, int) for x in items):  # one input given as token ids
        items = [[int(x) for x in items]]  # type: ignore[arg-type]
    elif not (all(isinstance(x, str) for x in items) or all(isinstance(x, list) for x in items)):
        raise _invalid("`input` must be a string, a list of strings, a list of token ids or a list of lists of "
                       "token ids, not a mix.")
    limit = min(serving.embedding_max_tokens or engine.context_length, engine.context_length)
    out: list[list[int]] = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise _invalid(f"Input {index} is an empty string.")
            ids = engine.tokenize(item)
        else:
            assert isinstance(item, list)
            if not item:
                raise _invalid(f"Input {index} has no tokens.")
            ids = engine.wrap(item)
        if len(ids) > limit:
            if not serving.embedding_truncate:
                raise Refusal("invalid_request", f"Input {index} has {len(ids)} tokens; this model takes at most "
                              f"{limit} per input.", param="input", code="context_length_exceeded")
            ids = engine.truncate(ids, limit)
        out.append(ids)
    return out


def encode_vectors(vectors: np.ndarray, encoding_format: str) -> list[list[float] | str]:
    """`float`: lists of numbers; `base64`: each vector's little-endian float32 bytes (what the SDK decodes)."""
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        return [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    out: list[list[float] | str] = vectors.tolist()
    return out
