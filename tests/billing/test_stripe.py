"""Stripe: Checkout through the SDK against a loopback Stripe, signed webhooks applied exactly once."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import tempfile
import time
from pathlib import Path

import pytest
import stripe
from hypothesis import given, settings as hsettings, strategies as st

from cheapest.billing.checkout import CheckoutUnavailable, UnknownPlan, create_checkout_session, stripe_client
from cheapest.billing import BillingNotConfigured
from cheapest.config import BillingSettings
from cheapest.billing.stripe_events import WebhookRejected, handle_webhook
from cheapest.store import Ledger
from cheapest.store.payments import SubscriptionView
from fixtures_payments import open_ledger_store
from fixtures_backends import Backend
from processes import in_processes
from stripe_fake import FakeStripe

SECRET = "whsec_test_" + "k" * 32
API_KEY = "sk_test_cheapest"
PRICES = {"price_standard_m": 900, "price_pro_m": 2900}
CARD = "4242424242424242"  # canary: never stored, wherever it appears in a payload


def sign(payload: bytes, timestamp: int, secret: str = SECRET) -> str:
    """Stripe's scheme, computed here from the endpoint secret (not with the SDK under test)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def body(event: dict) -> bytes:
    return json.dumps(event, indent=2).encode()


@pytest.fixture
def cfg() -> BillingSettings:
    return BillingSettings(stripe_secret_key=API_KEY, stripe_webhook_secret=SECRET,
                           stripe_prices={"standard": "price_standard_m", "pro": "price_pro_m"})


@pytest.fixture
def fake():
    with FakeStripe(API_KEY, PRICES) as server:
        yield server


def paid_subscription(fake: FakeStripe, cfg: BillingSettings, account: str, plan: str, now: int):
    s = BillingSettings(**{**_fields(cfg), "stripe_api_base": fake.url})
    session = create_checkout_session(s, account_id=account, plan=plan, customer_email="payer@example.com")
    return session, fake.complete_session(session.id, now)


def _fields(cfg: BillingSettings) -> dict:
    return {f: getattr(cfg, f) for f in cfg.__struct_fields__}


def deliver(ledger, cfg, event: dict, ts: int | None = None, now: float | None = None):
    raw = body(event)
    return handle_webhook(ledger, cfg, raw, sign(raw, int(time.time()) if ts is None else ts), now=now)


# -- Checkout ------------------------------------------------------------------------------------------
def test_checkout_session_created_through_the_sdk(fake, cfg):
    s = BillingSettings(**{**_fields(cfg), "stripe_api_base": fake.url})
    session = create_checkout_session(s, account_id="acct_1", plan="pro", customer_email="a@example.com")
    assert session.url == f"https://checkout.stripe.com/c/pay/{session.id}"
    assert session.id.startswith("cs_test_")
    (req,) = fake.requests
    assert req["path"] == "/v1/checkout/sessions"
    assert req["headers"]["authorization"] == f"Bearer {API_KEY}"
    p = req["params"]
    assert p["mode"] == "subscription"
    assert p["line_items"] == [{"price": "price_pro_m", "quantity": "1"}]
    assert p["client_reference_id"] == "acct_1"
    assert p["metadata"] == {"account_id": "acct_1", "plan": "pro"}
    assert p["subscription_data"] == {"metadata": {"account_id": "acct_1", "plan": "pro"}}
    assert p["customer_email"] == "a@example.com"
    assert "{CHECKOUT_SESSION_ID}" in p["success_url"]
    create_checkout_session(s, account_id="acct_1", plan="standard", customer_email="a@example.com",
                            customer_id="cus_known")
    again = fake.requests[-1]["params"]
    assert again["customer"] == "cus_known" and "customer_email" not in again
    assert again["line_items"] == [{"price": "price_standard_m", "quantity": "1"}]


def test_checkout_unknown_plan_makes_no_call(fake, cfg):
    s = BillingSettings(**{**_fields(cfg), "stripe_api_base": fake.url})
    with pytest.raises(UnknownPlan):
        create_checkout_session(s, account_id="acct_1", plan="platinum")
    assert fake.requests == []


