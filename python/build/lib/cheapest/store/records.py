"""What the store keeps: accounts, keys (hashes only), usage counters. Never request text."""

from __future__ import annotations

from typing import Literal

import msgspec

KeyKind = Literal["sk", "mk"]
BudgetWindow = Literal["5h", "8h", "1d", "30d"]
BUDGET_WINDOWS: dict[str, int] = {"5h": 5 * 3600, "8h": 8 * 3600, "1d": 86_400, "30d": 30 * 86_400}


def window_start(window: str, now: float) -> int:
    """Budget windows are fixed and aligned to the Unix epoch (UTC): a 1d window resets at 00:00 UTC, a 5h
    window at every multiple of 5 hours since 1970-01-01T00:00Z, a 30d one every 30 days from then."""
    length = BUDGET_WINDOWS[window]
    return int(now) // length * length


class KeyLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    """A key's own limits; each applies inside its plan's limit (None = the plan's)."""

    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_window: BudgetWindow | None = None


class AccountRecord(msgspec.Struct, frozen=True):
    """An account. Its spendable credit balance is NOT here: the payment ledger (`billing.ledger`, table
    pay_credits) is its one owner, so credits and debits stay once-only records beside their journal, and a
    usage debit never rewrites (and never invalidates cached copies of) this record."""

    id: str
    email: str
    created_at: int  # unix seconds
    plan: str
    status: Literal["active", "disabled", "deleted"] = "active"
    # Stripe's status mirrored from the ledger (none = operator-assigned plan, no subscription).
    subscription_status: str = "none"
    period_end: int | None = None
    deleted_at: int | None = None  # set with status "deleted"; the record is purged before 30 days pass


class KeyRecord(msgspec.Struct, frozen=True):
    id: str
    account_id: str
    kind: KeyKind
    hash: bytes  # HMAC-SHA256(pepper, secret); the secret itself is never stored
    hint: str  # e.g. "sk_…a1B2"
    name: str
    created_at: int
    limits: KeyLimits = KeyLimits()
    disabled: bool = False
    expires_at: int | None = None
    models: tuple[str, ...] | None = None  # None = every model

    def usable_at(self, now: float) -> bool:
        return not self.disabled and (self.expires_at is None or now < self.expires_at)


class UsageCounter(msgspec.Struct):
    """Totals for one key, one model, one hour."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micro: int = 0

    def add(self, other: UsageCounter) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_micro += other.cost_micro


class UsageRow(msgspec.Struct, frozen=True):
    key_id: str
    model: str
    hour: int  # unix seconds at the start of the hour
    counter: UsageCounter


class DailyUsage(msgspec.Struct, frozen=True):
    """Anonymous aggregate: all keys' usage of one model on one UTC day, once older than 90 days (or of a
    purged account). It carries no key or account id."""

    day: int  # unix seconds at 00:00 UTC
    model: str
    counter: UsageCounter
