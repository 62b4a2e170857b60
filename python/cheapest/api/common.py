"""Types shared by several routes."""

from __future__ import annotations

import msgspec


class ResponseHead(msgspec.Struct, frozen=True):
    """The fields every completion response and stream chunk starts with."""

    id: str
    created: int
    model: str


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, frozen=True):
    """OpenAI's error shape, used for every 4xx/5xx."""

    error: ErrorDetail
