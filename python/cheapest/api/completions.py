"""POST /v1/completions (legacy text completions; a string prompt)."""

from __future__ import annotations

from typing import Literal

import msgspec

from cheapest.api.chat import MaxTokens, Stop, Temperature, TopP
from cheapest.api.chat import StreamOptions
from cheapest.api.common import Usage


class CompletionRequest(msgspec.Struct, frozen=True):
    model: str
    prompt: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None


class CompletionChoice(msgspec.Struct, frozen=True):
    text: str
    index: int
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class Completion(msgspec.Struct, frozen=True):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    object: Literal["text_completion"] = "text_completion"
