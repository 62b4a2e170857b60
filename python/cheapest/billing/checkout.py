"""Stripe Checkout in subscription mode, through the official SDK.

`create_checkout_session(settings, account_id=, plan=, customer_email=, customer_id=, client=)` returns a
`CheckoutSession(id, url)`, the page where the customer pays. It blocks on Stripe's API. Errors: `UnknownPlan`
(a ValueError: the plan has no configured Stripe price), `BillingNotConfigured` (no secret key),
`CheckoutUnavailable` (a RuntimeError: Stripe refused or could not be reached; `.code` is Stripe's error code
when it gave one; the message never carries Stripe's text).

The account id travels as `client_reference_id` and in the metadata of both the session and the subscription it
creates, so every later webhook about it names its account (see stripe_events). No card data passes through
here: Stripe's hosted page collects it.
"""

from __future__ import annotations

import msgspec
import stripe

from cheapest.billing import BillingNotConfigured
from cheapest.config import BillingSettings

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


def stripe_client(secret_key: str, api_base: str) -> stripe.StripeClient:
    """A client keeps its HTTP connection pool: make one per worker and pass it to every call."""
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
            raise BillingNotConfigured("stripe_secret_key is not set")
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
