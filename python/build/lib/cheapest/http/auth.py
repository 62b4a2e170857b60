"""Bearer-key authentication: the core's checksum first (typos fail without a lookup), then the stored hash."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import cheapest_core

from cheapest.billing.ledger import SubscriptionView
from cheapest.config import Settings
from cheapest.http.errors import ApiError
from cheapest.store import AccountRecord, KeyRecord, Store

if TYPE_CHECKING:
    from cheapest.http.request import Request
    from cheapest.http.state import WorkerState

# Why a cache: two LMDB read transactions and two msgpack decodes per request are a fifth of the gateway's
# per-request cost. Why an epoch rather than a short TTL: the store bumps a change counter in the same write
# transaction as any key or account change (revoke, disable, new limits, a subscription that lapsed), and each
# request reads it (one small LMDB read) before trusting the cache; on a change the whole cache is dropped. So
# every worker sees a change on its next request, not "within the TTL", and unchanged keys stay cached for
# long. CACHE_TTL is only a backstop against a writer that forgot the epoch. Expiry (`expires_at`) is checked
# per request.
CACHE_TTL = 30.0
CACHE_MAX = 10_000
_cache: dict[bytes, tuple[float, KeyRecord | None, AccountRecord | None]] = {}
_cache_epoch = -1

_KIND_NAMES = {"sk": "an inference key (sk_...)", "mk": "a management key (mk_...)"}


def forget(key_hash: bytes) -> None:
    """Drop a changed key from this worker's cache (the epoch does this too; kept for callers' clarity)."""
    _cache.pop(key_hash, None)


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def authenticate(store: Store, pepper: bytes, authorization: str | None, kind: str) -> tuple[KeyRecord, AccountRecord]:
    """Resolve `Authorization: Bearer <key>` to a usable key of `kind` and its account, or raise ApiError."""
    if not authorization:
        raise _unauthorized("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise _unauthorized("Malformed Authorization header; expected `Bearer <key>`.")
    if not cheapest_core.check_key(secret):
        raise _unauthorized("Incorrect API key provided.")
    key_hash = cheapest_core.hash_key(secret, pepper)
    global _cache_epoch
    epoch = store.epoch()
    if epoch != _cache_epoch:
        _cache.clear()
        _cache_epoch = epoch
    now = time.monotonic()
    hit = _cache.get(key_hash)
    if hit is not None and hit[0] > now:
        key, account = hit[1], hit[2]
    else:
        key = store.find_key_by_hash(key_hash)
        account = None if key is None else store.get_account(key.account_id)
        if len(_cache) >= CACHE_MAX:
            _cache.clear()
        _cache[key_hash] = (now + CACHE_TTL, key, account)
    if key is None:
        raise _unauthorized("Incorrect API key provided.")
    if account is None or account.status == "deleted":
        raise _unauthorized("Incorrect API key provided.")
    if account.status != "active":
        raise ApiError(403, "This account is disabled; contact the operator.", type="permission_error",
                       code="account_disabled")
    if key.kind != kind:
        raise ApiError(403, f"This route needs {_KIND_NAMES[kind]}; you sent {_KIND_NAMES[key.kind]}.",
                       type="permission_error", code="wrong_key_kind")
    if key.disabled:
        raise ApiError(403, "This API key is disabled.", type="permission_error", code="key_disabled")
    if key.expires_at is not None and time.time() >= key.expires_at:
        raise ApiError(403, "This API key has expired.", type="permission_error", code="key_expired")
    return key, account


_GOOD_STANDING = frozenset({"none", "active", "trialing", "past_due"})


def check_standing(settings: Settings, account: AccountRecord, now: float | None = None) -> None:
    """Inference keys of a subscription plan work only while the subscription is in good standing: `expired`
    (a period long over), `canceled` and the unpaid states get 403 until renewed. "none" is a plan the operator
    assigned without Stripe. Management keys keep working, so the account can see its status and renew."""
    if account.subscription_status == "none" or settings.plan(account.plan).funded_by != "subscription":
        return
    status = SubscriptionView(plan=account.plan, status=account.subscription_status,
                              current_period_end=account.period_end, subscription_id=None, customer_id=None,
                              updated_at=0).effective_status(time.time() if now is None else now)
    if status not in _GOOD_STANDING:
        raise ApiError(403, f"The subscription for plan {account.plan} is {status}; renew it (POST "
                       f"/api/billing/checkout) to use this key again.", type="permission_error",
                       code="subscription_inactive")


def management_account(state: WorkerState, req: Request) -> AccountRecord:
    """The account behind the request's `mk_` key (every /api route that acts for an account starts here)."""
    key, account = authenticate(state.store, state.pepper, req.headers.get("authorization"), "mk")
    req.key_id = key.id
    return account
