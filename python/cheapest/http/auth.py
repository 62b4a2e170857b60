"""Bearer-key authentication: the core's checksum first (typos fail without a lookup), then the stored hash."""

from __future__ import annotations

import time

import cheapest_core

from cheapest.http.errors import ApiError
from cheapest.store import AccountRecord, KeyRecord, Store

# Why a cache: two LMDB read transactions and two msgpack decodes per request are a fifth of the gateway's
# per-request cost. Entries live CACHE_TTL seconds, so a revoked, disabled or re-limited key is seen by every
# worker within that time (the accounts issue asks for 1 s); expiry (`expires_at`) is still checked per request.
CACHE_TTL = 0.5
CACHE_MAX = 10_000
_cache: dict[bytes, tuple[float, KeyRecord | None, AccountRecord | None]] = {}

_KIND_NAMES = {"sk": "an inference key (sk_...)", "mk": "a management key (mk_...)"}


def forget(key_hash: bytes) -> None:
    """Drop a changed key from this worker's cache at once (other workers see it within CACHE_TTL)."""
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
    if account is None or account.status != "active":
        raise _unauthorized("Incorrect API key provided.")
    if key.kind != kind:
        raise ApiError(403, f"This route needs {_KIND_NAMES[kind]}; you sent {_KIND_NAMES[key.kind]}.",
                       type="permission_error", code="wrong_key_kind")
    if key.disabled:
        raise ApiError(403, "This API key is disabled.", type="permission_error", code="key_disabled")
    if key.expires_at is not None and time.time() >= key.expires_at:
        raise ApiError(403, "This API key has expired.", type="permission_error", code="key_expired")
    return key, account
