"""GDPR routes: the account's data export (`GET /api/account/export`) and deletion (`DELETE /api/account`).

The export holds everything the service keeps about an account - which is metadata only: no request or
response text exists anywhere to export.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ExportedAccount(msgspec.Struct, frozen=True):
    id: str
    email: str
    created_at: int
    status: str
    plan: str
    subscription_status: str
    period_end: int | None
    deleted_at: int | None


class ExportedKey(msgspec.Struct, frozen=True):
    """A key's metadata; its secret was shown once and its hash is never exported."""

    id: str
    kind: str
    name: str
    hint: str
    created_at: int
    disabled: bool
    expires_at: int | None
    models: list[str] | None
    limits: dict[str, Any]


class ExportedSubscription(msgspec.Struct, frozen=True):
    plan: str | None
    status: str | None
    current_period_end: int | None
    subscription_id: str | None
    customer_id: str | None
    updated_at: int


class ExportedPayment(msgspec.Struct, frozen=True):
    ref: str  # "stripe:invoice:in_..." / "usdc:8453:0x...:3"
    kind: str
    at: int
    micro_usd: int
    amount_minor: int
    currency: str


class ExportedUsage(msgspec.Struct, frozen=True):
    """One key, one model, one hour (usage older than 90 days exists only in anonymous aggregates)."""

    key_id: str
    model: str
    hour: int
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micro: int


class AccountExport(msgspec.Struct, frozen=True):
    exported_at: int
    account: ExportedAccount
    keys: list[ExportedKey]
    revoked_key_ids: list[str]  # keys deleted earlier: only their ids and usage remain
    subscription: ExportedSubscription | None  # the one the account's plan and standing follow
    credit_balance_micro: int
    payments: list[ExportedPayment]
    usage: list[ExportedUsage]
    subscriptions: list[ExportedSubscription] = []  # every subscription, each its own state
    object: Literal["account_export"] = "account_export"


class AccountDeleted(msgspec.Struct, frozen=True):
    id: str
    deleted_at: int
    purge_by: int  # account data (email, keys, payment references) is gone by this time
    object: Literal["account"] = "account"
    deleted: bool = True
