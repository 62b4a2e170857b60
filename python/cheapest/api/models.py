"""GET /v1/models, GET /v1/models/{id}, GET /v1/usage, health."""

from __future__ import annotations

from typing import Literal

import msgspec


class Model(msgspec.Struct, frozen=True):
    id: str
    created: int
    owned_by: str = "cheapest"
    object: Literal["model"] = "model"
    context_length: int | None = None


class ModelList(msgspec.Struct, frozen=True):
    data: list[Model]
    object: Literal["list"] = "list"


class RateLimits(msgspec.Struct, frozen=True):
    rpm: int
    tpm: int


class ModelUsage(msgspec.Struct, frozen=True):
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    cost_micro: int


class KeyUsage(msgspec.Struct, frozen=True):
    """GET /v1/usage: the calling key's limits and its usage so far (flushed within the flush interval)."""

    key_id: str
    plan: str
    limits: RateLimits
    usage: list[ModelUsage]
    budget_usd: float | None = None
    budget_window: str | None = None
    object: Literal["usage"] = "usage"


class ModelHealth(msgspec.Struct, frozen=True):
    """One served model in /readyz: loading, ready or failed; once ready, its provider, context length, the
    worker's resident memory growth while it loaded and how long that took."""

    id: str
    status: str
    provider: str | None = None
    context_length: int | None = None
    resident_bytes: int | None = None
    load_seconds: float | None = None


class Health(msgspec.Struct, frozen=True):
    """`model` and `provider`: the first configured model's (what a one-model server always said)."""

    status: str
    model: str | None = None
    provider: str | None = None
    models: list[ModelHealth] | None = None
