"""Bearer-key authentication: the core's checksum first (typos fail without a lookup), then the stored hash."""

from __future__ import annotations

import time

import cheapest_core

from cheapest.http.errors import ApiError
from cheapest.store import AccountRecord, KeyRecord, Store

_KIND_NAMES = {"sk": "an inference key (sk_...)", "mk": "a management key (mk_...)"}


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
    key = store.find_key_by_hash(cheapest_core.hash_key(secret, pepper))
    if key is None:
        raise _unauthorized("Incorrect API key provided.")
    account = store.get_account(key.account_id)
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
