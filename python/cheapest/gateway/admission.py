"""Admission and settlement: may this caller run this generation now, and what did it cost.

`admit()` is the one decision, in this order: subscription standing (403), budget windows (429 naming the budget
and its reset), credit balance of credit-funded plans (402), then requests and tokens per minute through the
configured `Limiter` (429 with the limiter's state). It returns an `Admission`; `settle()` meters it exactly
once, however the generation ended.

TPM is charged at admission as prompt tokens + max_tokens (capped at the limit, so a large max_tokens is not
refused forever) and corrected at settlement once the real completion length is known.

Who owns the money: the store's ledger is the one owner of an account's spendable balance. Spend is the flushed
total plus this worker's unflushed part; other workers' unflushed usage (at most one flush interval) and requests
already running can take a budget or a balance slightly past zero: a request's cost is known only after it ran,
and it is always billed in full.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

from cheapest.config import PriceConfig, Settings
from cheapest.gateway.auth import Caller
from cheapest.gateway.errors import Refusal
from cheapest.store import AccountRecord, Store
from cheapest.store.limiter import Decision, Limiter
from cheapest.store.metering import UsageMeter
from cheapest.store.payments import SubscriptionView
from cheapest.vocabulary import BUDGET_WINDOWS, window_start

PERIOD = 60.0  # rpm and tpm: per minute
_GOOD_STANDING = frozenset({"none", "active", "trialing", "past_due"})


# The caller's place in its per-minute limits, requests then tokens (what `x-ratelimit-*` headers report).
RateState = tuple[Decision, Decision]


class Admission:
    """One admitted request. For a generation, whoever runs it sets `completion_tokens` before `settle()`."""

    __slots__ = ("caller", "rate", "model", "prompt_tokens", "charged_tokens", "debit_to", "completion_tokens",
                 "settled")

    def __init__(self, caller: Caller, rate: RateState, model: str | None = None, prompt_tokens: int = 0,
                 charged_tokens: int = 0, debit_to: str | None = None) -> None:
        self.caller = caller
        self.rate = rate
        self.model = model  # None: a read, nothing to settle
        self.prompt_tokens = prompt_tokens
        self.charged_tokens = charged_tokens
        self.debit_to = debit_to  # a credit-funded account pays this request's cost
        self.completion_tokens = 0
        self.settled = model is None


class Admissions:
    """One worker's admission policy over the rate limiter (this host's table or Redis: only the `Limiter`
    protocol is used), the store and the worker's usage meter."""

    def __init__(self, settings: Settings, store: Store, limiter: Limiter, meter: UsageMeter) -> None:
        self.settings = settings
        self.store = store
        self.limiter = limiter
        self.meter = meter
        self._prices: dict[str, PriceConfig] = {}  # per model, looked up once

    async def peek(self, caller: Caller) -> RateState:
        limits = caller.limits
        return (await self.limiter.peek(limits.rpm_name, limits.rpm, PERIOD),
                await self.limiter.peek(limits.tpm_name, limits.tpm, PERIOD))

    async def admit(self, caller: Caller, model: str | None = None, prompt_tokens: int = 0, max_tokens: int = 0,
                    now: float | None = None) -> Admission:
        """Standing, budgets, credits and rate limits for a generation of `model` with `prompt_tokens` and up to
        `max_tokens`, all or nothing; a refusal names which one. Without a model (a read such as listing models)
        only standing is checked and nothing is charged."""
        account, plan = caller.account, caller.plan
        if account.subscription_status != "none" and plan.funded_by == "subscription":
            self._check_standing(account, time.time() if now is None else now)
        if model is None:
            return Admission(caller, await self.peek(caller))
        if caller.budgets:
            self._check_budgets(caller, time.time() if now is None else now)
        debit_to = self._check_credits(account) if plan.funded_by == "credits" else None
        limits = caller.limits
        if prompt_tokens > limits.tpm:
            raise Refusal("rate_limited", f"Request too large: {prompt_tokens} prompt tokens exceed this "
                          f"key's limit of {limits.tpm} tokens per minute.", type="tokens",
                          code="rate_limit_exceeded", rate=await self.peek(caller))
        charge = min(prompt_tokens + max_tokens, limits.tpm)
        req, tok = await self.limiter.acquire_all([(limits.rpm_name, limits.rpm, PERIOD, 1),
                                                   (limits.tpm_name, limits.tpm, PERIOD, charge)])
        rate = (req, tok)
        if not (req.allowed and tok.allowed):
            retry = max(req.retry_after, tok.retry_after)
            if not req.allowed:
                msg, typ = f"Rate limit reached: {limits.rpm} requests per minute. Retry in {retry:.1f}s.", "requests"
            else:
                msg, typ = f"Rate limit reached: {limits.tpm} tokens per minute. Retry in {retry:.1f}s.", "tokens"
            raise Refusal("rate_limited", msg, type=typ, code="rate_limit_exceeded", retry_after=retry, rate=rate)
        return Admission(caller, rate, model, prompt_tokens, charge, debit_to)

    def settle(self, admission: Admission) -> None:
        """Meter an admitted generation once: correct the TPM charge to the tokens really used and record usage
        and cost (debited from the balance of a credit-funded account at the next flush)."""
        if admission.settled:
            return
        admission.settled = True
        model = admission.model
        assert model is not None
        p, c = admission.prompt_tokens, admission.completion_tokens
        limits = admission.caller.limits
        if p + c != admission.charged_tokens:
            self.limiter.adjust(limits.tpm_name, limits.tpm, PERIOD, p + c - admission.charged_tokens)
        self.meter.record(admission.caller.key.id, model, p, c, self.cost_micro(model, p, c),
                          debit_account=admission.debit_to)

    def cost_micro(self, model: str, prompt_tokens: int, completion_tokens: int) -> int:
        """The request's cost from the model's configured price."""
        price = self._prices.get(model)
        if price is None:
            price = self._prices[model] = self.settings.price(model)
        return price.cost_micro(prompt_tokens, completion_tokens)

    def balance(self, account_id: str) -> int:
        """The spendable balance: the ledger's, less this worker's debits not flushed yet."""
        return self.store.ledger.balance(account_id) - self.meter.pending_debit(account_id)

    # --- the parts of the decision ------------------------------------------------------------------------
    @staticmethod
    def _check_standing(account: AccountRecord, now: float) -> None:
        """Inference keys of a subscription plan work only while the subscription is in good standing: `expired`
        (a period long over), `canceled` and the unpaid states are refused until renewed. (An operator-assigned
        plan has subscription status "none" and is not checked.) Management keys keep working, so the account
        can see its status and renew."""
        status = subscription_status(account, now)
        if status not in _GOOD_STANDING:
            raise Refusal("forbidden", f"The subscription for plan {account.plan} is {status}; renew it (POST "
                          f"/api/billing/checkout) to use this key again.", code="subscription_inactive")

    def _check_budgets(self, caller: Caller, now: float) -> None:
        key = caller.key
        for cap, window, whose in caller.budgets:
            start = window_start(window, now)
            spent = self.store.window_spend(key.id, window, start) + self.meter.pending_cost(key.id)
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
