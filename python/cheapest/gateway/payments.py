"""Plans and payments for an account: the plan catalog, billing status, Stripe checkout and webhooks, USDC top-ups.

The payment logic is `cheapest.billing`; this module decides what each outcome means for the caller (a refusal
and its reason code, or a result) and holds this worker's clients: one Stripe client and one web3 connection,
made on first use, and the token's decimals, read once. Stripe's API and the chain node block: callers run these
methods off the event loop - chain calls in their own few threads (`chain_pool`), so a slow node can hold up
top-ups only, never webhooks or GDPR requests; and an account verifies at most `TOPUP_CHECKS_PER_MINUTE`
top-ups a minute.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import stripe
from web3 import Web3

from cheapest.api.billing import BillingStatus, CheckoutResponse, ModelPrice, PlanInfo, PlanList, TopupPending
from cheapest.billing import BillingNotConfigured, checkout, stripe_events, usdc
from cheapest.config import Settings
from cheapest.gateway.admission import Admissions, subscription_status
from cheapest.gateway.errors import Refusal
from cheapest.gateway.keys import topup_limit_name
from cheapest.store import AccountRecord, Store

log = logging.getLogger("cheapest.billing")

T = TypeVar("T")
TOPUP_CHECKS_PER_MINUTE = 20
CHAIN_THREADS = 4

_REJECTION_TEXT = {
    "malformed_tx_hash": ("tx_hash", "`tx_hash` must be 0x followed by 64 hex digits."),
    "malformed_signature": ("signature", "`signature` must be a 65-byte hex EIP-191 signature."),
    "wrong_chain": (None, "The chain node is not on the configured chain."),
    "tx_not_found": ("tx_hash", "No such transaction on the chain."),
    "reverted": ("tx_hash", "The transaction reverted."),
    "no_transfer": ("tx_hash", "The transaction holds no USDC transfer to the top-up address."),
    "bad_signature": ("signature", "The claim is not signed by the wallet that sent the transfer."),
    "already_claimed": ("tx_hash", "This transfer was already credited to another account."),
}


def not_configured() -> Refusal:
    return Refusal("unavailable", "This payment method is not configured on this server.",
                   code="billing_not_configured")


def plan_list(settings: Settings) -> PlanList:
    """The public catalog: every plan's limits, price, funding and budget, and the model prices."""
    return PlanList(
        data=[PlanInfo(name=name, rpm=p.rpm, tpm=p.tpm, price_usd_month=p.price_usd_month,
                       funding=p.funded_by, default=name == settings.billing.default_plan,
                       budget_usd=p.budget_usd, budget_window=p.budget_window, max_keys=p.max_keys)
              for name, p in sorted(settings.plans.items(), key=lambda kv: (kv[1].price_usd_month, kv[0]))],
        prices=[ModelPrice(m, p.prompt_usd_per_mtok, p.completion_usd_per_mtok)
                for m, p in sorted(settings.prices.items())],
    )


