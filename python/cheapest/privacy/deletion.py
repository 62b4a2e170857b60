"""Account deletion (GDPR erasure) in two steps: marked deleted at once, purged before 30 days have passed.

Marking is one account update: the store bumps its change epoch in the same transaction, and every worker
compares that epoch before trusting its auth cache, so every key of the account stops working on every worker
with the next request. Purging removes the account record, its email, every key it ever had, its payment
references (journal, subscription, balance, Stripe links), and folds its usage into the anonymous per-day,
per-model aggregates - in one store transaction.

Why 29 days: the policy promises deletion *within* 30 days. The retention job runs periodically (hourly by
default) and may run late (a server that was down); purging from day 29 leaves a day's margin for that.
"""

from __future__ import annotations

import msgspec

from cheapest.store import AccountRecord, Store
from cheapest.vocabulary import DAY
PROMISED_WITHIN = 30 * DAY  # the privacy policy: "Deleted within 30 days of account deletion"
PURGE_AFTER = PROMISED_WITHIN - DAY


def delete_account(store: Store, account_id: str, now: float) -> AccountRecord | None:
    """Mark the account deleted at `now` (idempotent: a second call keeps the first time). None if unknown."""

    def mark(account: AccountRecord) -> AccountRecord:
        if account.status == "deleted" and account.deleted_at is not None:
            return account
        return msgspec.structs.replace(account, status="deleted", deleted_at=int(now))

    return store.update_account(account_id, mark)


def purge_due(account: AccountRecord, now: float) -> bool:
    """A deleted account whose grace period is over. One marked deleted without a time (by an older version
    or by hand) is due at once: erasing early is the safe side of the promise."""
    if account.status != "deleted":
        return False
    return account.deleted_at is None or account.deleted_at <= now - PURGE_AFTER


def purge_deleted_accounts(store: Store, now: float) -> list[str]:
    """Purge every deleted account whose grace period is over; returns their ids."""
    purged: list[str] = []
    for account in store.list_accounts():
        if purge_due(account, now) and store.purge_account(account.id):
            purged.append(account.id)
    return purged
