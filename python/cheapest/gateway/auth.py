"""Authentication: a bearer key -> the `Caller` (its key, account and effective rate limits), or a refusal.

The core checks the key's checksum first (typos fail without a lookup), then hashes it with the server pepper and
the store finds the key record by hash.

Why a cache: two store reads and two msgpack decodes per request are a fifth of the gateway's per-request cost.
Why an epoch rather than a short TTL: the store bumps a change counter in the same step as any key or account
change (revoke, disable, new limits, a subscription that lapsed), and each request reads it (one small read)
before trusting the cache; on a change the whole cache is dropped. So every worker sees a change on its next
request, not "within the TTL", and unchanged keys stay cached for long. CACHE_TTL is only a backstop against a
writer that forgot the epoch. Expiry (`expires_at`) is checked per request.
"""

from __future__ import annotations

import time

import cheapest_core

from cheapest.config import PlanConfig, Settings
from cheapest.gateway.errors import Refusal
from cheapest.store import AccountRecord, KeyRecord, Store
from cheapest.vocabulary import KEY_KIND_NAMES, MICRO_PER_USD, KeyKind

CACHE_TTL = 30.0
CACHE_MAX = 10_000


def limit_names(owner_id: str) -> tuple[str, str]:
    """The limiter's table keys of a key's or an account's requests and tokens per minute."""
    return "rpm:" + owner_id, "tpm:" + owner_id


# A limit in the limiter's table: its name there, units per minute, and whose it is ("this key's", "the free
# plan's") for the refusal's message.
Limit = tuple[str, int, str]


class Limits:
    """The per-minute limits a caller's requests are charged against, all at once: its account's (the plan's,
    across every key of the account) and, inside them, the key's own where it sets a lower one. `rpm` and `tpm`
    are the effective (lowest) values. Built once per cached key rather than per request."""

    __slots__ = ("rpm", "tpm", "requests", "tokens")

    def __init__(self, requests: tuple[Limit, ...], tokens: tuple[Limit, ...]) -> None:
        self.requests = requests
        self.tokens = tokens
        self.rpm = min(limit for _, limit, _ in requests)
        self.tpm = min(limit for _, limit, _ in tokens)


def limits_for(plan: PlanConfig, account: AccountRecord, key: KeyRecord) -> Limits:
    plan_rpm, plan_tpm = limit_names(account.id)
    key_rpm, key_tpm = limit_names(key.id)
    whose = f"the {account.plan} plan's"
    requests: list[Limit] = [(plan_rpm, plan.rpm, whose)]
    tokens: list[Limit] = [(plan_tpm, plan.tpm, whose)]
    own = key.limits
    # A key's own limit at or above its plan's can never bind (the key's use is part of the account's): no slot.
    if own.rpm is not None and own.rpm < plan.rpm:
        requests.append((key_rpm, own.rpm, "this key's"))
    if own.tpm is not None and own.tpm < plan.tpm:
        tokens.append((key_tpm, own.tpm, "this key's"))
    return Limits(tuple(requests), tuple(tokens))


# cap in micro-dollars, window, whose ("this key's", "the pro plan's"), and whose spend counts: the key's id, or
# the account's (a plan's budget binds the account, across its keys)
Budget = tuple[int, str, str, str]


def budgets_for(plan: PlanConfig, account: AccountRecord, key: KeyRecord) -> tuple[Budget, ...]:
    """The key's own budget and its plan's (over the whole account); both apply."""
    out: list[Budget] = []
    if key.limits.budget_usd is not None:
        window = key.limits.budget_window or plan.budget_window
        if window is not None:
            out.append((round(key.limits.budget_usd * MICRO_PER_USD), window, "this key's", key.id))
    if plan.budget_usd is not None and plan.budget_window is not None:
        out.append((round(plan.budget_usd * MICRO_PER_USD), plan.budget_window, f"the {account.plan} plan's",
                    account.id))
    return tuple(out)


class Caller:
    """Who is calling: an authenticated key of an active account, with what its plan and own limits allow
    (worked out once per cached key, not per request)."""

    __slots__ = ("key", "account", "plan", "limits", "budgets")

    def __init__(self, key: KeyRecord, account: AccountRecord, plan: PlanConfig) -> None:
        self.key = key
        self.account = account
        self.plan = plan
        self.limits = limits_for(plan, account, key)
        self.budgets = budgets_for(plan, account, key)


def _unknown(message: str = "Incorrect API key provided.") -> Refusal:
    return Refusal("unauthenticated", message, code="invalid_api_key")


class KeyCache:
    """One worker's authenticator: resolves keys through the store, caching them until the store's epoch moves."""

    def __init__(self, settings: Settings, store: Store, pepper: bytes) -> None:
        self.settings = settings
        self.store = store
        self.pepper = pepper
        # key hash -> (expires at, the caller, or None for a key that does not resolve to an active account)
        self._entries: dict[bytes, tuple[float, KeyRecord | None, Caller | None]] = {}
        self._epoch = -1

    def forget(self, key_hash: bytes) -> None:
        """Drop a changed key at once on this worker (the epoch does it too, on every worker)."""
        self._entries.pop(key_hash, None)

    def authenticate(self, authorization: str | None, kind: KeyKind) -> Caller:
        """`Authorization: Bearer <key>` -> a usable key of `kind` and its account, or a refusal."""
        if not authorization:
            raise _unknown("You didn't provide an API key. Send it as `Authorization: Bearer <key>`.")
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise _unknown("Malformed Authorization header; expected `Bearer <key>`.")
        if not cheapest_core.check_key(secret):
            raise _unknown()
        key_hash = cheapest_core.hash_key(secret, self.pepper)
        epoch = self.store.epoch()
        if epoch != self._epoch:
            self._entries.clear()
            self._epoch = epoch
        now = time.monotonic()
        hit = self._entries.get(key_hash)
        if hit is not None and hit[0] > now:
            key, caller = hit[1], hit[2]
        else:
            key, caller = self._lookup(key_hash)
            if len(self._entries) >= CACHE_MAX:
                self._entries.clear()
            self._entries[key_hash] = (now + CACHE_TTL, key, caller)
        if caller is None:
            if key is not None:  # an account that is known but not active
                raise Refusal("forbidden", "This account is disabled; contact the operator.", code="account_disabled")
            raise _unknown()
        key = caller.key
        if key.kind != kind:
            raise Refusal("forbidden", f"This route needs {KEY_KIND_NAMES[kind]}; you sent {KEY_KIND_NAMES[key.kind]}.",
                          code="wrong_key_kind")
        if key.disabled:
            raise Refusal("forbidden", "This API key is disabled.", code="key_disabled")
        if key.expires_at is not None and time.time() >= key.expires_at:
            raise Refusal("forbidden", "This API key has expired.", code="key_expired")
        return caller

    def _lookup(self, key_hash: bytes) -> tuple[KeyRecord | None, Caller | None]:
        """(key, caller): (None, None) unknown or of a deleted account; (key, None) a disabled account."""
        key = self.store.find_key_by_hash(key_hash)
        account = None if key is None else self.store.get_account(key.account_id)
        if key is None or account is None or account.status == "deleted":
            return None, None
        if account.status != "active":
            return key, None
        return key, Caller(key, account, self.settings.plan(account.plan))
