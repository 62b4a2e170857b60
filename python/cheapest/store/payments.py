"""What the payment ledger keeps, whatever the backend: once-only records, journal entries, subscription state.

Nothing here stores card data or any Stripe object verbatim: only the few fields named in the Structs below.
Subscription state is a set of last-writer-wins registers (`SubscriptionState.merged`), so webhooks applied in
any order and any number of times converge on the same state; every backend stores the merged value, one per
subscription. An account may hold several subscriptions (a plan changed by buying another, an old one still
winding down): its plan and standing are derived from all of them (`governing`), never merged into one record,
so a late event of one subscription cannot overwrite another's facts.
"""

from __future__ import annotations

import time
from typing import Literal

import msgspec

from cheapest.vocabulary import DAY

__all__ = [
    "ChainClaim", "ClaimOutcome", "EventOutcome", "EventRecord", "JournalEntry", "PaymentEvent", "SubscriptionState",
    "SubscriptionView", "TransferClaim", "credit_entry", "governing", "status_rank",
]

# Ties between two facts stamped in the same second are broken by this rank so
# that the outcome never depends on arrival order: a later lifecycle stage wins.
_STATUS_RANK = {
    "incomplete": 0, "trialing": 1, "active": 2, "past_due": 3, "paused": 4, "unpaid": 5,
    "incomplete_expired": 6, "canceled": 7,
}


# A subscription in one of these states never leaves it (Stripe makes a new subscription instead), so a status
# register holding one keeps it whatever a later-stamped event says (a payment failure of its last invoice).
_TERMINAL = frozenset({"canceled", "incomplete_expired"})
# How well a subscription keeps its account in standing: the account follows its best subscription.
_STANDING = {"active": 0, "trialing": 0, "past_due": 1, "incomplete": 2, "paused": 3, "unpaid": 4,
             "incomplete_expired": 5, "canceled": 5}


def status_rank(status: str) -> int:
    return _STATUS_RANK.get(status, -1)


class EventRecord(msgspec.Struct, frozen=True, array_like=True):
    """A payment provider's event, recorded once by its id."""

    type: str
    created: int
    received_at: int
    account_id: str | None  # None: no account could be resolved; recorded anyway so retries stay no-ops


class ChainClaim(msgspec.Struct, frozen=True, array_like=True):
    """An on-chain transfer credited to an account, once ever per (chain, tx hash, log index)."""

    account_id: str
    amount_units: int
    sender: str
    block_number: int
    claimed_at: int


class JournalEntry(msgspec.Struct, frozen=True, array_like=True):
    """A payment or credit, kept once per (account, reference)."""

    ref: str  # "stripe:invoice:in_..." / "usdc:8453:0x...:3" / "grant:..."
    kind: str  # "usdc_topup" / "stripe_invoice_paid" / any credit kind the caller names
    at: int
    micro_usd: int  # credited to the balance (0 for a subscription payment)
    amount_minor: int = 0  # what was paid, in the currency's minor units (Stripe)
    currency: str = "usd"


class _Field(msgspec.Struct, frozen=True, array_like=True):
    value: str | int | None
    version: int  # `created` of the Stripe object state that set it
    tie: int  # tie-break among equal versions (status rank, or the value itself)

    def order(self) -> tuple[int, int, str]:
        return (self.version, self.tie, "" if self.value is None else str(self.value))


class SubscriptionState(msgspec.Struct, frozen=True):
    """Per-field last-writer-wins registers: merging is commutative, associative and idempotent,
    so any delivery order and any number of duplicates converge on the same state."""

    fields: dict[str, _Field] = {}

    def merged(self, updates: dict[str, str | int | None], version: int) -> SubscriptionState:
        out = dict(self.fields)
        for name, value in updates.items():
            candidate = _Field(value, version, _tie(name, value))
            old = out.get(name)
            if old is None or _precedence(name, candidate) > _precedence(name, old):
                out[name] = candidate
        return SubscriptionState(out)

    def absorb(self, other: SubscriptionState) -> SubscriptionState:
        """Both states merged (each field's register takes the later fact)."""
        out = self
        for name, f in other.fields.items():
            out = out.merged({name: f.value}, f.version)
        return out

    def view(self) -> SubscriptionView:
        def get(name: str) -> str | int | None:
            f = self.fields.get(name)
            return None if f is None else f.value

        return SubscriptionView(
            plan=_str(get("plan")),
            status=_str(get("status")),
            current_period_end=_int(get("current_period_end")),
            subscription_id=_str(get("subscription_id")),
            customer_id=_str(get("customer_id")),
            updated_at=max((f.version for f in self.fields.values()), default=0),
        )


