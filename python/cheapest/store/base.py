"""The storage interface every backend implements: `Store` (accounts, keys, usage, data lifecycle) and its
`Ledger` (payments, balances, subscriptions).

Nothing above the store knows how records are kept: the gateway, the billing logic, the privacy jobs and the CLI
call these domain methods only. Each method is one atomic step: where a docstring says "once", two workers (or
two hosts) doing the same thing at the same time change state once between them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Protocol

from cheapest.store.payments import (
    ChainClaim, ClaimOutcome, EventOutcome, EventRecord, JournalEntry, PaymentEvent, SubscriptionView, TransferClaim,
)
from cheapest.store.records import AccountRecord, DailyUsage, KeyRecord, UsageCounter, UsageRow
from cheapest.vocabulary import KeyKind

UsageKey = tuple[str, str, int]  # key_id, model, hour


class StoreError(Exception):
    """The store refused an operation (e.g. a duplicate email); the message carries no secrets."""


class StoreFull(StoreError):
    """The store has no room for this write (LMDB's map is full, PostgreSQL's disk). The write was not made;
    nothing written before is lost. The server answers 507; the operator grows the store."""


class QuotaExceeded(StoreError):
    """A per-account bound would be passed (e.g. its live keys); nothing was written."""


class LastManagementKey(StoreError):
    """Revoking this key would leave the account without a management key; nothing was written."""


class StoreUnavailable(ConnectionError):
    """The store's server cannot be reached right now (a network backend): nothing was changed, or - for a
    usage flush - it may be retried under the same flush id. The server answers 503; the message names no data."""


class Ledger(Protocol):
    """What was paid, by whom, credited exactly once; the ONE owner of an account's spendable balance.

    Subscription facts are kept per subscription; what all of an account's subscriptions together say (its plan,
    subscription status, period end) is mirrored into the account record in the same atomic step, with the
    store's change epoch bumped, so every worker sees it on its next request.
    """

    # reads
    def balance(self, account_id: str) -> int: ...
    def journal(self, account_id: str) -> list[JournalEntry]: ...
    def subscription(self, account_id: str) -> SubscriptionView | None:
        """The subscription the account's plan and standing follow (`payments.governing` over all of them)."""
        ...

    def subscriptions(self, account_id: str) -> list[SubscriptionView]:
        """Each of the account's subscriptions, its own state (never merged with another's)."""
        ...

    def event(self, event_id: str) -> EventRecord | None: ...
    def chain_claim(self, chain_id: int, tx_hash: str, log_index: int) -> ChainClaim | None: ...

    # money
    def credit(self, account_id: str, micro_usd: int, ref: str, kind: str = "credit") -> bool:
        """Add a positive amount to the balance once per `ref`; False (and no change) if `ref` was used."""
        ...

    def debit(self, account_id: str, micro_usd: int) -> int:
        """Usage cost; the balance may go below zero (cost is known after the request). Returns the balance."""
        ...

    def record_payment(self, account_id: str, entry: JournalEntry) -> bool:
        """Journal a payment once per (account, `entry.ref`), crediting `entry.micro_usd`; False if seen."""
        ...

    # subscriptions and provider events
    def merge_subscription(self, account_id: str, updates: dict[str, str | int | None], version: int) -> bool:
        """Merge facts stamped `version` (last writer wins per fact); True if anything changed."""
        ...

    def record_payment_event(self, event: PaymentEvent) -> EventOutcome:
        """Apply a provider event once by its id, all in one step: resolve its account (named, or through a
        linked provider id), refuse an account that is deleted or purged (the event is still recorded, without
        it), link the provider ids, merge the subscription facts, journal the payment."""
        ...

    def claim_transfers(self, account_id: str, claims: Sequence[TransferClaim]) -> ClaimOutcome:
        """Claim each on-chain transfer for the account, once ever per (chain, tx hash, log index), crediting its
        payment when the claim is new; counts those another account holds."""
        ...


