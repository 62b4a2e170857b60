"""Stripe webhooks: verify, then apply each event once, in any order.

`handle_webhook(ledger, settings, raw_body, stripe_signature_header)`:
- returns `WebhookOutcome(event_id, type, result, account_id)`, `result` one of
  "applied" (state changed), "unchanged" (valid, but older than what we hold),
  "duplicate" (event id seen before: no effect), "ignored" (a type we do not
  handle), "unmatched" (no account could be resolved) - Stripe is told all is
  well in every case;
- raises `WebhookRejected(reason_code)` (a ValueError), nothing written. Codes:
  "bad_signature" (missing/garbled header, wrong secret, tampered body, or older
  than the tolerance: checked by the official SDK), "ambiguous_signature_header"
  (more than one timestamp item), "timestamp_in_future" (more than the tolerance
  ahead: the SDK does not check that), "malformed_event" (signed, but not a
  Stripe event);
- raises `BillingNotConfigured` when no webhook secret is set.

Order independence: an event describes its object's state at the event's
`created` second. Each fact (plan, status, period end, ids) is merged as a
last-writer-wins register stamped with that time (ties broken by a fixed
status rank), see `store.payments.SubscriptionState`. Handled types:
checkout.session.completed, customer.subscription.created/updated/deleted,
invoice.paid, invoice.payment_failed. `invoice.paid` also journals the
payment once per invoice id. Payloads are never stored, only the fields used.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import stripe

from cheapest.billing import BillingNotConfigured
from cheapest.config import BillingSettings
from cheapest.store.base import Ledger
from cheapest.store.payments import EventResult, JournalEntry, PaymentEvent

__all__ = ["StripeEvent", "WebhookOutcome", "WebhookRejected", "apply_event", "handle_webhook", "verify_webhook"]

# Stripe's SDK refuses signatures older than this many seconds; ones this far ahead are refused here too.
STRIPE_TOLERANCE_S = 300
HANDLED = frozenset({
    "checkout.session.completed", "customer.subscription.created", "customer.subscription.updated",
    "customer.subscription.deleted", "invoice.paid", "invoice.payment_failed",
})


class WebhookRejected(ValueError):
    """The webhook is refused (HTTP 400); nothing was recorded. The message never quotes the body."""

    def __init__(self, reason_code: str) -> None:
        super().__init__(reason_code)
        self.reason_code = reason_code


class _EventData(msgspec.Struct):
    object: dict[str, Any]


class StripeEvent(msgspec.Struct):
    id: str
    type: str
    created: int
    data: _EventData
    object: str = "event"


class WebhookOutcome(msgspec.Struct, frozen=True):
    event_id: str
    type: str
    result: EventResult
    account_id: str | None = None


_event_dec = msgspec.json.Decoder(StripeEvent)


def verify_webhook(settings: BillingSettings, payload: bytes, sig_header: str | None,
                   now: float | None = None) -> StripeEvent:
    """Signature and freshness checks, then the decoded event envelope."""
    secret = settings.stripe_webhook_secret
    if not secret:
        raise BillingNotConfigured("stripe_webhook_secret is not set")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise WebhookRejected("bad_signature") from None
    timestamp = signed_timestamp(sig_header)
    try:
        # The SDK checks the HMAC (constant-time) and refuses timestamps older than the tolerance.
        stripe.WebhookSignature.verify_header(text, sig_header, secret, STRIPE_TOLERANCE_S)
    except stripe.SignatureVerificationError:
        raise WebhookRejected("bad_signature") from None
    # The SDK leaves future timestamps alone (a captured header pre-signed for later would otherwise stay
    # replayable for as long as its clock says).
    if timestamp > (time.time() if now is None else now) + STRIPE_TOLERANCE_S:
        raise WebhookRejected("timestamp_in_future")
    try:
        event = _event_dec.decode(payload)
    except msgspec.DecodeError:
        raise WebhookRejected("malformed_event") from None
    if event.object != "event" or not event.id.startswith("evt_"):
        raise WebhookRejected("malformed_event")
    return event


def handle_webhook(ledger: Ledger, settings: BillingSettings, payload: bytes, sig_header: str | None,
                   now: float | None = None) -> WebhookOutcome:
    return apply_event(ledger, settings, verify_webhook(settings, payload, sig_header, now))


def apply_event(ledger: Ledger, settings: BillingSettings, event: StripeEvent) -> WebhookOutcome:
    """Record the event id and apply its facts in ONE ledger step."""
    facts = _facts(event, settings)
    outcome = ledger.record_payment_event(PaymentEvent(
        event_id=event.id, type=event.type, created=event.created, handled=event.type in HANDLED,
        account_id=facts.account_id,
        provider_ids=tuple(i for i in (facts.subscription_id, facts.customer_id) if i),
        subscription=facts.updates, payment=facts.payment))
    return WebhookOutcome(event.id, event.type, outcome.result, outcome.account_id)


class _Facts(msgspec.Struct):
    account_id: str | None = None
    subscription_id: str | None = None
    customer_id: str | None = None
    updates: dict[str, str | int | None] = {}
    payment: JournalEntry | None = None


def _facts(event: StripeEvent, settings: BillingSettings) -> _Facts:
    obj = event.data.object
    kind = event.type
    f = _Facts(customer_id=_id(obj.get("customer")))
    if kind == "checkout.session.completed":
        meta = _dict(obj.get("metadata"))
        f.account_id = _text(obj.get("client_reference_id")) or _text(meta.get("account_id"))
        f.subscription_id = _id(obj.get("subscription"))
        plan = _text(meta.get("plan"))
        if obj.get("mode") == "subscription" and f.subscription_id:
            f.updates = {"subscription_id": f.subscription_id, "customer_id": f.customer_id}
            if plan in settings.stripe_prices:
                f.updates["plan"] = plan
            if obj.get("payment_status") in ("paid", "no_payment_required"):
                f.updates["status"] = "active"
    elif kind.startswith("customer.subscription."):
        f.account_id = _text(_dict(obj.get("metadata")).get("account_id"))
        f.subscription_id = _id(obj.get("id"))
        status = "canceled" if kind.endswith(".deleted") else _text(obj.get("status"))
        f.updates = {"subscription_id": f.subscription_id, "customer_id": f.customer_id, "status": status}
        items = _dict(obj.get("items")).get("data") or []
        plan = _plan_of_prices(settings, (_id(_dict(i).get("price")) for i in items)) or _text(
            _dict(obj.get("metadata")).get("plan"))
        if plan in settings.stripe_prices:
            f.updates["plan"] = plan
        # API versions since 2025 carry the period on each item; older ones on the subscription.
        ends = [_dict(i).get("current_period_end") for i in items] + [obj.get("current_period_end")]
        period_end = max((e for e in ends if isinstance(e, int)), default=None)
        if period_end is not None:
            f.updates["current_period_end"] = period_end
    elif kind in ("invoice.paid", "invoice.payment_failed"):
        details = _dict(_dict(obj.get("parent")).get("subscription_details")) or _dict(
            obj.get("subscription_details"))
        f.account_id = _text(_dict(details.get("metadata")).get("account_id"))
        f.subscription_id = _id(details.get("subscription")) or _id(obj.get("subscription"))
        if f.subscription_id is None:
            return f  # a one-off invoice: not a subscription's business
        lines = _dict(obj.get("lines")).get("data") or []
        f.updates = {"subscription_id": f.subscription_id, "customer_id": f.customer_id}
        if kind == "invoice.paid":
            f.updates["status"] = "active"
            ends = [_dict(_dict(line).get("period")).get("end") for line in lines]
            period_end = max((e for e in ends if isinstance(e, int)), default=None)
            if period_end is not None:
                f.updates["current_period_end"] = period_end
            amount = obj.get("amount_paid")
            invoice_id = _text(obj.get("id"))
            if isinstance(amount, int) and invoice_id:
                f.payment = JournalEntry(ref=f"stripe:invoice:{invoice_id}", kind="stripe_invoice_paid",
                                         at=event.created, micro_usd=0, amount_minor=amount,
                                         currency=_text(obj.get("currency")) or "usd")
        else:
            # A first invoice that fails leaves the subscription incomplete; a renewal makes it past due.
            first = obj.get("billing_reason") == "subscription_create"
            f.updates["status"] = "incomplete" if first else "past_due"
        prices = []
        for line in lines:
            line = _dict(line)
            pricing = _dict(_dict(line.get("pricing")).get("price_details"))
            prices.append(_id(pricing.get("price")) or _id(line.get("price")))
        plan = _plan_of_prices(settings, prices)
        if plan is not None:
            f.updates["plan"] = plan
    f.updates = {k: v for k, v in f.updates.items() if v is not None}
    return f


def _plan_of_prices(settings: BillingSettings, prices: Any) -> str | None:
    by_price = settings.plan_for_price
    for price in prices:
        if price in by_price:
            return by_price[price]
    return None


def signed_timestamp(header: str | None) -> int:
    """The one timestamp a `Stripe-Signature` header carries, read exactly as the SDK reads it (items split on
    ",", each on its first "=", the key compared as is), so the freshness check here and the SDK's signature
    check are about the same number. A header naming a timestamp more than once - even as " t" or "t " - could
    be read two ways and is refused as ambiguous; a header without a usable one is a bad signature."""
    if not header:
        raise WebhookRejected("bad_signature")
    items = [item.split("=", 1) for item in header.split(",")]
    if sum(1 for item in items if item[0].strip() == "t") > 1:
        raise WebhookRejected("ambiguous_signature_header")
    values = [item[1] for item in items if item[0] == "t" and len(item) == 2]
    if len(values) != 1 or not values[0].isascii() or not values[0].isdigit() or len(values[0]) > 12:
        raise WebhookRejected("bad_signature")
    return int(values[0])


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _id(v: Any) -> str | None:
    """Stripe fields are an id or, when expanded, the object itself."""
    if isinstance(v, dict):
        v = v.get("id")
    return _text(v)
