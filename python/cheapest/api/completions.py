"""POST /v1/completions (legacy text completions): every field of OpenAI's request, the response."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from cheapest.api.chat import GenerationRequest
from cheapest.api.common import ResponseHead, Usage

TokenId = Annotated[int, Meta(ge=0)]


class CompletionRequest(GenerationRequest, frozen=True, kw_only=True):
    # A string, token ids, or a list of strings or of token id lists (one group of choices per prompt); the
    # gateway checks that a list is one of these.
    prompt: str | Annotated[list[str | TokenId | Annotated[list[TokenId], Meta(min_length=1)]], Meta(min_length=1)]
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    echo: bool | None = None
    best_of: Annotated[int, Meta(ge=1, le=128)] | None = None
    suffix: Any = None  # refused by name when set: the models do not fill in the middle


class CompletionLogprobs(msgspec.Struct, frozen=True):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct, frozen=True):
    text: str
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: CompletionLogprobs | None = None


class Completion(ResponseHead, frozen=True):
    choices: list[CompletionChoice]
    usage: Usage
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None


class CompletionChunkChoice(msgspec.Struct, frozen=True):
    text: str
    index: int
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionChunk(ResponseHead, frozen=True):
    """One SSE event of a streamed text completion (with n, several prompts or logprobs; plain streams are framed
    by the core)."""

    choices: list[CompletionChunkChoice]
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None
