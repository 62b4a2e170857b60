"""POST /v1/completions (legacy text completions; a string prompt)."""

from __future__ import annotations

from typing import Literal

import msgspec

from cheapest.api.chat import GenerationRequest
from cheapest.api.common import Usage


class CompletionRequest(GenerationRequest, frozen=True, kw_only=True):
    prompt: str


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
