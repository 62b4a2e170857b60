"""`Gateway`: one worker's policy object - who is calling, whether a request may run, what it cost - and the
caches and clients those decisions use (key cache, prices, Stripe and web3 clients). It knows nothing of HTTP.
"""

from __future__ import annotations

from cheapest.api.privacy import AccountDeleted
from cheapest.config import Settings
from cheapest.gateway.admission import Admission, Admissions, RateState
from cheapest.gateway.auth import Caller, KeyCache, limit_names
from cheapest.gateway.errors import Refusal
from cheapest.gateway.keys import KeyManager, account_limit_names
from cheapest.gateway.payments import Payments
from cheapest.privacy.deletion import PROMISED_WITHIN, delete_account
from cheapest.store import AccountRecord, Store
from cheapest.store.limiter import Decision, Limiter
from cheapest.store.metering import UsageMeter
from cheapest.vocabulary import KeyKind


class Gateway:
    def __init__(self, settings: Settings, store: Store, pepper: bytes, limiter: Limiter,
                 meter: UsageMeter) -> None:
        self.settings = settings
        self.store = store
        self.auth = KeyCache(settings, store, pepper)
        self.admissions = Admissions(settings, store, limiter, meter)
        self.keys = KeyManager(settings, store, self.auth, self.admissions)
        self.payments = Payments(settings, store, self.admissions)

    def authenticate(self, authorization: str | None, kind: KeyKind) -> Caller:
        """The caller behind `Authorization: Bearer <key>` if it is a usable key of `kind`; else a refusal
        ("unauthenticated", or "forbidden" naming why)."""
        return self.auth.authenticate(authorization, kind)

    async def begin(self, caller: Caller) -> Decision:
        """Before a generation's request is read: standing and one request against the per-minute request limits,
        so that every request, however it ends, counts and a refused one costs nothing more."""
        return await self.admissions.begin(caller)

    async def admit(self, caller: Caller, model: str | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                    now: float | None = None, begun: Decision | None = None) -> Admission:
        """One decision for a generation of `model`: subscription standing, budgets, credits, rate limits
        (refused as "forbidden", "rate_limited", "payment_required"; "unavailable" when the limiter's table is
        full). `begun`: what `begin()` returned, if it ran. Without a model (a read), standing only, and the
        caller's rate state to report."""
        return await self.admissions.admit(caller, model, prompt_tokens, max_tokens, now, begun)

    def settle(self, admission: Admission) -> None:
        """Meter an admitted generation exactly once (tokens, cost, TPM correction)."""
        self.admissions.settle(admission)

    async def rate_state(self, caller: Caller) -> RateState:
        return await self.admissions.peek(caller)

    def delete_account(self, account: AccountRecord, now: float) -> AccountDeleted:
        """Mark the account deleted: its keys stop everywhere at once (the store's change epoch), their and the
        account's rate-limit slots are freed, and it is purged before 30 days pass. Blocks: run it in a thread."""
        deleted = delete_account(self.store, account.id, now)
        if deleted is None or deleted.deleted_at is None:
            raise Refusal("not_found", "No such account.", code="account_not_found")
        self.admissions.forget(account_limit_names(account.id))
        after = None
        while page := self.store.list_keys(account.id, after=after, limit=1000):
            for key in page:  # this worker's cache at once; the others through the epoch
                self.auth.forget(key.hash)
                self.admissions.forget(limit_names(key.id))
            after = page[-1].id
        return AccountDeleted(deleted.id, deleted.deleted_at, deleted.deleted_at + PROMISED_WITHIN)