class SubscriptionView(msgspec.Struct, frozen=True):
    """What the accounts store and `GET /api/billing/status` need to know."""

    plan: str | None
    status: str | None  # Stripe's subscription status: active, past_due, canceled, ...
    current_period_end: int | None  # unix seconds
    subscription_id: str | None
    customer_id: str | None
    updated_at: int

    def effective_status(self, now: float, grace_s: int = DAY) -> str:
        """Stripe's status, except that a paid-up period that ended more than `grace_s` ago reads
        `expired` (a renewal we never heard about). Inference keys are refused while `expired`/`canceled`."""
        status = self.status or "none"
        if status in ("active", "trialing", "past_due") and self.current_period_end is not None:
            if now > self.current_period_end + grace_s:
                return "expired"
        if status in ("incomplete_expired", "unpaid"):
            return "expired"
        return status


class PaymentEvent(msgspec.Struct, frozen=True):
    """One payment provider event as the ledger applies it (at most once, by `event_id`): the subscription facts
    it states (stamped `created`), a payment to journal, and the provider's customer/subscription ids, which are
    linked to the account and name it when the event itself does not."""

    event_id: str
    type: str
    created: int
    handled: bool  # False: recorded so that retries stay no-ops, but not applied
    account_id: str | None = None
    provider_ids: tuple[str, ...] = ()
    subscription: dict[str, str | int | None] = {}
    payment: JournalEntry | None = None

    def settled_early(self, recorded: bool, account_id: str | None) -> EventOutcome | None:
        """The outcome when there is nothing to apply: a duplicate (`recorded` False: the id was seen), a type
        not handled, or no live account; None when the event is to be applied to `account_id`."""
        if not recorded:
            return EventOutcome("duplicate", account_id)
        if not self.handled:
            return EventOutcome("ignored", account_id)
        if account_id is None:
            return EventOutcome("unmatched", None)
        return None


EventResult = Literal["applied", "unchanged", "duplicate", "ignored", "unmatched"]


class EventOutcome(msgspec.Struct, frozen=True):
    """"applied" (state changed), "unchanged" (valid, but older than what is held), "duplicate" (event id seen
    before: no effect), "ignored" (a type not handled), "unmatched" (no live account could be resolved)."""

    result: EventResult
    account_id: str | None


class TransferClaim(msgspec.Struct, frozen=True):
    """One transfer (a log of a transaction) to claim for an account, and the credit it brings when it is new."""

    chain_id: int
    tx_hash: str
    log_index: int
    claim: ChainClaim
    payment: JournalEntry


class ClaimOutcome(msgspec.Struct, frozen=True):
    credited_micro: int  # credited by this call
    held_by_others: int  # transfers another account had claimed before
    balance_micro: int  # the account's balance afterwards


def governing(views: list[SubscriptionView]) -> SubscriptionView | None:
    """The subscription an account's plan and standing follow: the one in the best standing (active before
    past due before canceled), the most recently changed among equals. A canceled old plan beside an active new
    one leaves the account active on the new plan; only when every subscription has lapsed does the account."""
    if not views:
        return None
    return min(views, key=lambda v: (_STANDING.get(v.status or "", 6), -v.updated_at, v.subscription_id or ""))


def _precedence(name: str, f: _Field) -> tuple[bool, int, int, str]:
    return (name == "status" and f.value in _TERMINAL, *f.order())


def credit_entry(micro_usd: int, ref: str, kind: str) -> JournalEntry:
    """A credit of `micro_usd` (positive) to journal once per `ref`, stamped now."""
    if micro_usd <= 0:
        raise ValueError("a credit must be positive")
    return JournalEntry(ref=ref, kind=kind, at=int(time.time()), micro_usd=micro_usd)


def _tie(name: str, value: str | int | None) -> int:
    if name == "status":
        return status_rank(str(value))
    if isinstance(value, int):
        return value
    return 0  # ids and plan names: `_Field.order` falls back to the text itself


def _str(v: str | int | None) -> str | None:
    return None if v is None else str(v)


def _int(v: str | int | None) -> int | None:
    return None if v is None else int(v)
