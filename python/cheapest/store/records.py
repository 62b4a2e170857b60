"""What the store keeps: accounts, keys (hashes only), usage counters. Never request text."""

from __future__ import annotations

import msgspec

from cheapest.vocabulary import AccountStatus, BudgetWindow, KeyKind


class KeyLimits(msgspec.Struct, frozen=True, omit_defaults=True):
    """A key's own limits; each applies inside its plan's limit (None = the plan's)."""

    rpm: int | None = None
    tpm: int | None = None
    budget_usd: float | None = None
    budget_window: BudgetWindow | None = None


class AccountRecord(msgspec.Struct, frozen=True):
    """An account. Its spendable credit balance is NOT here: the payment ledger (`Store.ledger`) is its one
    owner, so credits and debits stay once-only records beside their journal, and a usage debit never rewrites
    (and never invalidates cached copies of) this record."""

    id: str
    email: str
    created_at: int  # unix seconds
    plan: str
    status: AccountStatus = "active"
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
