"""Inference keys managed by their account (the Management API's rules, apart from HTTP).

Object-level authorization: every lookup is by (account, id); another account's key answers exactly like an id
that does not exist, so ids cannot be probed. Management keys (mk_) are the operator's business (`cheapest
accounts`), so these operations list and change inference keys (sk_) only. Every change reaches every worker on
its next request through the store's change epoch; this worker's key cache forgets the key at once.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET

from cheapest.api.management import (
    CreatedKey, CreateKeyRequest, Deleted, KeyInfo, KeyLimitsBody, KeyList, PatchKeyRequest,
)
from cheapest.config import Settings
from cheapest.gateway.auth import KeyCache
from cheapest.gateway.errors import Refusal
from cheapest.store import AccountRecord, KeyLimits, KeyRecord, Store, accounts

PAGE_MAX = 100


def _key_not_found() -> Refusal:
    return Refusal("not_found", "No such key.", param="key_id", code="key_not_found")


def _limits(settings: Settings, account: AccountRecord, body: KeyLimitsBody | None) -> KeyLimits:
    if body is None:
        return KeyLimits()
    if body.budget_usd is not None and body.budget_window is None \
            and settings.plan(account.plan).budget_window is None:
        raise Refusal("invalid_request", "`limits.budget_window` (5h, 8h, 1d or 30d) is required with "
                      "`limits.budget_usd`.", param="limits.budget_window", code="invalid_value")
    if body.budget_window is not None and body.budget_usd is None:
        raise Refusal("invalid_request", "`limits.budget_usd` is required with `limits.budget_window`.",
                      param="limits.budget_usd", code="invalid_value")
    return msgspec.convert(msgspec.to_builtins(body), KeyLimits)


def _limits_body(limits: KeyLimits) -> KeyLimitsBody:
    return msgspec.convert(msgspec.to_builtins(limits), KeyLimitsBody)


def key_info(key: KeyRecord) -> KeyInfo:
    return KeyInfo(id=key.id, name=key.name, hint=key.hint, kind=key.kind, created_at=key.created_at,
                   disabled=key.disabled, limits=_limits_body(key.limits), expires_at=key.expires_at,
                   models=list(key.models) if key.models is not None else None)


class _NotOwned(Exception):
    pass


class KeyManager:
    """Create, list, read, change and revoke an account's inference keys."""

    def __init__(self, settings: Settings, store: Store, keys: KeyCache) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys

    def create(self, account: AccountRecord, body: CreateKeyRequest) -> CreatedKey:
        limits = _limits(self.settings, account, body.limits)
        record, secret = accounts.create_key(
            self.store, account.id, "sk", body.name, self.keys.pepper, limits=limits, expires_at=body.expires_at,
            models=tuple(body.models) if body.models is not None else None)
        return CreatedKey(key=secret, id=record.id, name=record.name, hint=record.hint, kind="sk",
                          created_at=record.created_at, limits=_limits_body(record.limits),
                          expires_at=record.expires_at, models=body.models)

    def page(self, account: AccountRecord, limit: int, after: str | None) -> KeyList:
        if not 1 <= limit <= PAGE_MAX:
            raise Refusal("invalid_request", f"`limit` must be between 1 and {PAGE_MAX}.", param="limit",
                          code="invalid_value")
        keys = self.store.list_keys(account.id, after=after, limit=limit + 1, kind="sk")
        page = keys[:limit]
        return KeyList([key_info(k) for k in page], has_more=len(keys) > limit,
                       last_id=page[-1].id if page else None)

    def get(self, account: AccountRecord, key_id: str) -> KeyInfo:
        return key_info(self._owned(account, key_id))

    def patch(self, account: AccountRecord, key_id: str, body: PatchKeyRequest) -> KeyInfo:
        changes: dict[str, object] = {}
        if body.name is not UNSET:
            changes["name"] = body.name
        if body.disabled is not UNSET:
            changes["disabled"] = body.disabled
        if body.limits is not UNSET:
            changes["limits"] = _limits(self.settings, account, body.limits)
        if body.expires_at is not UNSET:
            changes["expires_at"] = body.expires_at
        if body.models is not UNSET:
            changes["models"] = tuple(body.models) if body.models is not None else None

        def change(key: KeyRecord) -> KeyRecord:
            if key.kind != "sk":
                raise _NotOwned
            return msgspec.structs.replace(key, **changes)

        try:
            # One step: concurrent PATCHes of different fields on different workers both land.
            key = self.store.update_key(key_id, account.id, change)
        except _NotOwned:
            key = None
        if key is None:
            raise _key_not_found()
        self.keys.forget(key.hash)
        return key_info(key)

    def revoke(self, account: AccountRecord, key_id: str) -> Deleted:
        key = self._owned(account, key_id)
        self.store.delete_key(key.id)
        self.keys.forget(key.hash)
        return Deleted(key.id)

    def history(self, account: AccountRecord, key_id: str | None = None) -> list[str]:
        """Ids of the account's keys, revoked ones included (their usage stays readable); one id, if owned."""
        ids = self.store.key_history(account.id)
        if key_id is None:
            return ids
        if key_id not in ids:
            raise _key_not_found()
        return [key_id]

    def _owned(self, account: AccountRecord, key_id: str) -> KeyRecord:
        key = self.store.get_key(key_id)
        if key is None or key.account_id != account.id or key.kind != "sk":
            raise _key_not_found()
        return key