class Payments:
    def __init__(self, settings: Settings, store: Store, admissions: Admissions) -> None:
        self.settings = settings
        self.billing = settings.billing
        self.store = store
        self.admissions = admissions
        self._stripe: stripe.StripeClient | None = None
        self._web3: Web3 | None = None
        self._decimals: int | None = None
        self.chain_pool = ThreadPoolExecutor(CHAIN_THREADS, thread_name_prefix="cheapest-chain")

    def close(self) -> None:
        self.chain_pool.shutdown(wait=False, cancel_futures=True)

    def status(self, account: AccountRecord, now: float | None = None) -> BillingStatus:
        now = time.time() if now is None else now
        keys, active = self.store.count_keys(account.id, "sk", now)  # counted in the store, never loaded here
        balance = self.admissions.balance(account.id)
        return BillingStatus(
            account_id=account.id, plan=account.plan, funding=self.settings.plan(account.plan).funded_by,
            subscription_status=subscription_status(account, now), credit_balance_micro=balance,
            credit_balance_usd=balance / 1e6, keys=keys, active_keys=active, period_end=account.period_end,
        )

    # --- Stripe -----------------------------------------------------------------------------------------------
    def stripe_client(self) -> stripe.StripeClient:
        if self._stripe is None:
            if not self.billing.stripe_secret_key:
                raise not_configured()
            self._stripe = checkout.stripe_client(self.billing.stripe_secret_key, self.billing.stripe_api_base)
        return self._stripe

    def checkout(self, account: AccountRecord, plan_name: str) -> CheckoutResponse:
        plan = self.settings.plans.get(plan_name)
        if plan is None or plan.funded_by != "subscription":
            raise Refusal("invalid_request", "`plan` must name a subscription plan (see GET /api/plans).", param="plan",
                          code="invalid_value")
        client = self.stripe_client()
        sub = self.store.ledger.subscription(account.id)
        try:
            session = checkout.create_checkout_session(
                self.billing, account_id=account.id, plan=plan_name, customer_email=account.email,
                customer_id=sub.customer_id if sub is not None else None, client=client)
        except checkout.UnknownPlan:
            raise Refusal("invalid_request", "This plan cannot be bought by card on this server (no Stripe price "
                          "configured).", param="plan", code="invalid_value") from None
        except checkout.CheckoutUnavailable as exc:
            log.error("stripe checkout failed: code=%s http=%s", exc.code, exc.status)
            raise Refusal("upstream_failed", "The card payment provider could not create a checkout session; retry "
                          "later.", code="payment_provider_error") from None
        return CheckoutResponse(session.id, session.url)

    def webhook(self, raw: bytes, signature: str | None) -> None:
        """A Stripe event, verified by its signature over the raw body, applied once. Bodies carry customers'
        emails: only the outcome's reason code leaves this method."""
        try:
            stripe_events.handle_webhook(self.store.ledger, self.billing, raw, signature)
        except stripe_events.WebhookRejected as exc:
            raise Refusal("invalid_request", f"Webhook refused: {exc.reason_code}.", code=exc.reason_code) from None
        except BillingNotConfigured:
            raise not_configured() from None

    # --- USDC ---------------------------------------------------------------------------------------------------
    def topup_quote(self, account: AccountRecord, amount_usd: object, method: str) -> usdc.TopupQuote:
        """Blocks on the chain node the first time (the token's decimals): run it in `chain_pool`."""
        if method != "usdc":
            raise Refusal("invalid_request", "Card payments are subscriptions: use POST /api/billing/checkout. "
                          "Top-ups take method `usdc`.", param="method", code="invalid_value")
        try:
            return usdc.topup_quote(self.billing, account.id, amount_usd, lambda: self._chain(self.decimals))
        except usdc.TopupRejected:
            b = self.billing
            raise Refusal("invalid_request", f"`amount_usd` must be between {b.usdc_min_topup_micro / 1e6:g} and "
                          f"{b.usdc_max_topup_micro / 1e6:g} with at most 6 decimals.", param="amount_usd",
                          code="invalid_value") from None
        except BillingNotConfigured:
            raise not_configured() from None

    def web3(self) -> Web3:
        if self._web3 is None:
            self._web3 = usdc.make_web3(self.billing)
        return self._web3

    def decimals(self) -> int:
        if self._decimals is None:
            self._decimals = usdc.token_decimals(self.web3(), self.billing)
        return self._decimals

    async def admit_topup_check(self, account: AccountRecord) -> None:
        """The account's share of chain lookups (429 past it): ask before taking a chain thread."""
        await self.admissions.throttle(topup_limit_name(account.id), TOPUP_CHECKS_PER_MINUTE, 60.0,
                                 "top-up verifications")

    def verify_topup(self, account: AccountRecord, tx_hash: str,
                     signature: str) -> usdc.TopupCredited | TopupPending:
        """Credit a confirmed transfer once; `TopupPending` while it is not confirmed enough. Blocks on the
        chain node: run it in `chain_pool`, after `admit_topup_check`."""
        try:
            return self._chain(lambda: usdc.verify_topup(
                self.billing, self.store.ledger, self.web3(), account_id=account.id, tx_hash=tx_hash,
                signature=signature, decimals=self.decimals()))
        except usdc.TopupPending as exc:
            return TopupPending(tx_hash=tx_hash.lower(), confirmations=exc.confirmations, required=exc.required,
                                retry_after=exc.retry_after)
        except usdc.TopupRejected as exc:
            param, text = _REJECTION_TEXT.get(exc.reason_code, (None, "The top-up was refused."))
            if exc.reason_code == "already_claimed":
                raise Refusal("conflict", text, param=param, code=exc.reason_code) from None
            if exc.reason_code == "wrong_chain":
                raise Refusal("upstream_failed", text, type="invalid_request_error", param=param,
                              code=exc.reason_code) from None
            raise Refusal("invalid_request", text, param=param, code=exc.reason_code) from None
        except BillingNotConfigured:
            raise not_configured() from None

    @staticmethod
    def _chain(call: Callable[[], T]) -> T:
        """A call to the chain node; its failures as refusals (only the error's type is logged)."""
        try:
            return call()
        except (OSError, ConnectionError, TimeoutError) as exc:
            log.error("chain node unreachable: %s", type(exc).__name__)
            raise Refusal("unavailable", "The chain node could not be reached; retry later.",
                          code="chain_unavailable") from None
        except Exception as exc:  # requests/web3 errors from the node
            if type(exc).__module__.split(".")[0] not in ("requests", "web3", "urllib3"):
                raise
            log.error("chain node error: %s", type(exc).__name__)
            raise Refusal("upstream_failed", "The chain node failed to answer; retry later.",
                          code="chain_unavailable") from None
