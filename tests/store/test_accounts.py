"""The accounts side of the store contract, on each backend (LMDB; PostgreSQL with Redis): the change epoch,
atomic updates, budget-window spend, ledger debits in the usage transaction, the subscription mirror; and the
operator CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from cheapest.store import UsageCounter, accounts
from cheapest.vocabulary import BUDGET_WINDOWS, window_start

PEPPER = b"p" * 32
HOUR = 3600


@pytest.fixture
def store(any_store):  # type: ignore[no-untyped-def]
    return any_store


def test_every_key_and_account_change_bumps_the_epoch(store) -> None:  # type: ignore[no-untyped-def]
    seen = [store.epoch()]

    def bumped() -> None:
        now = store.epoch()
        assert now > seen[-1]
        seen.append(now)

    acct, _ = accounts.create_account(store, "a@example.test", "free", PEPPER)
    bumped()
    key, _ = accounts.create_key(store, acct.id, "sk", "k", PEPPER)
    bumped()
    store.update_key(key.id, acct.id, lambda k: msgspec.structs.replace(k, disabled=True))
    bumped()
    accounts.set_status(store, acct.id, "disabled")
    bumped()
    accounts.set_plan(store, acct.id, "pro")
    bumped()
    store.delete_key(key.id)
    bumped()
    # Usage flushes and credits do not touch cached records: no bump, caches stay warm.
    store.add_usage({(key.id, "m", 0): UsageCounter(1, 2, 3, 4)}, {acct.id: 4})
    accounts.grant_credit(store, acct.id, 10, "grant:x")
    assert store.epoch() == seen[-1]


def test_update_key_is_owned_and_keeps_identity(store) -> None:  # type: ignore[no-untyped-def]
    a, _ = accounts.create_account(store, "a@example.test", "free", PEPPER)
    b, _ = accounts.create_account(store, "b@example.test", "free", PEPPER)
    key, _ = accounts.create_key(store, a.id, "sk", "k", PEPPER)
    assert store.update_key(key.id, b.id, lambda k: msgspec.structs.replace(k, name="x")) is None
    assert store.get_key(key.id).name == "k"
    with pytest.raises(Exception):
        store.update_key(key.id, a.id, lambda k: msgspec.structs.replace(k, account_id=b.id))
    assert store.get_key(key.id).account_id == a.id
    assert [k.id for k in store.list_keys(a.id, kind="sk")] == [key.id]
    assert all(k.kind == "mk" for k in store.list_keys(a.id, kind="mk"))
    store.delete_key(key.id)
    assert key.id in store.key_history(a.id) and store.key_history(b.id) == [k.id for k in store.list_keys(b.id)]


def test_budget_windows_are_epoch_aligned_and_exact(store) -> None:  # type: ignore[no-untyped-def]
    day = 20_000 * 86400  # a UTC midnight
    assert window_start("1d", day + 5 * HOUR + 7) == day
    assert window_start("5h", day + 5 * HOUR + 7) == (day + 5 * HOUR) // (5 * HOUR) * (5 * HOUR)
    assert all(window_start(w, day + 123_456) % BUDGET_WINDOWS[w] == 0 for w in BUDGET_WINDOWS)
    hours = [day + h * HOUR for h in range(0, 30)]
    for h in hours:
        store.add_usage({("key_a", "m", h): UsageCounter(1, 1, 1, 10), ("key_a", "m2", h): UsageCounter(1, 1, 1, 1)})
    for window, length in BUDGET_WINDOWS.items():
        start = window_start(window, hours[-1])
        expected = sum(11 for h in hours if start <= h < start + length)
        assert store.window_spend("key_a", window, start) == expected, window
    assert store.window_spend("key_a", "1d", day) == 0  # yesterday's window is over: pruned
    assert store.window_spend("key_b", "1d", day + 86400) == 0


def test_usage_flush_debits_the_ledger_in_the_same_transaction(store) -> None:  # type: ignore[no-untyped-def]
    acct, _ = accounts.create_account(store, "a@example.test", "payg", PEPPER)
    assert accounts.grant_credit(store, acct.id, 1_000, "grant:1") is True
    assert accounts.grant_credit(store, acct.id, 1_000, "grant:1") is False  # once per reference
    store.add_usage({("k", "m", HOUR): UsageCounter(1, 1, 1, 300)}, {acct.id: 300})
    store.add_usage({("k", "m", HOUR): UsageCounter(1, 1, 1, 900)}, {acct.id: 900})
    assert store.ledger.balance(acct.id) == -200  # may go below zero: cost is known after the request
    assert sum(r.counter.cost_micro for r in store.usage(["k"])) == 1_200


def test_subscription_changes_mirror_into_the_account(store) -> None:  # type: ignore[no-untyped-def]
    acct, _ = accounts.create_account(store, "a@example.test", "free", PEPPER)
    before = store.epoch()
    ledger = store.ledger
    assert ledger.merge_subscription(acct.id, {"plan": "pro", "status": "active", "current_period_end": 99}, 10)
    got = store.get_account(acct.id)
    assert (got.plan, got.subscription_status, got.period_end) == ("pro", "active", 99)
    assert store.epoch() > before
    assert not ledger.merge_subscription(acct.id, {"status": "past_due"}, 5)  # an older fact changes nothing
    assert store.get_account(acct.id).subscription_status == "active"
    # Canceled is final (Stripe never revives a subscription), whenever the fact is stamped.
    assert ledger.merge_subscription(acct.id, {"status": "canceled"}, 5)
    assert not ledger.merge_subscription(acct.id, {"status": "active"}, 20)
    assert store.get_account(acct.id).subscription_status == "canceled"


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEAPEST_")} | {"CHEAPEST_DATA_DIR": str(data)}
    return subprocess.run([sys.executable, "-m", "cheapest.cli", "accounts", *args], env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_operator_cli(tmp_path: Path) -> None:
    made = _cli(tmp_path, "create", "--email", "ops@example.test", "--json")
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    assert created["management_key"].startswith("mk_")
    assert _cli(tmp_path, "create", "--email", "OPS@example.test").returncode == 1  # emails are unique
    assert _cli(tmp_path, "create", "--email", "x@example.test", "--plan", "gold").returncode == 2
    assert _cli(tmp_path, "grant-credit", "ops@example.test", "--usd", "1.5", "--ref", "r").returncode == 0
    assert _cli(tmp_path, "grant-credit", "ops@example.test", "--usd", "1.0000001").returncode == 2
    assert _cli(tmp_path, "set-plan", created["account_id"], "payg").returncode == 0
    assert _cli(tmp_path, "disable", "ops@example.test").returncode == 0
    key = json.loads(_cli(tmp_path, "new-key", "ops@example.test", "--kind", "sk", "--json").stdout)
    shown = json.loads(_cli(tmp_path, "show", "ops@example.test", "--json").stdout)
    assert (shown["plan"], shown["status"], shown["credit_balance_micro"]) == ("payg", "disabled", 1_500_000)
    assert {k["kind"] for k in shown["keys"]} == {"mk", "sk"}
    text = _cli(tmp_path, "show", "ops@example.test").stdout + _cli(tmp_path, "list").stdout
    assert key["key"] not in text and created["management_key"] not in text  # secrets are shown once
    assert _cli(tmp_path, "enable", "ops@example.test").returncode == 0
    listed = json.loads(_cli(tmp_path, "list", "--json").stdout)
    assert [(a["email"], a["status"]) for a in listed] == [("ops@example.test", "active")]
    assert _cli(tmp_path, "show", "nobody@example.test").returncode == 1


def test_live_keys_are_capped_and_the_last_management_key_stays(store) -> None:  # type: ignore[no-untyped-def]
    from cheapest.store import LastManagementKey, QuotaExceeded

    acct, _ = accounts.create_account(store, "cap@example.test", "free", PEPPER)  # one mk key
    kept, _ = accounts.create_key(store, acct.id, "sk", "a", PEPPER, max_keys=3)
    gone, _ = accounts.create_key(store, acct.id, "sk", "b", PEPPER, max_keys=3)
    with pytest.raises(QuotaExceeded):
        accounts.create_key(store, acct.id, "sk", "c", PEPPER, max_keys=3)
    assert store.count_keys(acct.id, None, 0) == (3, 3)
    store.delete_key(gone.id)
    accounts.create_key(store, acct.id, "sk", "c", PEPPER, max_keys=3, expires_at=100)
    store.update_key(kept.id, acct.id, lambda k: msgspec.structs.replace(k, disabled=True))
    assert store.count_keys(acct.id, "sk", 50) == (2, 1) and store.count_keys(acct.id, "sk", 150) == (2, 0)
    (mk,) = store.list_keys(acct.id, kind="mk")
    with pytest.raises(LastManagementKey):
        store.delete_key(mk.id, keep_last_management=True)
    second, _ = accounts.create_key(store, acct.id, "mk", "rotation", PEPPER)
    assert store.delete_key(mk.id, keep_last_management=True)
    with pytest.raises(LastManagementKey):
        store.delete_key(second.id, keep_last_management=True)
    assert store.delete_key(second.id)  # the operator's own revocation may (the CLI replaces it first)


def test_an_accounts_budget_spend_sums_its_keys(store) -> None:  # type: ignore[no-untyped-def]
    acct, _ = accounts.create_account(store, "spend@example.test", "free", PEPPER)
    a, _ = accounts.create_key(store, acct.id, "sk", "a", PEPPER)
    b, _ = accounts.create_key(store, acct.id, "sk", "b", PEPPER)
    owners = {a.id: acct.id, b.id: acct.id}
    store.add_usage({(a.id, "m", 0): UsageCounter(1, 1, 1, 30), (b.id, "m", HOUR): UsageCounter(1, 1, 1, 12)},
                    owners=owners)
    store.add_usage({(b.id, "m", HOUR): UsageCounter(1, 1, 1, 5)}, owners=owners,
                    flush_id="6f1d2e3c-0000-4000-8000-0000000000aa")
    assert (store.window_spend(a.id, "1d", 0), store.window_spend(b.id, "1d", 0)) == (30, 17)
    assert store.window_spend(acct.id, "1d", 0) == 47 and store.window_spend(acct.id, "5h", 0) == 47
    accounts.set_status(store, acct.id, "deleted")
    assert store.purge_account(acct.id) and store.window_spend(acct.id, "1d", 0) == 0


def test_each_subscription_keeps_its_own_state(store) -> None:  # type: ignore[no-untyped-def]
    acct, _ = accounts.create_account(store, "subs@example.test", "free", PEPPER)
    ledger = store.ledger
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_a", "plan": "pro", "status": "active"}, 10)
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_b", "plan": "standard", "status": "active"}, 20)
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_a", "status": "canceled"}, 30)
    got = store.get_account(acct.id)
    assert (got.plan, got.subscription_status) == ("standard", "active")
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_a", "status": "past_due"}, 40)  # late, for A
    got = store.get_account(acct.id)
    assert (got.plan, got.subscription_status) == ("standard", "active")
    assert {(s.subscription_id, s.status) for s in ledger.subscriptions(acct.id)} == {
        ("sub_a", "canceled"), ("sub_b", "active")}
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_b", "status": "past_due"}, 50)
    assert store.get_account(acct.id).subscription_status == "past_due"
    ledger.merge_subscription(acct.id, {"subscription_id": "sub_b", "status": "canceled"}, 60)
    assert store.get_account(acct.id).subscription_status == "canceled"
    view = ledger.subscription(acct.id)
    assert view is not None and view.subscription_id == "sub_b"  # the latest of the lapsed ones
