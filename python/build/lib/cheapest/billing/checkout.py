"""Stripe Checkout in subscription mode, through the official SDK.

Route `POST /api/billing/checkout {plan}` calls (off the event loop: the SDK blocks):

    session = create_checkout_session(settings, account_id=acct.id, plan=body.plan, customer_email=acct.email,
                                      customer_id=ledger.subscription(acct.id).customer_id if known)
    -> CheckoutSession(id, url)            answer 200 {"id": ..., "url": ...}

Errors: `UnknownPlan` (ValueError, 400: the plan has no configured price),
`BillingNotConfigured` (503: no secret key), `CheckoutUnavailable`
(RuntimeError, 502: Stripe refused or could not be reached; `.code` is Stripe's
error code when it gave one; the message never carries Stripe's text).

The account id travels as `client_reference_id` and in the metadata of both
the session and the subscription it creates, so every later webhook about it
names its account (see stripe_events). No card data passes through here:
Stripe's hosted page collects it.
"""

from __future__ import annotations

import functools

import msgspec
import stripe

from cheapest.billing.settings import BillingNotConfigured, BillingSettings

__all__ = ["CheckoutSession", "CheckoutUnavailable", "UnknownPlan", "create_checkout_session", "stripe_client"]


class UnknownPlan(ValueError):
    def __init__(self, plan: str) -> None:
        super().__init__("unknown plan; see GET /api/plans")
        self.plan = plan


class CheckoutUnavailable(RuntimeError):
    def __init__(self, code: str | None, status: int | None) -> None:
        super().__init__(f"Stripe checkout failed ({code or 'no code'}, HTTP {status or 'n/a'})")
        self.code = code
        self.status = status


class CheckoutSession(msgspec.Struct, frozen=True):
    id: str
    url: str


@functools.lru_cache(maxsize=4)
def stripe_client(secret_key: str, api_base: str) -> stripe.StripeClient:
    """One client per process and configuration: it keeps its HTTP connection pool."""
    return stripe.StripeClient(secret_key, base_addresses={"api": api_base}, max_network_retries=2)


def create_checkout_session(settings: BillingSettings, *, account_id: str, plan: str,
                            customer_email: str | None = None, customer_id: str | None = None,
                            client: stripe.StripeClient | None = None) -> CheckoutSession:
    """`customer_id`: the account's Stripe customer from an earlier subscription
    (`ledger.subscription(account_id).customer_id`), so Stripe keeps one customer per account."""
    price = settings.stripe_prices.get(plan)
    if price is None:
        raise UnknownPlan(plan)
    if client is None:
        if not settings.stripe_secret_key:
            raise BillingNotConfigured("CHEAPEST_STRIPE_SECRET_KEY is not set")
        client = stripe_client(settings.stripe_secret_key, settings.stripe_api_base)
    meta = {"account_id": account_id, "plan": plan}
    params: dict[str, object] = {
        "mode": "subscription",
        "line_items": [{"price": price, "quantity": 1}],
        "client_reference_id": account_id,
        "metadata": meta,
        "subscription_data": {"metadata": meta},
        "success_url": settings.stripe_success_url,
        "cancel_url": settings.stripe_cancel_url,
    }
    if customer_id:
        params["customer"] = customer_id
    elif customer_email:
        params["customer_email"] = customer_email
    try:
        session = client.v1.checkout.sessions.create(params=params)  # type: ignore[arg-type]
    except stripe.StripeError as exc:
        code = getattr(exc, "code", None)
        raise CheckoutUnavailable(code if isinstance(code, str) else None, exc.http_status) from None
    if not session.url:
        raise CheckoutUnavailable("no_url", None)
    return CheckoutSession(id=session.id, url=session.url)
