"""An account's keys, managed by the account itself (the Management API's rules, apart from HTTP).

Object-level authorization: every lookup is by (account, id); another account's key answers exactly like an id
that does not exist, so ids cannot be probed. Inference keys (sk_) are created, listed, changed and revoked;
management keys (mk_) are created (a second one, to rotate), listed and revoked, never the last one: an account
always keeps a way to manage itself. Every change reaches every worker on its next request through the store's
change epoch; this worker's key cache forgets the key at once, and a revoked key's rate-limit slots are freed.

Bounds: an account holds at most its plan's `max_keys` live keys (of both kinds) and `MAX_MANAGEMENT_KEYS`
management keys, and creates at most `KEY_CREATIONS_PER_DAY` keys a day (revoked keys stay in its history:
their usage is still billed), so no account can grow the store without limit. The methods that write to the
store block: the server runs them in a thread; creating a key is a coroutine (it asks the limiter first, then
writes in a thread).
"""

from __future__ import annotations

import asyncio

import msgspec
from msgspec import UNSET

from cheapest.api.management import (
    CreatedKey, CreateKeyRequest, CreateManagementKeyRequest, Deleted, KeyInfo, KeyLimitsBody, KeyList,
    PatchKeyRequest,
)
from cheapest.config import Settings
from cheapest.gateway.admission import Admissions
from cheapest.gateway.auth import KeyCache, limit_names
from cheapest.gateway.errors import Refusal
from cheapest.store import (
    AccountRecord, KeyLimits, KeyRecord, LastManagementKey, QuotaExceeded, Store, accounts,
)
from cheapest.vocabulary import DAY, KeyKind

PAGE_MAX = 100
MAX_MANAGEMENT_KEYS = 10
KEY_CREATIONS_PER_DAY = 1000


def account_limit_names(account_id: str) -> tuple[str, ...]:
    """Every rate-limit slot an account itself holds (not its keys'): freed when it is deleted."""
    return (*limit_names(account_id), _creations(account_id), topup_limit_name(account_id))


def topup_limit_name(account_id: str) -> str:
    return "topup:" + account_id


def _creations(account_id: str) -> str:
    return "newkey:" + account_id


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
    """Create, list, read, change and revoke an account's keys."""

    def __init__(self, settings: Settings, store: Store, keys: KeyCache, admissions: Admissions) -> None:
        self.settings = settings
        self.store = store
        self.keys = keys
        self.admissions = admissions

    async def create(self, account: AccountRecord, body: CreateKeyRequest) -> CreatedKey:
        limits = _limits(self.settings, account, body.limits)
        record, secret = await self._create(account, "sk", body.name, limits=limits, expires_at=body.expires_at,
                                            models=tuple(body.models) if body.models is not None else None)
        return CreatedKey(key=secret, id=record.id, name=record.name, hint=record.hint, kind="sk",
                          created_at=record.created_at, limits=_limits_body(record.limits),
                          expires_at=record.expires_at, models=body.models)

    async def create_management(self, account: AccountRecord, body: CreateManagementKeyRequest) -> CreatedKey:
        """A further management key (to rotate one: create, switch over, revoke the old)."""
        held = await asyncio.to_thread(self.store.list_keys, account.id, None, MAX_MANAGEMENT_KEYS, "mk")
        if len(held) >= MAX_MANAGEMENT_KEYS:
            raise Refusal("conflict", f"An account holds at most {MAX_MANAGEMENT_KEYS} management keys; revoke "
                          "one first.", code="management_key_limit")
        record, secret = await self._create(account, "mk", body.name)
        return CreatedKey(key=secret, id=record.id, name=record.name, hint=record.hint, kind="mk",
                          created_at=record.created_at, limits=_limits_body(record.limits))

    async def _create(self, account: AccountRecord, kind: KeyKind, name: str, limits: KeyLimits | None = None,
                      expires_at: int | None = None, models: tuple[str, ...] | None = None) -> tuple[KeyRecord, str]:
        await self.admissions.throttle(_creations(account.id), KEY_CREATIONS_PER_DAY, DAY, "new keys")
        cap = self.settings.plan(account.plan).max_keys
        try:
            return await asyncio.to_thread(accounts.create_key, self.store, account.id, kind, name, self.keys.pepper,
                                           limits=limits, expires_at=expires_at, models=models, max_keys=cap)
        except QuotaExceeded:
            raise Refusal("conflict", f"This account has {cap} live keys, its plan's limit; revoke keys it no "
                          "longer uses first.", code="key_limit_reached") from None

    def page(self, account: AccountRecord, limit: int, after: str | None, kind: KeyKind = "sk") -> KeyList:
        if not 1 <= limit <= PAGE_MAX:
            raise Refusal("invalid_request", f"`limit` must be between 1 and {PAGE_MAX}.", param="limit",
                          code="invalid_value")
        keys = self.store.list_keys(account.id, after=after, limit=limit + 1, kind=kind)
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

    def revoke(self, account: AccountRecord, key_id: str, kind: KeyKind = "sk") -> Deleted:
        """Revoke one of the account's keys of `kind`; a management key only while another one remains."""
        key = self._owned(account, key_id, kind)
        try:
            self.store.delete_key(key.id, keep_last_management=True)
        except LastManagementKey:
            raise Refusal("conflict", "This is the account's only management key: create another one (POST "
                          "/api/management-keys) before revoking it.", param="key_id",
                          code="last_management_key") from None
        self.keys.forget(key.hash)
        self.admissions.forget(limit_names(key.id))
        return Deleted(key.id)

    def history(self, account: AccountRecord, key_id: str | None = None) -> list[str]:
        """Ids of the account's keys, revoked ones included (their usage stays readable); one id, if owned."""
        ids = self.store.key_history(account.id)
        if key_id is None:
            return ids
        if key_id not in ids:
            raise _key_not_found()
        return [key_id]

    def _owned(self, account: AccountRecord, key_id: str, kind: KeyKind = "sk") -> KeyRecord:
        key = self.store.get_key(key_id)
        if key is None or key.account_id != account.id or key.kind != kind:
            raise _key_not_found()
        return key
