"""The Management API (mk_ keys): /api/keys, /api/management-keys and /api/usage. Requests refuse unknown fields
(a typo gets a 400 naming it rather than being ignored); responses never carry a secret except `CreatedKey.key`,
once. Every field is bounded (name length, models per key and their length) so an account's keys stay small."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from cheapest.vocabulary import BudgetWindow, KeyKind

Name = Annotated[str, Meta(min_length=1, max_length=200)]
ModelName = Annotated[str, Meta(min_length=1, max_length=128)]
Models = Annotated[list[ModelName], Meta(min_length=1, max_length=16)]
UnixTime = Annotated[int, Meta(ge=0)]


class KeyLimitsBody(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """A key's own limits; each applies inside its plan's (the lower wins). Unset = the plan's. A budget
    (`budget_usd` per `budget_window`) is a spend cap per fixed window, windows aligned to the Unix epoch (UTC):
    1d resets at 00:00 UTC, 5h/8h at multiples of 5/8 hours since 1970-01-01T00:00Z, 30d every 30 days."""

    rpm: Annotated[int, Meta(ge=1)] | None = None
    tpm: Annotated[int, Meta(ge=1)] | None = None
    budget_usd: Annotated[float, Meta(ge=0, le=1e9)] | None = None
    budget_window: BudgetWindow | None = None


class CreateKeyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name = "key"
    limits: KeyLimitsBody | None = None
    expires_at: UnixTime | None = None  # unix seconds
    models: Models | None = None  # None = every model


class CreateManagementKeyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name = "management key"


class PatchKeyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Fields left out stay as they are; `null` clears `limits` (back to the plan's), `expires_at`, `models`.
    `limits` replaces the key's limits object as a whole."""

    name: Name | UnsetType = UNSET
    disabled: bool | UnsetType = UNSET
    limits: KeyLimitsBody | None | UnsetType = UNSET
    expires_at: UnixTime | None | UnsetType = UNSET
    models: Models | None | UnsetType = UNSET


class KeyInfo(msgspec.Struct, frozen=True):
    """A key's metadata; never its secret."""

    id: str
    name: str
    hint: str
    kind: KeyKind
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
    kind: KeyKind
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


class UsageBucket(msgspec.Struct, frozen=True):
    """One key, one model, one hour or day (`start`: unix seconds, UTC)."""

    key_id: str
    model: str
    start: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int
    cost_usd: float


class UsageTotal(msgspec.Struct, frozen=True):
    """One key, one model, over the whole range."""

    key_id: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int
    cost_usd: float


class UsageReport(msgspec.Struct, frozen=True):
    """GET /api/usage?from&to&group_by=hour|day and GET /api/usage/{key_id}: counts only, never content.
    `from`/`to` are unix seconds (to exclusive); usage is recorded per hour, so a range is rounded out to
    whole hours. Revoked keys' usage is included (it was billed)."""

    from_: int = msgspec.field(name="from")
    to: int = 0
    group_by: Literal["hour", "day"] = "day"
    data: list[UsageBucket] = []
    totals: list[UsageTotal] = []
    object: Literal["usage_report"] = "usage_report"
