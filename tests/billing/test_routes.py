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
from typing import Any

import httpx
import pytest
from web3 import Web3

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


def test_each_subscription_keeps_its_own_state(server: ServerProcess, stripe: FakeStripe) -> None:
    """Pro (A) paid then canceled, standard (B) active: a late payment failure of A, and B's own life, decide the
    account's plan and standing from both subscriptions, never from A's facts overwriting B's."""
    _, mk = server.create_account()
    sk = str(server.create_key(mk)["key"])
    t0 = int(time.time()) - 100
    a_events = _checkout(server, stripe, mk, "pro", at=t0)
    sub_a = next(e for e in a_events if e["type"] == "checkout.session.completed")["data"]["object"]["subscription"]
    for event in a_events:
        assert _deliver(server, event).status_code == 200
    b_events = _checkout(server, stripe, mk, "standard", at=t0 + 10)
    sub_b = next(e for e in b_events if e["type"] == "checkout.session.completed")["data"]["object"]["subscription"]
    for event in b_events + stripe.cancel(sub_a, t0 + 20):
        assert _deliver(server, event).status_code == 200
    st = _status(server, mk)
    assert (st["plan"], st["subscription_status"]) == ("standard", "active")
    # A's last invoice fails after it was canceled (stamped later than everything else).
    failed = next(e for e in stripe.fail_payment(sub_a, t0 + 30) if e["type"] == "invoice.payment_failed")
    assert _deliver(server, failed).status_code == 200
    st = _status(server, mk)
    assert (st["plan"], st["subscription_status"]) == ("standard", "active")
    r = _chat(server, sk)
    assert r.status_code == 200 and r.headers["x-ratelimit-limit-requests"] == "60"  # standard's, not pro's
    # B past due: the account is past due on B's plan; B canceled too: now the account's keys stop.
    for event in stripe.fail_payment(sub_b, t0 + 40):
        assert _deliver(server, event).status_code == 200
    assert (_status(server, mk)["plan"], _status(server, mk)["subscription_status"]) == ("standard", "past_due")
    for event in stripe.cancel(sub_b, t0 + 50):
        assert _deliver(server, event).status_code == 200
    assert _status(server, mk)["subscription_status"] == "canceled"
    assert _chat(server, sk).status_code == 403


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


def test_ambiguous_signature_header_is_a_400_never_a_500(server: ServerProcess, stripe: FakeStripe) -> None:
    event = FakeStripe.event("charge.refunded", {"id": "ch_1", "object": "charge"}, int(time.time()))
    raw = json.dumps(event).encode()
    good = _sign(raw, int(time.time()))
    for header in ("t =x," + good, f"t={int(time.time())}," + good):  # (a leading space is no valid header)
        r = _deliver(server, event, raw, header)
        assert r.status_code == 400 and r.json()["error"]["code"] == "ambiguous_signature_header", r.text
    assert _deliver(server, event, raw, good).status_code == 200


def test_topup_verifications_are_limited_per_account(server: ServerProcess, chain: SimpleNamespace) -> None:
    _, mk = server.create_account(plan="payg")
    _, other_mk = server.create_account(plan="payg")
    body = {"tx_hash": "0x" + "ab" * 32, "signature": "0x" + "11" * 65}
    statuses = [httpx.post(server.base_url + "/api/billing/verify-topup", json=body, headers=_h(mk),
                           timeout=20).status_code for _ in range(21)]
    assert statuses[:20] == [400] * 20 and statuses[20] == 429, statuses
    r = httpx.post(server.base_url + "/api/billing/verify-topup", json=body, headers=_h(other_mk), timeout=20)
    assert r.status_code == 400  # another account is not held back


class SlowNode(ChainNode):
    """A chain node that takes `delay` seconds to answer anything (with a JSON-RPC error)."""

    def __init__(self, w3: Web3, delay: float) -> None:
        self.delay = delay
        super().__init__(w3)

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        time.sleep(self.delay)
        return {"jsonrpc": "2.0", "id": req.get("id"), "error": {"code": -32000, "message": "slow"}}


def test_a_slow_chain_node_never_holds_up_webhooks_or_gdpr_requests(server_factory, chain: SimpleNamespace,
                                                                    stripe: FakeStripe) -> None:  # type: ignore[no-untyped-def]
    node = SlowNode(chain.w3, delay=3.0)
    try:
        server = server_factory(extra_env=billing_env(chain, node, stripe))
        # More claims at once than the chain's threads, and than the default thread pool of a CI box (cores + 4).
        owners = [server.create_account() for _ in range(12)]
        tx = "0x" + "cd" * 32
        signed = [_claim(chain, {"claim_message": f"cheapest USDC top-up claim\naccount: {account_id}\nchain: "
                                 f"{chain.w3.eth.chain_id}\ntx: {{tx_hash}}"}, tx, chain.payer)
                  for account_id, _ in owners]
        with ThreadPoolExecutor(len(owners) + 2) as pool:
            claims = [pool.submit(httpx.post, server.base_url + "/api/billing/verify-topup", timeout=60,
                                  headers=_h(mk), json={"tx_hash": tx, "signature": sig})
                      for (_, mk), sig in zip(owners, signed)]
            time.sleep(1.0)  # every chain thread is waiting on the node now
            event = FakeStripe.event("charge.refunded", {"id": "ch_2", "object": "charge"}, int(time.time()))
            started = time.monotonic()
            hook = _deliver(server, event)
            export = httpx.get(server.base_url + "/api/account/export", headers=_h(owners[0][1]), timeout=30)
            waited = time.monotonic() - started
            results = [c.result() for c in claims]
        assert hook.status_code == 200 and export.status_code == 200
        assert waited < 2.0, waited  # not behind the chain calls (each takes 3 s)
        assert {r.status_code for r in results} == {502}, [r.text for r in results]
    finally:
        node.close()
