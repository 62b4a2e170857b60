"""Admission and settlement: may this caller run this generation now, and what did it cost.

A generation is admitted in two steps, cheapest first:
  `begin()`  before anything is read or parsed: subscription standing (403), then one request against the
             requests-per-minute limits (429). A request refused later for any reason (a bad body, a prompt too
             long) has still spent its request, so refusals cost their sender, not the worker.
  `admit()`  once the prompt is tokenized: budget windows (429 naming the budget and its reset), the credit
             balance of credit-funded plans (402), then tokens per minute (429).
Each limit is charged all or nothing over the account's limit (the plan's, shared by every key of the account)
and the key's own where it sets a lower one, through the configured `Limiter` (this host's shared table, or
Redis). `admit()` without a prior `begin()` charges the request and its tokens in one step. A table with no free
slot for a new limit answers 503 (`rate_limiter_full`, with Retry-After), never a 500.

TPM is charged at admission as prompt tokens + max_tokens (capped at the limit, so a large max_tokens is not
refused forever) and corrected at settlement once the real completion length is known. An admitted generation
is metered while it runs (see `store.metering.LiveUsage`); `settle()` records the rest exactly once, however the
generation ended.

Who owns the money: the store's ledger is the one owner of an account's spendable balance. Spend is the flushed
total plus this worker's unflushed part; other workers' unflushed usage (at most one flush interval) and requests
already running can take a budget or a balance slightly past zero: a request's cost is known only after it ran,
and it is always billed in full.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import datetime, timezone

from cheapest_core import RateLimiterError, RateLimiterFull

from cheapest.config import PriceConfig, Settings
from cheapest.gateway.auth import Caller, Limit
from cheapest.gateway.errors import Refusal
from cheapest.store import AccountRecord, Store
from cheapest.store.limiter import Decision, Limiter, LimitRequest
from cheapest.store.metering import LiveUsage, UsageMeter
from cheapest.store.payments import SubscriptionView
from cheapest.vocabulary import BUDGET_WINDOWS, window_start

log = logging.getLogger("cheapest.gateway")

PERIOD = 60.0  # rpm and tpm: per minute
_GOOD_STANDING = frozenset({"none", "active", "trialing", "past_due"})
_FULL_LOG_EVERY = 60.0  # seconds between "the table is full" warnings of one worker
FULL_RETRY_S = 10.0  # a full table frees a slot this long after a limit refills (the core's reclaim_after)


# The caller's place in its per-minute limits, requests then tokens (what `x-ratelimit-*` headers report): of
# each kind, the decision of the limit that binds (the refusing one, else the one with the least room).
RateState = tuple[Decision, Decision]


def binding(decisions: Sequence[Decision]) -> Decision:
    refused = [d for d in decisions if not d.allowed]
    if refused:
        return max(refused, key=lambda d: d.retry_after)
    return min(decisions, key=lambda d: (d.remaining, d.limit))


class Admission(LiveUsage):
    """One admitted request. For a generation, whoever runs it keeps `completion_tokens` current (the meter reads
    it at every flush) and calls `settle()` once it ends."""

    __slots__ = ("caller", "rate", "charged_tokens", "settled")

    def __init__(self, caller: Caller, rate: RateState, model: str | None = None, prompt_tokens: int = 0,
                 charged_tokens: int = 0, debit_to: str | None = None,
                 price: PriceConfig | None = None) -> None:
        super().__init__(caller.key.id, caller.account.id, model, prompt_tokens,
                         None if price is None else price.cost_micro, debit_to)
        self.caller = caller
        self.rate = rate
        self.charged_tokens = charged_tokens
        self.settled = model is None  # None: a read, nothing to settle


class Admissions:
    """One worker's admission policy over the rate limiter (this host's table or Redis: only the `Limiter`
    protocol is used), the store and the worker's usage meter."""

    def __init__(self, settings: Settings, store: Store, limiter: Limiter, meter: UsageMeter) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.meter = meter
        self._prices: dict[str, PriceConfig] = {}  # per model, looked up once
        self._full_logged = -math.inf

    async def peek(self, caller: Caller) -> RateState:
        limits = caller.limits
        return await self._peek(limits.requests), await self._peek(limits.tokens)

    async def _peek(self, limits: Sequence[Limit]) -> Decision:
        return binding([await self.limiter.peek(name, limit, PERIOD) for name, limit, _ in limits])

    async def begin(self, caller: Caller, now: float | None = None) -> Decision:
        """Before the request is read: standing, then one request against the requests-per-minute limits."""
        self._check_standing(caller, now)
        decisions = await self._acquire([(name, limit, PERIOD, 1) for name, limit, _ in caller.limits.requests])
        req = binding(decisions)
        if not req.allowed:
            tokens = await self._peek(caller.limits.tokens)
            raise self._rate_refusal(decisions, caller.limits.requests, "requests", (req, tokens))
        return req

    async def admit(self, caller: Caller, model: str | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                    now: float | None = None, begun: Decision | None = None) -> Admission:
        """Standing, budgets, credits and rate limits for a generation of `model` with `prompt_tokens` and up to
        `max_tokens`, all or nothing; a refusal names which one. `begun`: the request was charged by `begin()`
        (only its tokens are charged here). Without a model (a read such as listing models) only standing is
        checked and nothing is charged."""
        if begun is None:
            self._check_standing(caller, now)
        if model is None:
            return Admission(caller, await self.peek(caller))
        account, plan, limits = caller.account, caller.plan, caller.limits
        if caller.budgets:
            self._check_budgets(caller, time.time() if now is None else now)
        debit_to = self._check_credits(account) if plan.funded_by == "credits" else None
        if prompt_tokens > limits.tpm:
            raise Refusal("rate_limited", f"Request too large: {prompt_tokens} prompt tokens exceed the limit of "
                          f"{limits.tpm} tokens per minute.", type="tokens", code="rate_limit_exceeded",
                          rate=await self.peek(caller))
        charge = min(prompt_tokens + max_tokens, limits.tpm)
        wanted = [(name, limit, PERIOD, charge) for name, limit, _ in limits.tokens]
        if begun is None:
            wanted = [(name, limit, PERIOD, 1) for name, limit, _ in limits.requests] + wanted
        decisions = await self._acquire(wanted)
        n = len(decisions) - len(limits.tokens)
        rate = (begun if begun is not None else binding(decisions[:n]), binding(decisions[n:]))
        if not decisions[0].allowed:  # all or nothing: every decision reads refused; the longest wait binds
            if max((d.retry_after for d in decisions[:n]), default=0.0) > max(d.retry_after for d in decisions[n:]):
                raise self._rate_refusal(decisions[:n], limits.requests, "requests", rate)
            raise self._rate_refusal(decisions[n:], limits.tokens, "tokens", rate)
        admission = Admission(caller, rate, model, prompt_tokens, charge, debit_to, self.price(model))
        self.meter.begin(admission)
        return admission

    def settle(self, admission: Admission) -> None:
        """Meter an admitted generation once: correct the TPM charge to the tokens really used and record the
        usage and cost not yet recorded (debited from a credit-funded account's balance at the next flush)."""
        if admission.settled:
            return
        admission.settled = True
        used = admission.prompt_tokens + admission.completion_tokens
        if used != admission.charged_tokens:
            for name, limit, _ in admission.caller.limits.tokens:
                try:
                    self.limiter.adjust(name, limit, PERIOD, used - admission.charged_tokens)
                except RateLimiterError:  # a full table: the correction is lost, the usage is not
                    self._log_full()
        self.meter.end(admission)

    async def throttle(self, name: str, limit: int, period: float, what: str) -> None:
        """A per-account bound on an operation that is expensive for the service (a chain lookup, a new key):
        `limit` per `period` seconds under the limiter's `name`, refused with 429 when spent."""
        (decision,) = await self._acquire([(name, limit, period, 1)])
        if not decision.allowed:
            raise Refusal("rate_limited", f"Too many {what}: at most {limit} per {period / 60:g} minutes for an "
                          f"account. Retry in {decision.retry_after:.1f}s.", type="requests",
                          code="rate_limit_exceeded", retry_after=decision.retry_after)

    def forget(self, names: Sequence[str]) -> None:
        """Free the limiter's slots of a revoked key or a deleted account at once (not awaited)."""
        self.limiter.forget(list(names))

    def price(self, model: str) -> PriceConfig:
        price = self._prices.get(model)
        if price is None:
            price = self._prices[model] = self.settings.price(model)
        return price

    def cost_micro(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """The request's cost from the model's configured price."""
        return self.price(model).cost_micro(prompt_tokens, completion_tokens)

    def balance(self, account_id: str) -> int:
        """The spendable balance: the ledger's, less this worker's debits not flushed yet."""
        return self.store.ledger.balance(account_id) - self.meter.pending_debit(account_id)

    # --- the parts of the decision ------------------------------------------------------------------------
    async def _acquire(self, requests: list[LimitRequest]) -> Sequence[Decision]:
        try:
            return await self.limiter.acquire_all(requests)
        except RateLimiterFull:
            self._log_full()
            raise Refusal("unavailable", "The server's rate-limit table is full; retry shortly.",
                          code="rate_limiter_full", retry_after=FULL_RETRY_S) from None

    def _log_full(self) -> None:
        now = time.monotonic()
        if now - self._full_logged >= _FULL_LOG_EVERY:
            self._full_logged = now
            log.warning("the rate-limit table is full of live limits: requests of new keys get 503; raise "
                        "ratelimit_capacity")

    @staticmethod
    def _rate_refusal(decisions: Sequence[Decision], limits: Sequence[Limit], kind: str,
                      rate: RateState) -> Refusal:
        """Every decision of a refused all-or-nothing group reads "not allowed"; the limit with the longest wait
        is the one that has no room."""
        d, (_, value, whose) = max(zip(decisions, limits), key=lambda pair: pair[0].retry_after)
        return Refusal("rate_limited", f"Rate limit reached: {whose} limit of {value} {kind} per minute. Retry in "
                       f"{d.retry_after:.1f}s.", type=kind, code="rate_limit_exceeded", retry_after=d.retry_after,
                       rate=rate)

    def _check_standing(self, caller: Caller, now: float | None) -> None:
        """Inference keys of a subscription plan work only while the subscription is in good standing: `expired`
        (a period long over), `canceled` and the unpaid states are refused until renewed. (An operator-assigned
        plan has subscription status "none" and is not checked.) Management keys keep working, so the account
        can see its status and renew."""
        account = caller.account
        if account.subscription_status == "none" or caller.plan.funded_by != "subscription":
            return
        status = subscription_status(account, time.time() if now is None else now)
        if status not in _GOOD_STANDING:
            raise Refusal("forbidden", f"The subscription for plan {account.plan} is {status}; renew it (POST "
                          f"/api/billing/checkout) to use this key again.", code="subscription_inactive")

    def _check_budgets(self, caller: Caller, now: float) -> None:
        for cap, window, whose, owner in caller.budgets:
            start = window_start(window, now)
            spent = self.store.window_spend(owner, window, start) + self.meter.pending_cost(owner)
            if spent >= cap:
                reset = start + BUDGET_WINDOWS[window]
                wait = max(1, math.ceil(reset - now))
                at = datetime.fromtimestamp(reset, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
                raise Refusal("rate_limited", f"Budget exceeded: {whose} budget of ${cap / 1e6:g} per {window} window "
                              f"is spent (${spent / 1e6:g}); it resets at {at} (in {wait} s).",
                              type="insufficient_quota", code="budget_exceeded", retry_after=wait, reset_at=reset)

    def _check_credits(self, account: AccountRecord) -> str:
        """A credit-funded account: the one to debit, refused when its balance is used up."""
        if self.balance(account.id) <= 0:
            raise Refusal("payment_required", "You exceeded your current quota: the account's credit balance is "
                          "used up. Top it up (POST /api/billing/topup) and retry.", code="insufficient_quota")
        return account.id


def subscription_status(account: AccountRecord, now: float) -> str:
    """The account's subscription status as it stands at `now` (a long-past period reads `expired`)."""
    if account.subscription_status == "none":
        return "none"
    return SubscriptionView(plan=account.plan, status=account.subscription_status,
                            current_period_end=account.period_end, subscription_id=None, customer_id=None,
                            updated_at=0).effective_status(now)
