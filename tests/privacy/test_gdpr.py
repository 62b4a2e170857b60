"""GDPR through the real server: the export document, deletion seen by every worker at once, retention runs
(CLI and in-server) over a store that the server is using."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cheapest.store.payments import JournalEntry
from cheapest.privacy.deletion import PROMISED_WITHIN, PURGE_AFTER, delete_account
from cheapest.privacy.retention import USAGE_KEPT
from cheapest.vocabulary import DAY, HOUR
from cheapest.store import UsageCounter, open_store
from fixtures_server import ServerProcess, on_every_worker, worker_pid

MODEL = "SmolLM2-135M-Instruct"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3}


def _mk(mk: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mk}"}


def _payment(server: ServerProcess, account_id: str) -> None:
    store = open_store(server.data_dir)  # the same LMDB environment, from this process (LMDB is multi-process)
    try:
        store.ledger.record_payment(account_id, JournalEntry("usdc:8453:0xfeed:0", "usdc_topup", 1_700_000_000,
                                                             2_500_000))
        store.ledger.merge_subscription(account_id, {"plan": "standard", "status": "active",
                                                     "customer_id": "cus_EXPORT"}, 1_700_000_000)
    finally:
        store.close()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    from fixtures_server import start_server

    s = start_server(tmp_path_factory.mktemp("gdpr"), workers=2)
    yield s  # type: ignore[misc]
    s.stop()


def test_export_is_one_document_with_everything_kept(two_workers: ServerProcess) -> None:
    server = two_workers
    account_id, mk = server.create_account(email="Export.Me@example.test")
    live = server.create_key(mk, name="live app", limits={"rpm": 7})
    revoked = server.create_key(mk, name="old app")
    for key, n in ((live, 3), (revoked, 2)):
        for _ in range(n):
            r = httpx.post(server.v1 + "/chat/completions", json=CHAT, headers=_mk(str(key["key"])), timeout=10)
            assert r.status_code == 200, r.text
    assert httpx.delete(f"{server.base_url}/api/keys/{revoked['id']}", headers=_mk(mk)).status_code == 200
    _payment(server, account_id)
    deadline = time.monotonic() + 10  # usage is flushed by the workers every 0.2 s
    while True:
        r = httpx.get(server.base_url + "/api/account/export", headers=_mk(mk), timeout=10)
        assert r.status_code == 200, r.text
        doc = r.json()
        if sum(u["requests"] for u in doc["usage"]) == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.headers["cache-control"] == "no-store"
    assert doc["object"] == "account_export"
    acct = doc["account"]
    assert (acct["id"], acct["email"], acct["status"], acct["plan"]) == (account_id, "Export.Me@example.test",
                                                                        "active", "standard")
    keys = {k["name"]: k for k in doc["keys"]}
    assert set(keys) == {"default management key", "live app"}
    assert keys["live app"]["id"] == live["id"] and keys["live app"]["hint"] == live["hint"]
    assert keys["live app"]["limits"] == {"rpm": 7} and keys["live app"]["kind"] == "sk"
    assert doc["revoked_key_ids"] == [revoked["id"]]
    by_key = {u["key_id"]: u for u in doc["usage"]}
    assert by_key[live["id"]]["requests"] == 3 and by_key[revoked["id"]]["requests"] == 2
    assert all(u["model"] == MODEL and u["prompt_tokens"] > 0 for u in doc["usage"])
    assert doc["payments"] == [{"ref": "usdc:8453:0xfeed:0", "kind": "usdc_topup", "at": 1_700_000_000,
                                "micro_usd": 2_500_000, "amount_minor": 0, "currency": "usd"}]
    assert doc["credit_balance_micro"] == 2_500_000
    assert doc["subscription"]["customer_id"] == "cus_EXPORT" and doc["subscription"]["status"] == "active"
    assert doc["subscriptions"] == [doc["subscription"]]  # each subscription kept, each its own state
    # Secrets never leave: no key secret, no key hash.
    assert str(live["key"]) not in r.text and mk not in r.text and "hash" not in r.text
    # Another account's management key exports only its own account.
    _, other_mk = server.create_account()
    other = httpx.get(server.base_url + "/api/account/export", headers=_mk(other_mk), timeout=10).json()
    assert other["account"]["id"] != account_id and other["usage"] == [] and other["payments"] == []
    # Inference keys cannot export.
    r = httpx.get(server.base_url + "/api/account/export", headers=_mk(str(live["key"])), timeout=10)
    assert r.status_code == 403


def test_delete_stops_every_key_on_every_worker_at_once(two_workers: ServerProcess) -> None:
    server = two_workers
    account_id, mk = server.create_account()
    sk1, sk2 = (str(server.create_key(mk)["key"]) for _ in range(2))

    def works(c: httpx.Client) -> None:  # each worker caches the keys and the account
        for sk in (sk1, sk2):
            assert c.get(server.v1 + "/models", headers=_mk(sk)).status_code == 200
        assert c.get(server.base_url + "/api/keys", headers=_mk(mk)).status_code == 200

    pids = on_every_worker(server, works)
    r = httpx.delete(server.base_url + "/api/account", headers=_mk(mk), timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "account" and body["deleted"] is True and body["id"] == account_id
    assert body["purge_by"] == body["deleted_at"] + PROMISED_WITHIN
    t0 = time.monotonic()

    def refused(c: httpx.Client) -> None:  # no sleep: the very next request on any worker is refused
        for sk in (sk1, sk2):
            assert c.post(server.v1 + "/chat/completions", json=CHAT, headers=_mk(sk)).status_code == 401
        assert c.get(server.base_url + "/api/keys", headers=_mk(mk)).status_code == 401
        assert c.delete(server.base_url + "/api/account", headers=_mk(mk)).status_code == 401

    assert on_every_worker(server, refused) == pids
    assert time.monotonic() - t0 < 30
    store = open_store(server.data_dir)
    try:
        account = store.get_account(account_id)
    finally:
        store.close()
    assert account is not None and account.status == "deleted" and account.deleted_at == body["deleted_at"]


def test_retention_cli_rolls_up_and_purges(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory()
    gone_id, gone_mk = server.create_account(email="gone@example.test")
    keep_id, keep_mk = server.create_account(email="keep@example.test")
    gone_key, keep_key = server.create_key(gone_mk), server.create_key(keep_mk)
    now = time.time()
    old_hour = int(now - USAGE_KEPT - 2 * DAY) // HOUR * HOUR
    store = open_store(server.data_dir)
    try:
        store.add_usage({(str(keep_key["id"]), MODEL, old_hour): UsageCounter(4, 40, 80, 0),
                         (str(gone_key["id"]), MODEL, int(now) // HOUR * HOUR): UsageCounter(1, 1, 1, 0)})
        delete_account(store, gone_id, now - PURGE_AFTER - 60)
    finally:
        store.close()
    out = server.cli("retention", "run", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["usage_rows_rolled_up"] == 1 and report["accounts_purged"] == 1
    # The running server sees it at once: the purged account's keys are unknown, the kept account's old
    # usage is gone from its per-key view.
    r = httpx.get(server.v1 + "/models", headers=_mk(str(gone_key["key"])), timeout=10)
    assert r.status_code == 401
    r = httpx.get(server.v1 + "/usage", headers=_mk(str(keep_key["key"])), timeout=10)
    assert r.status_code == 200 and r.json()["usage"] == []
    store = open_store(server.data_dir)
    try:
        assert store.get_account(gone_id) is None and store.get_account(keep_id) is not None
        days = [(d.model, d.counter.requests) for d in store.daily_usage()]
    finally:
        store.close()
    assert sorted(days) == [(MODEL, 1), (MODEL, 4)]
    # A later pass with the clock driven forward finds nothing new.
    again = json.loads(server.cli("retention", "run", "--json", "--now", str(now + 60)).stdout)
    assert again["usage_rows_rolled_up"] == 0 and again["accounts_purged"] == 0


@pytest.mark.slow
def test_server_runs_retention_periodically(server_factory: Callable[..., ServerProcess],
                                            tmp_path: Path) -> None:
    """Two workers with a 1 s interval: the job runs inside the server, under the lock, with no CLI."""
    data = tmp_path / "data"
    store = open_store(data)
    try:
        from cheapest.store import accounts

        account, _ = accounts.create_account(store, "old@example.test", "free", b"x" * 32)
        key, _ = accounts.create_key(store, account.id, "sk", "k", b"x" * 32)
        old_hour = int(time.time() - USAGE_KEPT - DAY) // HOUR * HOUR
        store.add_usage({(key.id, MODEL, old_hour): UsageCounter(2, 2, 2, 0)})
        delete_account(store, account.id, time.time() - PURGE_AFTER - 1)
    finally:
        store.close()
    server = server_factory(workers=2, data_dir=data, extra_env={"CHEAPEST_RETENTION_INTERVAL": "1"})
    deadline = time.monotonic() + 30
    while True:
        store = open_store(server.data_dir)
        try:
            purged = store.get_account(account.id) is None
            rolled = [d.counter.requests for d in store.daily_usage()]
        finally:
            store.close()
        if purged and rolled == [2]:
            break
        assert time.monotonic() < deadline, "the server never ran retention"
        time.sleep(0.2)
    last = float((data / "retention.lock").read_text())
    assert abs(last - time.time()) < 60
