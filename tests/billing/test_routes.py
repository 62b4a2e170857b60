"""Payment routes through a real two-worker server: Stripe checkout against the loopback Stripe, signed webhooks
changing what /api/billing/status and /v1 see, duplicated concurrent webhooks applied once, and a USDC top-up
verified on a local EVM (eth-tester behind a loopback JSON-RPC endpoint, the stand-in for a Base node) and
credited once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from cheapest.store import open_store
from fixtures_payments import (
    ChainNode, billing_env,
    auth_header as _h, billing_status as _status, chat as _chat, checkout as _checkout, claim_signature as _claim,
    deliver_webhook as _deliver, sign_webhook as _sign,
)
from fixtures_server import ServerProcess, start_server
from stripe_fake import FakeStripe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chain: SimpleNamespace, node: ChainNode, stripe: FakeStripe
           ) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("billing-routes"), workers=2, extra_env=billing_env(chain, node, stripe))
    yield s
    s.stop()


# --- Stripe ------------------------------------------------------------------------------------------------
def test_checkout_and_signed_webhooks_drive_plan_and_status(server: ServerProcess, stripe: FakeStripe) -> None:
    account_id, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    assert _chat(server, sk).headers["x-ratelimit-limit-requests"] == "20"  # the free plan
    events = _checkout(server, stripe, mk, "pro")
    session = next(e for e in events if e["type"] == "checkout.session.completed")["data"]["object"]
    assert session["client_reference_id"] == account_id
    assert httpx.post(server.base_url + "/api/billing/checkout", json={"plan": "payg"}, headers=_h(mk),
                      timeout=10).status_code == 400  # not a subscription plan
    # A tampered body, a wrong secret: 400 and no effect.
    completed = next(e for e in events if e["type"] == "checkout.session.completed")
    raw = json.dumps(completed).encode()
    bad = _deliver(server, completed, raw.replace(b"pro", b"xyz"), _sign(raw, int(time.time())))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_signature"
    assert _deliver(server, completed, raw, _sign(raw, int(time.time()), "whsec_other")).status_code == 400
    assert _deliver(server, completed, raw, _sign(raw, int(time.time()) + 600)).json()["error"]["code"] == \
        "timestamp_in_future"
    assert _status(server, mk)["plan"] == "free"
    for event in reversed(events):  # out of order on purpose
        r = _deliver(server, event)
        assert r.status_code == 200 and r.json() == {"received": True}
    st = _status(server, mk)
    assert (st["plan"], st["subscription_status"], st["funding"]) == ("pro", "active", "subscription")
    assert st["period_end"] is not None and st["period_end"] > time.time() + 29 * 86400
    assert _chat(server, sk).headers["x-ratelimit-limit-requests"] == "200"  # the pro plan, on the next request
    # Canceled: the plan's inference keys stop (403) until renewed; management keys keep working.
    sub_id = session["subscription"]
    for event in stripe.cancel(sub_id, int(time.time()) + 1):
        assert _deliver(server, event).status_code == 200
    assert _status(server, mk)["subscription_status"] == "canceled"
    r = _chat(server, sk)
    assert r.status_code == 403 and r.json()["error"]["code"] == "subscription_inactive"
    # Renewing (a new checkout) brings the keys back.
    for event in _checkout(server, stripe, mk, "standard", at=int(time.time()) + 2):  # a later subscription
        _deliver(server, event)
    assert _status(server, mk)["subscription_status"] == "active"
    assert _chat(server, sk).headers["x-ratelimit-limit-requests"] == "60"


def test_duplicated_concurrent_webhooks_have_one_effect(server: ServerProcess, stripe: FakeStripe) -> None:
    account_id, mk = server.create_account()
    events = _checkout(server, stripe, mk, "standard")
    sub_id = next(e for e in events if e["type"] == "checkout.session.completed")["data"]["object"]["subscription"]
    events += stripe.renew(sub_id, int(time.time()) + 5)
    deliveries = [e for e in events for _ in range(6)]  # Stripe retries; each copy freshly signed

    with ThreadPoolExecutor(12) as pool:  # fresh connections: both workers apply the same events at once
        statuses = list(pool.map(lambda e: _deliver(server, e).status_code, deliveries))
    assert statuses == [200] * len(deliveries)
    store = open_store(server.data_dir)
    try:
        journal = store.ledger.journal(account_id)
        assert sorted(e.kind for e in journal) == ["stripe_invoice_paid"] * 2  # signup + renewal, once each
        assert all(store.ledger.event(e["id"]) is not None for e in events)
        sub = store.ledger.subscription(account_id)
        assert sub is not None and (sub.plan, sub.status) == ("standard", "active")
    finally:
        store.close()
    st = _status(server, mk)
    assert (st["plan"], st["subscription_status"]) == ("standard", "active")


# --- USDC on a local EVM -----------------------------------------------------------------------------------
def test_usdc_topup_verified_and_credited_once(server: ServerProcess, chain: SimpleNamespace) -> None:
    account_id, mk = server.create_account(plan="payg")
    sk = str(server.create_key(mk)["key"])
    assert _chat(server, sk).status_code == 402  # credit-funded, nothing paid yet
    api = httpx.Client(base_url=server.base_url, headers=_h(mk), timeout=20)
    assert api.post("/api/billing/topup", json={"amount_usd": "0.5"}).status_code == 400  # below the minimum
    assert api.post("/api/billing/topup", json={"amount_usd": 5, "method": "card"}).json()["error"]["param"] == \
        "method"
    quote = api.post("/api/billing/topup", json={"amount_usd": "7.25", "method": "usdc"}).json()
    assert (quote["address"], quote["token"], quote["amount_units"]) == (chain.receiver, chain.usdc.address,
                                                                         7_250_000)
    assert quote["chain_id"] == chain.w3.eth.chain_id and account_id in quote["claim_message"]
    tx = chain.usdc.functions.transfer(quote["address"], quote["amount_units"]).transact(
        {"from": chain.payer.address}).to_0x_hex()
    body = {"tx_hash": tx, "signature": _claim(chain, quote, tx, chain.payer)}
    pending = api.post("/api/billing/verify-topup", json=body)
    assert pending.status_code == 202 and int(pending.headers["retry-after"]) >= 1
    assert pending.json()["status"] == "pending" and pending.json()["required"] == 3
    assert _status(server, mk)["credit_balance_micro"] == 0
    chain.tester.mine_blocks(3)
    # Another account cannot claim it: it cannot sign as the sender.
    _, other_mk = server.create_account()
    other_quote = httpx.post(server.base_url + "/api/billing/topup", json={"amount_usd": 5}, headers=_h(other_mk),
                             timeout=20).json()
    stolen = httpx.post(server.base_url + "/api/billing/verify-topup", headers=_h(other_mk), timeout=20,
                        json={"tx_hash": tx, "signature": _claim(chain, other_quote, tx, chain.stranger)})
    assert stolen.status_code == 400 and stolen.json()["error"]["code"] == "bad_signature"
    # The same claim sent 8 times at once to both workers: credited once.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: httpx.post(server.base_url + "/api/billing/verify-topup", json=body,
                                                     headers=_h(mk), timeout=30), range(8)))
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
    credited = [r.json()["credited_units"] for r in results]
    assert sorted(credited) == [0] * 7 + [7_250_000]
    assert _status(server, mk)["credit_balance_micro"] == 7_250_000
    assert api.post("/api/billing/verify-topup", json=body).json()["already_credited"] is True
    # Bad input: clear 400s naming the field.
    r = api.post("/api/billing/verify-topup", json={"tx_hash": "0x1234", "signature": body["signature"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tx_hash"
    r = api.post("/api/billing/verify-topup", json={"tx_hash": tx, "signature": "0xzz"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_signature"
    api.close()
    assert _chat(server, sk).status_code == 200  # the credit pays for inference now
    store = open_store(server.data_dir)
    try:
        assert [e.kind for e in store.ledger.journal(account_id)] == ["usdc_topup"]
    finally:
        store.close()
