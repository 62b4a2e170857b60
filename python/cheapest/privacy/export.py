"""The GDPR data export: everything kept about one account, as one document.

What exists is metadata only - account, keys (never their hashes), subscription, payments, usage counters -
because request and response text is never kept anywhere.
"""

from __future__ import annotations

import msgspec

from cheapest.api.privacy import (
    AccountExport, ExportedAccount, ExportedKey, ExportedPayment, ExportedSubscription, ExportedUsage,
)
from cheapest.store import AccountRecord, KeyRecord, Store
from cheapest.store.payments import SubscriptionView

_PAGE = 100


def _key(key: KeyRecord) -> ExportedKey:
    return ExportedKey(id=key.id, kind=key.kind, name=key.name, hint=key.hint, created_at=key.created_at,
                       disabled=key.disabled, expires_at=key.expires_at,
                       models=list(key.models) if key.models is not None else None,
                       limits=msgspec.to_builtins(key.limits))


def _subscription(sub: SubscriptionView) -> ExportedSubscription:
    return ExportedSubscription(plan=sub.plan, status=sub.status, current_period_end=sub.current_period_end,
                                subscription_id=sub.subscription_id, customer_id=sub.customer_id,
                                updated_at=sub.updated_at)


def _all_keys(store: Store, account_id: str) -> list[KeyRecord]:
    keys: list[KeyRecord] = []
    after: str | None = None
    while True:
        page = store.list_keys(account_id, after=after, limit=_PAGE)
        keys.extend(page)
        if len(page) < _PAGE:
            return keys
        after = page[-1].id


def export_account(store: Store, account: AccountRecord, now: float) -> AccountExport:
    keys = _all_keys(store, account.id)
    live = {k.id for k in keys}
    history = store.key_history(account.id)
    ledger = store.ledger
    sub = ledger.subscription(account.id)
    usage = [
        ExportedUsage(r.key_id, r.model, r.hour, r.counter.requests, r.counter.prompt_tokens,
                      r.counter.completion_tokens, r.counter.cost_micro)
        for r in store.usage(sorted(set(history) | live))
    ]
    return AccountExport(
        exported_at=int(now),
        account=ExportedAccount(id=account.id, email=account.email, created_at=account.created_at,
                                status=account.status, plan=account.plan,
                                subscription_status=account.subscription_status, period_end=account.period_end,
                                deleted_at=account.deleted_at),
        keys=[_key(k) for k in keys],
        revoked_key_ids=sorted(set(history) - live),
        subscription=None if sub is None else _subscription(sub),
        subscriptions=[_subscription(s) for s in ledger.subscriptions(account.id)],
        credit_balance_micro=ledger.balance(account.id),
        payments=[ExportedPayment(e.ref, e.kind, e.at, e.micro_usd, e.amount_minor, e.currency)
                  for e in ledger.journal(account.id)],
        usage=usage,
    )