class Store(Protocol):
    @property
    def ledger(self) -> Ledger:
        """The payment ledger on the same storage."""
        ...

    # A counter bumped in the same step as any key or account change (workers' caches compare it).
    def epoch(self) -> int: ...

    # accounts
    def create_account(self, account: AccountRecord) -> None: ...
    def get_account(self, account_id: str) -> AccountRecord | None: ...
    def find_account_by_email(self, email: str) -> AccountRecord | None: ...
    def put_account(self, account: AccountRecord) -> None: ...
    def update_account(self, account_id: str,
                       change: Callable[[AccountRecord], AccountRecord]) -> AccountRecord | None:
        """Read-modify-write in one step (no lost updates between workers); None if unknown."""
        ...

    def list_accounts(self) -> Iterator[AccountRecord]:
        """Every account, read a page at a time (never all of them in memory at once)."""
        ...

    def count_accounts(self) -> int: ...

    # keys
    def create_key(self, key: KeyRecord, max_keys: int | None = None) -> None:
        """Store a new key; with `max_keys`, `QuotaExceeded` (nothing written) when the account already has that
        many live keys. The check and the insert are one step."""
        ...

    def get_key(self, key_id: str) -> KeyRecord | None: ...
    def find_key_by_hash(self, key_hash: bytes) -> KeyRecord | None: ...
    def put_key(self, key: KeyRecord) -> None: ...
    def update_key(self, key_id: str, account_id: str,
                   change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        """Read-modify-write of one of `account_id`'s keys in one step; None if unknown or not the account's."""
        ...

    def delete_key(self, key_id: str, keep_last_management: bool = False) -> bool:
        """Revoke a key (False if unknown). With `keep_last_management`, `LastManagementKey` (nothing written)
        when it is the account's only management key. The check and the delete are one step."""
        ...

    def list_keys(self, account_id: str, after: str | None = None, limit: int = 100,
                  kind: KeyKind | None = None) -> list[KeyRecord]:
        """At most `limit` of the account's live keys after the id `after`, in id order (one page)."""
        ...

    def count_keys(self, account_id: str, kind: KeyKind | None, now: float) -> tuple[int, int]:
        """(live keys, of which usable at `now`: not disabled, not expired), counted in the store."""
        ...

    def key_history(self, account_id: str) -> list[str]:
        """Ids of every key the account ever had, revoked ones included (their usage is still billed)."""
        ...

    # usage
    def add_usage(self, deltas: Mapping[UsageKey, UsageCounter], debits: Mapping[str, int] | None = None,
                  flush_id: str | None = None, owners: Mapping[str, str] | None = None) -> None:
        """Add per-worker deltas to the totals and to each key's budget-window spend, and debit credit-funded
        accounts' balances (`debits`: account id -> micro-dollars), all in one step. A `flush_id` (a UUID) makes
        the step once-only: retried after a lost connection, a flush that did commit changes nothing more.
        `owners` (key id -> account id) adds each key's cost to its account's budget-window spend too (a plan's
        budget binds the account)."""
        ...

    def window_spend(self, owner_id: str, window: str, start: int) -> int:
        """Micro-dollars spent in the budget window that began at `start` by a key (its id) or an account (its
        id, the sum over its keys)."""
        ...

    def usage(self, key_ids: Iterable[str], start: int = 0, end: int | None = None) -> Iterator[UsageRow]: ...

    # data lifecycle (privacy/): anonymous aggregates and erasure
    def roll_up_usage(self, before: int) -> int: ...
    def daily_usage(self, start: int = 0, end: int | None = None) -> Iterator[DailyUsage]: ...
    def purge_account(self, account_id: str) -> bool:
        """Erase an account in one step: record, email, every key it had, its payment references; its usage
        folds into the anonymous daily aggregates; once-only payment records stay without the account."""
        ...

    def close(self) -> None: ...