def test_checkout_stripe_refusals_are_typed(fake, cfg):
    bad_key = BillingSettings(**{**_fields(cfg), "stripe_api_base": fake.url, "stripe_secret_key": "sk_test_x"})
    with pytest.raises(CheckoutUnavailable) as err:
        create_checkout_session(bad_key, account_id="acct_1", plan="pro")
    assert err.value.status == 401
    # A price the operator configured but Stripe does not know.
    bad_price = BillingSettings(**{**_fields(cfg), "stripe_api_base": fake.url,
                                   "stripe_prices": {"pro": "price_gone"}})
    with pytest.raises(CheckoutUnavailable) as err:
        create_checkout_session(bad_price, account_id="acct_1", plan="pro")
    assert (err.value.status, err.value.code) == (400, "resource_missing")
    with pytest.raises(BillingNotConfigured):
        create_checkout_session(BillingSettings(stripe_prices={"pro": "p"}), account_id="a", plan="pro")


def test_fake_replays_idempotent_requests(fake):
    client = stripe_client(API_KEY, fake.url)
    params = {"mode": "subscription", "success_url": "https://x/s", "line_items": [{"price": "price_pro_m",
                                                                                    "quantity": 1}]}
    a = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
    b = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k1"})
    c = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "k2"})
    assert a.id == b.id != c.id
    assert client.v1.checkout.sessions.retrieve(a.id).id == a.id


# -- Webhook signatures --------------------------------------------------------------------------------
def test_valid_webhooks_activate_the_plan(fake, cfg, ledger):
    now = int(time.time())
    session, events = paid_subscription(fake, cfg, "acct_1", "pro", now)
    results = [deliver(ledger, cfg, e).result for e in events]
    assert results[0] == "applied" and "duplicate" not in results
    sub = ledger.subscription("acct_1")
    assert sub is not None
    assert (sub.plan, sub.status) == ("pro", "active")
    assert sub.current_period_end == now + 30 * 86_400
    assert sub.subscription_id == fake.sessions[session.id]["subscription"]
    assert sub.effective_status(now) == "active"
    (payment,) = ledger.journal("acct_1")
    assert (payment.kind, payment.amount_minor, payment.currency, payment.micro_usd) == (
        "stripe_invoice_paid", 2900, "usd", 0)
    assert ledger.balance("acct_1") == 0  # a subscription payment buys the plan, not credits


def _assert_nothing_recorded(ledger: Ledger, event: dict) -> None:
    assert ledger.event(event["id"]) is None
    assert ledger.subscription("acct_1") is None
    assert ledger.journal("acct_1") == []


def test_tampered_body_is_refused(fake, cfg, ledger):
    event = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))[1][1]
    raw = body(event)
    header = sign(raw, int(time.time()))
    tampered = raw.replace(b'"amount_paid": 2900', b'"amount_paid": 2901')
    assert tampered != raw
    with pytest.raises(WebhookRejected) as err:
        handle_webhook(ledger, cfg, tampered, header)
    assert err.value.reason_code == "bad_signature"
    _assert_nothing_recorded(ledger, event)


@pytest.mark.parametrize("header", [
    "missing", "wrong_secret", "no_v1", "garbage", "v0_only",
])
def test_bad_signature_headers_are_refused(fake, cfg, ledger, header):
    event = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))[1][0]
    raw, t = body(event), int(time.time())
    value = {
        "missing": None,
        "wrong_secret": sign(raw, t, "whsec_someone_else"),
        "no_v1": f"t={t}",
        "garbage": "t=abc,v1=zz",
        "v0_only": sign(raw, t).replace("v1=", "v0="),
    }[header]
    with pytest.raises(WebhookRejected) as err:
        handle_webhook(ledger, cfg, raw, value)
    assert err.value.reason_code == "bad_signature"
    assert "amount" not in str(err.value) and event["id"] not in str(err.value)
    _assert_nothing_recorded(ledger, event)


@pytest.mark.parametrize("shape", ["second_t_later", "spaced_t_first", "garbage_t_first", "t_twice_same"])
def test_ambiguous_signature_headers_are_refused(fake, cfg, ledger, shape):
    """A header naming its timestamp more than once could be read one way by the freshness check and another by
    the SDK's signature check: refused (400), never a 500, nothing recorded."""
    event = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))[1][0]
    raw, now = body(event), int(time.time())
    later = now + 30 * 86_400
    mac_later = sign(raw, later).split("v1=")[1]
    value = {
        "second_t_later": f"v0=0, t={now},t={later},v1={mac_later}",
        "spaced_t_first": f" t={now},t={later},v1={mac_later}",
        "garbage_t_first": f" t=x,{sign(raw, now)}",
        "t_twice_same": f"t={now},{sign(raw, now)}",
    }[shape]
    with pytest.raises(WebhookRejected) as err:
        handle_webhook(ledger, cfg, raw, value)
    assert err.value.reason_code == "ambiguous_signature_header"
    _assert_nothing_recorded(ledger, event)


