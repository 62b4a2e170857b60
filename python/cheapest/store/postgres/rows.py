"""Rows <-> records: the column lists of accounts and keys, and how a row becomes an `AccountRecord` or a
`KeyRecord` (and back), shared by the store and the ledger."""

from __future__ import annotations

from typing import Any

import msgspec

from cheapest.store.records import AccountRecord, KeyLimits, KeyRecord

json_encoder = msgspec.json.Encoder()

ACCOUNT = "id, email, created_at, plan, status, subscription_status, period_end, deleted_at"
KEY = "id, account_id, kind, hash, hint, name, created_at, limits, disabled, expires_at, models"
INSERT_ACCOUNT = ("INSERT INTO accounts (id, email, email_key, created_at, plan, status, subscription_status, "
                  "period_end, deleted_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)")


def account_of(row: tuple[Any, ...]) -> AccountRecord:
    return AccountRecord(id=row[0], email=row[1], created_at=row[2], plan=row[3], status=row[4],
                         subscription_status=row[5], period_end=row[6], deleted_at=row[7])


def key_of(row: tuple[Any, ...]) -> KeyRecord:
    limits = row[7]
    return KeyRecord(id=row[0], account_id=row[1], kind=row[2], hash=bytes(row[3]), hint=row[4], name=row[5],
                     created_at=row[6], limits=msgspec.convert(limits, KeyLimits), disabled=row[8],
                     expires_at=row[9], models=None if row[10] is None else tuple(row[10]))


def account_values(a: AccountRecord) -> tuple[Any, ...]:
    return (a.id, a.email, a.email.lower(), a.created_at, a.plan, a.status, a.subscription_status, a.period_end,
            a.deleted_at)


def key_values(k: KeyRecord) -> tuple[Any, ...]:
    return (k.id, k.account_id, k.kind, k.hash, k.hint, k.name, k.created_at, json_encoder.encode(k.limits).decode(),
            k.disabled, k.expires_at, None if k.models is None else list(k.models))


