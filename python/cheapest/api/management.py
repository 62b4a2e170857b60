"""The Management API (mk_ keys): /api/keys. The accounts issue extends it on the same store."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Name = Annotated[str, Meta(min_length=1, max_length=200)]
BudgetWindow = Literal["5h", "8h", "1d", "30d"]


class KeyLimitsBody(msgspec.Struct, frozen=True, omit_defaults=True):
    rpm: Annotated[int, Meta(ge=1)] | None = None
    tpm: Annotated[int, Meta(ge=1)] | None = None
    budget_usd: Annotated[float, Meta(ge=0)] | None = None
    budget_window: BudgetWindow | None = None


class CreateKeyRequest(msgspec.Struct, frozen=True):
    name: Name = "key"
    limits: KeyLimitsBody | None = None
    expires_at: int | None = None  # unix seconds
    models: list[str] | None = None


class PatchKeyRequest(msgspec.Struct, frozen=True):
    name: Name | None = None
    disabled: bool | None = None
    limits: KeyLimitsBody | None = None
    expires_at: int | None = None


class KeyInfo(msgspec.Struct, frozen=True):
    """A key's metadata; never its secret."""

    id: str
    name: str
    hint: str
    kind: Literal["sk", "mk"]
    created_at: int
    disabled: bool
    limits: KeyLimitsBody
    expires_at: int | None = None
    models: list[str] | None = None
    object: Literal["api_key"] = "api_key"


class CreatedKey(msgspec.Struct, frozen=True):
    """The new key; `key` is its secret, shown this once."""

    key: str
    id: str
    name: str
    hint: str
    kind: Literal["sk"]
    created_at: int
    limits: KeyLimitsBody
    expires_at: int | None = None
    models: list[str] | None = None
    object: Literal["api_key"] = "api_key"


class KeyList(msgspec.Struct, frozen=True):
    data: list[KeyInfo]
    has_more: bool
    last_id: str | None = None
    object: Literal["list"] = "list"


class Deleted(msgspec.Struct, frozen=True):
    id: str
    deleted: bool = True
    object: Literal["api_key"] = "api_key"
