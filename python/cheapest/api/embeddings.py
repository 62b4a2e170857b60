"""POST /v1/embeddings: the request and OpenAI's response shape."""

from __future__ import annotations

from typing import Literal

import msgspec


class EmbeddingRequest(msgspec.Struct, frozen=True, kw_only=True):
    """`input`: a string, a list of strings, a list of token ids, or a list of lists of token ids (token ids as the
    model's tokenizer gives them for a text, without special tokens). Unknown fields are ignored, as OpenAI does."""

    model: str
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None  # accepted; never stored or logged


class Embedding(msgspec.Struct, frozen=True):
    embedding: list[float] | str  # base64: the little-endian float32 bytes
    index: int
    object: Literal["embedding"] = "embedding"


class EmbeddingUsage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, frozen=True):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: Literal["list"] = "list"