@pytest.mark.parametrize("header", ["t=,v1=ab", "t=12a,v1=ab", "t=-5,v1=ab", "t=" + "9" * 40 + ",v1=ab", "v1=ab"])
def test_unusable_timestamps_are_bad_signatures(cfg, ledger, header):
    with pytest.raises(WebhookRejected) as err:
        handle_webhook(ledger, cfg, b"{}", header)
    assert err.value.reason_code == "bad_signature"


@pytest.mark.parametrize(("offset", "expected"), [
    (-301, "bad_signature"), (-200, None), (60, None), (299, None), (301, "timestamp_in_future"),
    (86_400, "timestamp_in_future"),
])
def test_timestamp_window(fake, cfg, ledger, offset, expected):
    now = int(time.time())
    event = paid_subscription(fake, cfg, "acct_1", "pro", now)[1][0]
    if expected is None:
        assert deliver(ledger, cfg, event, ts=now + offset, now=now).result == "applied"
        return
    with pytest.raises(WebhookRejected) as err:
        deliver(ledger, cfg, event, ts=now + offset, now=now)
    assert err.value.reason_code == expected
    _assert_nothing_recorded(ledger, event)


def test_signed_but_malformed_events_are_refused(cfg, ledger):
    for raw in (b"not json", b'{"id": "evt_1"}', b'{"id": "x", "object": "event", "type": "t", "created": 1, '
                                                   b'"data": {"object": {}}}'):
        with pytest.raises(WebhookRejected) as err:
            handle_webhook(ledger, cfg, raw, sign(raw, int(time.time())))
        assert err.value.reason_code == "malformed_event"
    with pytest.raises(BillingNotConfigured):
        handle_webhook(ledger, BillingSettings(), b"{}", sign(b"{}", int(time.time())))


def test_replayed_webhook_changes_nothing(fake, cfg, ledger):
    events = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))[1]
    raw = body(events[1])  # invoice.paid
    header = sign(raw, int(time.time()))
    assert handle_webhook(ledger, cfg, raw, header).result == "applied"
    before = (ledger.subscription("acct_1"), ledger.journal("acct_1"))
    for _ in range(3):  # a captured request sent again, and Stripe's own retries with a fresh signature
        assert handle_webhook(ledger, cfg, raw, header).result == "duplicate"
        assert deliver(ledger, cfg, events[1]).result == "duplicate"
    assert (ledger.subscription("acct_1"), ledger.journal("acct_1")) == before
    assert len(ledger.journal("acct_1")) == 1


def test_unknown_types_and_accounts_are_recorded_once(cfg, ledger):
    ev = FakeStripe.event("charge.refunded", {"id": "ch_1", "object": "charge"}, int(time.time()))
    assert deliver(ledger, cfg, ev).result == "ignored"
    assert deliver(ledger, cfg, ev).result == "duplicate"
    stranger = FakeStripe.event("customer.subscription.updated", {
        "id": "sub_x", "object": "subscription", "customer": "cus_x", "status": "active", "metadata": {},
        "items": {"data": []}}, int(time.time()))
    assert deliver(ledger, cfg, stranger).result == "unmatched"


# -- Order independence --------------------------------------------------------------------------------
def lifecycle(fake: FakeStripe, cfg: BillingSettings, t0: int) -> list[dict]:
    """A year in a subscription's life: signup, renewal, a failed payment, recovery, cancellation."""
    _, events = paid_subscription(fake, cfg, "acct_1", "standard", t0)
    sub = next(iter(fake.subscriptions))
    events += fake.renew(sub, t0 + 30 * 86_400)
    events += fake.fail_payment(sub, t0 + 60 * 86_400)
    events += fake.renew(sub, t0 + 61 * 86_400)
    events += fake.cancel(sub, t0 + 80 * 86_400)
    return events


def apply_all(cfg: BillingSettings, events: list[dict]) -> tuple[SubscriptionView | None, list]:
    with tempfile.TemporaryDirectory() as d:
        store = open_ledger_store(Path(d))
        try:
            for e in events:
                deliver(store.ledger, cfg, e)
            return store.ledger.subscription("acct_1"), store.ledger.journal("acct_1")
        finally:
            store.close()


def test_out_of_order_and_duplicated_events_converge(fake, cfg):
    t0 = int(time.time()) - 81 * 86_400
    events = lifecycle(fake, cfg, t0)
    in_order, journal = apply_all(cfg, events)
    assert in_order is not None
    assert (in_order.status, in_order.plan) == ("canceled", "standard")
    assert len(journal) == 3  # signup + two renewals; the failed attempt paid nothing
    assert apply_all(cfg, events[::-1]) == (in_order, journal)
    # Mid-life snapshot: a late, older "active" must not undo a newer "past_due".
    upto_failure = events[:8]
    state, _ = apply_all(cfg, upto_failure[::-1] + upto_failure[:3])
    assert state is not None and state.status == "past_due"
    assert state.current_period_end == t0 + 60 * 86_400


