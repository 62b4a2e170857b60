"""Spend admission (budgets, credits) for /v1, and the billing routes: status, Stripe checkout and webhooks,
USDC top-ups. The payment logic is `cheapest.billing`; this module maps it to HTTP.

Who owns the money: the payment ledger's `pay_credits` table (`store.ledger`) is the ONE owner of an account's
spendable balance. Top-ups and operator grants credit it once per reference; usage of credit-funded plans is
debited from it by the usage flush, in the same write transaction as the usage counters (store.add_usage).

Everything that blocks (Stripe's HTTP API, the chain node's JSON-RPC, LMDB write transactions of the ledger)
runs in a thread (`asyncio.to_thread`), never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timezone

import msgspec

from cheapest.api.billing import (
    BillingStatus, CheckoutRequest, CheckoutResponse, TopupPending as PendingBody, TopupRequest, VerifyTopupRequest,
    WebhookAck,
)
from cheapest.billing import checkout as stripe_checkout
from cheapest.billing import stripe_events, usdc
from cheapest.billing.ledger import SubscriptionView
from cheapest.billing.settings import BillingNotConfigured, BillingSettings
from cheapest.http.auth import management_account
from cheapest.http.errors import ApiError
from cheapest.http.management import decode_body
from cheapest.http.request import Request, Response, json_response
from cheapest.http.state import WorkerState
from cheapest.store import AccountRecord, KeyRecord
from cheapest.store.records import BUDGET_WINDOWS, window_start

log = logging.getLogger("cheapest.billing")
_encode = msgspec.json.Encoder().encode
_checkout_decoder = msgspec.json.Decoder(CheckoutRequest)
_topup_decoder = msgspec.json.Decoder(TopupRequest)
_verify_decoder = msgspec.json.Decoder(VerifyTopupRequest)


# --- admission ------------------------------------------------------------------------------------------------
def _budgets(state: WorkerState, account: AccountRecord, key: KeyRecord) -> list[tuple[int, str, str]]:
    """(cap in micro-dollars, window, whose) for the key's own budget and its plan's; both apply."""
    plan = state.settings.plan(account.plan)
    out: list[tuple[int, str, str]] = []
    if key.limits.budget_usd is not None:
        window = key.limits.budget_window or plan.budget_window
        if window is not None:
            out.append((round(key.limits.budget_usd * 1_000_000), window, "this key's"))
    if plan.budget_usd is not None and plan.budget_window is not None:
        out.append((round(plan.budget_usd * 1_000_000), plan.budget_window, f"the {account.plan} plan's"))
    return out


def admit_spend(state: WorkerState, key: KeyRecord, account: AccountRecord) -> str | None:
    """Before any inference: refuse a key whose budget window is spent (429 naming the budget and its reset) and
    a credit-funded account whose balance is used up (402 insufficient_quota). Returns the account to debit
    (credit-funded plans) or None.

    Spend is the flushed total plus this worker's unflushed part; other workers' unflushed usage (at most one
    flush interval) and requests already running can take a budget or a balance slightly past zero: the cost of a
    request is known only after it ran, and it is always billed in full."""
    now = time.time()
    for cap, window, whose in _budgets(state, account, key):
        start = window_start(window, now)
        spent = state.store.window_spend(key.id, window, start) + state.meter.pending_cost(key.id)
        if spent >= cap:
            reset = start + BUDGET_WINDOWS[window]
            wait = max(1, math.ceil(reset - now))
            at = datetime.fromtimestamp(reset, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            raise ApiError(429, f"Budget exceeded: {whose} budget of ${cap / 1e6:g} per {window} window is spent "
                           f"(${spent / 1e6:g}); it resets at {at} (in {wait} s).", type="insufficient_quota",
                           code="budget_exceeded",
                           headers=[("retry-after", str(wait)), ("x-budget-reset", str(reset))])
    if state.settings.plan(account.plan).funded_by != "credits":
        return None
    balance = state.store.ledger.balance(account.id) - state.meter.pending_debit(account.id)
    if balance <= 0:
        raise ApiError(402, "You exceeded your current quota: the account's credit balance is used up. Top it up "
                       "(POST /api/billing/topup) and retry.", type="insufficient_quota", code="insufficient_quota")
    return account.id


# --- per-worker billing configuration ---------------------------------------------------------------------------
_settings: BillingSettings | None = None
_web3: object | None = None


def billing_settings() -> BillingSettings:
    """Read from the environment once per worker (see billing/settings.py for the variables)."""
    global _settings
    if _settings is None:
        try:
            _settings = BillingSettings.from_env()
        except ValueError as exc:  # our own message naming the variable, never a secret
            log.error("%s", exc)
            raise _unavailable() from None
    return _settings


def _w3(settings: BillingSettings) -> object:
    global _web3
    if _web3 is None:
        _web3 = usdc.make_web3(settings)
    return _web3


def _unavailable() -> ApiError:
    return ApiError(503, "This payment method is not configured on this server.", type="server_error",
                    code="billing_not_configured")


# --- routes -----------------------------------------------------------------------------------------------------
async def status(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    view = SubscriptionView(plan=account.plan, status=account.subscription_status,
                            current_period_end=account.period_end, subscription_id=None, customer_id=None,
                            updated_at=0)
    now = time.time()
    keys = state.store.list_keys(account.id, limit=1_000_000, kind="sk")
    balance = state.store.ledger.balance(account.id) - state.meter.pending_debit(account.id)
    body = BillingStatus(
        account_id=account.id, plan=account.plan,
        funding=state.settings.plan(account.plan).funded_by,
        subscription_status=view.effective_status(now) if account.subscription_status != "none" else "none",
        credit_balance_micro=balance, credit_balance_usd=balance / 1e6, keys=len(keys),
        active_keys=sum(1 for k in keys if k.usable_at(now)), period_end=account.period_end,
    )
    return json_response(_encode(body))


async def checkout(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    body: CheckoutRequest = await decode_body(state, req, _checkout_decoder)
    plan = state.settings.plans.get(body.plan)
    if plan is None or plan.funded_by != "subscription":
        raise ApiError(400, "`plan` must name a subscription plan (see GET /api/plans).", param="plan",
                       code="invalid_value")
    settings = billing_settings()
    if not settings.stripe_secret_key:
        raise _unavailable()
    sub = state.store.ledger.subscription(account.id)
    try:
        session = await asyncio.to_thread(
            stripe_checkout.create_checkout_session, settings, account_id=account.id, plan=body.plan,
            customer_email=account.email, customer_id=sub.customer_id if sub is not None else None)
    except stripe_checkout.UnknownPlan:
        raise ApiError(400, "This plan cannot be bought by card on this server (no Stripe price configured).",
                       param="plan", code="invalid_value") from None
    except BillingNotConfigured:
        raise _unavailable() from None
    except stripe_checkout.CheckoutUnavailable as exc:
        log.error("stripe checkout failed: code=%s http=%s", exc.code, exc.status)
        raise ApiError(502, "The card payment provider could not create a checkout session; retry later.",
                       type="server_error", code="payment_provider_error") from None
    return json_response(_encode(CheckoutResponse(session.id, session.url)))


async def stripe_webhook(state: WorkerState, req: Request) -> Response:
    """No API key: Stripe's signature over the RAW body authenticates it. Bodies are never logged (they carry
    customers' emails); only the outcome's reason code leaves this function."""
    raw = await req.body(state.settings.max_body_bytes)
    settings = billing_settings()
    try:
        await asyncio.to_thread(stripe_events.handle_webhook, state.store.ledger, settings, raw,
                                req.headers.get("stripe-signature"))
    except stripe_events.WebhookRejected as exc:
        raise ApiError(400, f"Webhook refused: {exc.reason_code}.", code=exc.reason_code) from None
    except BillingNotConfigured:
        raise _unavailable() from None
    return json_response(_encode(WebhookAck()))


async def topup(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    body: TopupRequest = await decode_body(state, req, _topup_decoder)
    if body.method != "usdc":
        raise ApiError(400, "Card payments are subscriptions: use POST /api/billing/checkout. Top-ups take "
                       "method `usdc`.", param="method", code="invalid_value")
    try:
        quote = usdc.topup_quote(billing_settings(), account.id, body.amount_usd)
    except usdc.TopupRejected:
        s = billing_settings()
        raise ApiError(400, f"`amount_usd` must be between {s.usdc_min_topup_micro / 1e6:g} and "
                       f"{s.usdc_max_topup_micro / 1e6:g} with at most 6 decimals.", param="amount_usd",
                       code="invalid_value") from None
    except BillingNotConfigured:
        raise _unavailable() from None
    return json_response(_encode(quote))


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


async def verify_topup(state: WorkerState, req: Request) -> Response:
    account = management_account(state, req)
    body: VerifyTopupRequest = await decode_body(state, req, _verify_decoder)
    settings = billing_settings()
    try:
        w3 = _w3(settings)
        credited = await asyncio.to_thread(usdc.verify_topup, settings, state.store.ledger, w3,  # type: ignore[arg-type]
                                           account_id=account.id, tx_hash=body.tx_hash, signature=body.signature)
    except usdc.TopupPending as exc:
        pending = PendingBody(tx_hash=body.tx_hash.lower(), confirmations=exc.confirmations, required=exc.required,
                              retry_after=exc.retry_after)
        return json_response(_encode(pending), [("retry-after", str(exc.retry_after))], status=202)
    except usdc.TopupRejected as exc:
        param, text = _REJECTION_TEXT.get(exc.reason_code, (None, "The top-up was refused."))
        status = 409 if exc.reason_code == "already_claimed" else 502 if exc.reason_code == "wrong_chain" else 400
        raise ApiError(status, text, param=param, code=exc.reason_code) from None
    except BillingNotConfigured:
        raise _unavailable() from None
    except (OSError, ConnectionError, TimeoutError) as exc:
        log.error("chain node unreachable: %s", type(exc).__name__)
        raise ApiError(503, "The chain node could not be reached; retry later.", type="server_error",
                       code="chain_unavailable") from None
    except Exception as exc:  # requests/web3 errors from the node: only the type is logged
        if type(exc).__module__.split(".")[0] not in ("requests", "web3", "urllib3"):
            raise
        log.error("chain node error: %s", type(exc).__name__)
        raise ApiError(502, "The chain node failed to answer; retry later.", type="server_error",
                       code="chain_unavailable") from None
    return json_response(_encode(credited))
