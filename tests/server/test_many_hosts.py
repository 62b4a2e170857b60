"""Two hosts act as one: two `cheapest serve` processes (two workers each, separate data directories) share one
PostgreSQL and one Redis, and the client alternates between them - rate limits exact across hosts, a revocation
or a deletion on one host refused on the other at the next request, usage totals equal to the requests made on
both, a duplicated Stripe webhook and a USDC claim delivered to both at once applied once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest

from backends import PostgresServer, RedisServer
from fixtures_hosts import chat, start_host, usage_requests
from fixtures_payments import ChainNode, billing_env, checkout, claim_signature, deliver_webhook
from fixtures_server import ServerProcess, on_every_worker
from stripe_fake import FakeStripe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, postgres_server: PostgresServer, redis_server: RedisServer,
          chain: SimpleNamespace, node: ChainNode, stripe: FakeStripe) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    redis_server.flush()
    url = postgres_server.database()
    env = billing_env(chain, node, stripe)
    with ThreadPoolExecutor(2) as pool:  # both start at once, as a deployment's hosts would
        a, b = pool.map(lambda name: start_host(tmp_path_factory.mktemp(name), url, redis_server.url, 2, env),
                        ["host-a", "host-b"])
    yield a, b
    a.stop()
    b.stop()
    postgres_server.drop(url)


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_one_account_and_key_work_on_both_hosts(hosts: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = hosts
    assert a.data_dir != b.data_dir
    _, mk = a.create_account()
    key = b.create_key(mk)  # made on B with a management key made through A's store
    assert chat(a, str(key["key"])).status_code == 200
    assert chat(b, str(key["key"])).status_code == 200
    ids = {k["id"] for k in httpx.get(a.base_url + "/api/keys", headers=_h(mk), timeout=10).json()["data"]}
    assert key["id"] in ids


def test_rate_limits_are_exact_across_hosts(hosts: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = hosts
    _, mk = a.create_account()
    sk = str(a.create_key(mk, limits={"rpm": 7})["key"])
    # In turn, one host then the other: exactly 7 answers between them, then 429s with the limiter's state.
    codes = [chat((a, b)[i % 2], sk).status_code for i in range(12)]
    assert codes == [200] * 7 + [429] * 5
    # At once, from 16 threads over both hosts: a fresh key still gets exactly its limit.
    sk2 = str(b.create_key(mk, limits={"rpm": 9})["key"])
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: chat((a, b)[i % 2], sk2), range(40)))
    assert sorted(r.status_code for r in results) == [200] * 9 + [429] * 31
    refused = next(r for r in results if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "9"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_revocation_on_one_host_is_refused_on_the_other_at_the_next_request(
        hosts: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = hosts
    _, mk = a.create_account()
    key = a.create_key(mk)
    sk = str(key["key"])
    on_every_worker(b, lambda c: _ok(chat(b, sk, c)))  # cached on every worker of B
    r = httpx.patch(a.base_url + f"/api/keys/{key['id']}", json={"disabled": True}, headers=_h(mk), timeout=10)
    assert r.status_code == 200
    on_every_worker(b, lambda c: _refused(chat(b, sk, c), 403))
    assert httpx.patch(b.base_url + f"/api/keys/{key['id']}", json={"disabled": False}, headers=_h(mk),
                       timeout=10).status_code == 200
    on_every_worker(a, lambda c: _ok(chat(a, sk, c)))
    assert httpx.delete(b.base_url + f"/api/keys/{key['id']}", headers=_h(mk), timeout=10).status_code == 200
    on_every_worker(a, lambda c: _refused(chat(a, sk, c), 401))


def _ok(r: httpx.Response) -> None:
    assert r.status_code == 200, r.text


def _refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, r.text


def test_usage_totals_equal_the_requests_made_on_both_hosts(hosts: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = hosts
    _, mk = a.create_account(plan="pro")
    keys = [str(a.create_key(mk)["key"]) for _ in range(2)]
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: chat((a, b)[i % 2], keys[i % 3 % 2]).status_code, range(60)))
    assert codes == [200] * 60
    deadline = time.monotonic() + 10
    while usage_requests(b, mk) < 60 and time.monotonic() < deadline:  # four workers flush every 0.2 s
        time.sleep(0.1)
    assert usage_requests(a, mk) == usage_requests(b, mk) == 60


def test_duplicated_webhook_delivered_to_both_hosts_at_once_applies_once(
        hosts: tuple[ServerProcess, ServerProcess], stripe: FakeStripe) -> None:
    a, b = hosts
    account_id, mk = a.create_account()
    events = checkout(a, stripe, mk, "standard")
    sub_id = next(e for e in events if e["type"] == "checkout.session.completed")["data"]["object"]["subscription"]
    events += stripe.renew(sub_id, int(time.time()) + 5)
    deliveries = [(host, e) for e in events for host in (a, b) for _ in range(3)]
    with ThreadPoolExecutor(12) as pool:
        statuses = list(pool.map(lambda d: deliver_webhook(d[0], d[1]).status_code, deliveries))
    assert statuses == [200] * len(deliveries)
    store = a.open_store()
    try:
        assert sorted(e.kind for e in store.ledger.journal(account_id)) == ["stripe_invoice_paid"] * 2
        sub = store.ledger.subscription(account_id)
        assert sub is not None and (sub.plan, sub.status) == ("standard", "active")
    finally:
        store.close()
    for host in (a, b):
        st = httpx.get(host.base_url + "/api/billing/status", headers=_h(mk), timeout=10).json()
        assert (st["plan"], st["subscription_status"]) == ("standard", "active")


def test_usdc_transfer_claimed_on_both_hosts_at_once_credits_once(
        hosts: tuple[ServerProcess, ServerProcess], chain: SimpleNamespace) -> None:
    a, b = hosts
    account_id, mk = a.create_account(plan="payg")
    quote = httpx.post(a.base_url + "/api/billing/topup", json={"amount_usd": "3.5", "method": "usdc"},
                       headers=_h(mk), timeout=20).json()
    tx = chain.usdc.functions.transfer(quote["address"], quote["amount_units"]).transact(
        {"from": chain.payer.address}).to_0x_hex()
    chain.tester.mine_blocks(3)
    body = {"tx_hash": tx, "signature": claim_signature(chain, quote, tx, chain.payer)}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: httpx.post((a, b)[i % 2].base_url + "/api/billing/verify-topup", json=body,
                                                     headers=_h(mk), timeout=30), range(8)))
    assert [r.status_code for r in results] == [200] * 8, [r.text for r in results]
    assert sorted(r.json()["credited_units"] for r in results) == [0] * 7 + [3_500_000]
    for host in (a, b):
        st = httpx.get(host.base_url + "/api/billing/status", headers=_h(mk), timeout=10).json()
        assert st["credit_balance_micro"] == 3_500_000


def test_deletion_on_one_host_takes_effect_on_both(hosts: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = hosts
    _, mk = a.create_account()
    sk = str(a.create_key(mk)["key"])
    on_every_worker(b, lambda c: _ok(chat(b, sk, c)))
    r = httpx.delete(a.base_url + "/api/account", headers=_h(mk), timeout=10)
    assert r.status_code == 200, r.text
    for host in (a, b):
        on_every_worker(host, lambda c, h=host: _refused(chat(h, sk, c), 401))
        on_every_worker(host, lambda c, h=host: _refused(c.get(h.base_url + "/api/keys", headers=_h(mk)), 401))