_LIFECYCLE: dict[str, object] = {}


@hsettings(max_examples=25, deadline=None)
@given(st.data())
def test_any_delivery_order_with_duplicates_converges(data):
    cfg = BillingSettings(stripe_secret_key=API_KEY, stripe_webhook_secret=SECRET,
                          stripe_prices={"standard": "price_standard_m", "pro": "price_pro_m"})
    if not _LIFECYCLE:
        with FakeStripe(API_KEY, PRICES) as fake:
            events = lifecycle(fake, cfg, int(time.time()) - 81 * 86_400)
        _LIFECYCLE.update(events=events, expected=apply_all(cfg, events))
    events, expected = _LIFECYCLE["events"], _LIFECYCLE["expected"]
    assert isinstance(events, list)
    extra = data.draw(st.lists(st.sampled_from(events), max_size=6))
    order = data.draw(st.permutations(events + extra))
    assert apply_all(cfg, order) == expected


# -- Concurrency: two worker processes, one store ----------------------------------------------------
def _webhook_worker(start, backend: Backend, cfg_json: bytes, deliveries: list[tuple[bytes, str]]) -> list[str]:
    import msgspec

    store = open_ledger_store(backend)
    cfg = msgspec.json.decode(cfg_json, type=BillingSettings)
    start()
    try:
        return [handle_webhook(store.ledger, cfg, raw, header).result for raw, header in deliveries]
    finally:
        store.close()


def test_two_processes_apply_each_event_once(fake, cfg, backend):
    import msgspec

    now = int(time.time())
    events = []
    for n in range(8):
        events += paid_subscription(fake, cfg, f"acct_{n}", random.choice(["standard", "pro"]), now)[1]
    deliveries = [(body(e), sign(body(e), now)) for e in events]
    open_ledger_store(backend).close()
    a, b = in_processes(_webhook_worker, backend, msgspec.json.encode(cfg), deliveries)
    assert len(a) == len(b) == len(events)
    for ra, rb in zip(a, b):  # per event: one worker applied it, the other found it recorded
        assert [ra, rb].count("duplicate") == 1
        assert {ra, rb} - {"duplicate"} <= {"applied", "unchanged"}
    store = open_ledger_store(backend)
    try:
        for n in range(8):
            assert len(store.ledger.journal(f"acct_{n}")) == 1  # one invoice each, journaled once
            sub = store.ledger.subscription(f"acct_{n}")
            assert sub is not None and sub.status == "active"
        assert all(store.ledger.event(e["id"]) is not None for e in events)
    finally:
        store.close()


# -- Privacy -------------------------------------------------------------------------------------------
def test_no_card_number_or_payload_is_stored(fake, cfg, tmp_path):
    store = open_ledger_store(tmp_path)
    _, events = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))
    for e in events:
        # Stripe never sends a full card number; if one ever appeared, it must still not be kept.
        e["data"]["object"]["payment_method_details"] = {"card": {"number": CARD, "last4": CARD[-4:]}}
        deliver(store.ledger, cfg, e)
    store.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").iterdir())
    assert CARD.encode() not in stored
    assert b"payer@example.com" not in stored and b"Pat Payer" not in stored


def test_account_mirror_sees_each_change_once(fake, cfg, tmp_path):
    """Subscription changes reach the account record (and the change epoch) in the ledger's own step, once."""
    store = open_ledger_store(tmp_path)
    try:
        _, events = paid_subscription(fake, cfg, "acct_1", "pro", int(time.time()))
        for e in events:
            deliver(store.ledger, cfg, e)
        account = store.get_account("acct_1")
        assert account is not None and (account.plan, account.subscription_status) == ("pro", "active")
        epoch = store.epoch()
        for e in events[::-1]:
            assert deliver(store.ledger, cfg, e).result == "duplicate"
        assert store.epoch() == epoch and store.get_account("acct_1") == account
        assert store.ledger.credit("acct_1", 5_000_000, "grant:welcome")
        assert not store.ledger.credit("acct_1", 5_000_000, "grant:welcome")
        assert store.ledger.balance("acct_1") == 5_000_000
        assert store.epoch() == epoch  # credits do not touch the account record: the ledger owns the balance
    finally:
        store.close()
