"""`cheapest store migrate --from DIR`: one host's LMDB store copied into PostgreSQL - everything the Store and
Ledger interfaces read back is the same, a second run copies nothing, and a pepper that would not verify the
old keys stops it before anything is copied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cheapest_core
import msgspec

from cheapest.store import KeyLimits, Store, UsageCounter, accounts, open_store
from cheapest.store.payments import ChainClaim, JournalEntry, PaymentEvent, TransferClaim
from cheapest.store.postgres import PostgresStore
from cheapest.store.secrets import load_pepper

HOUR = 3600
NOW = 1_900_000_000


def _old_host(data: Path) -> tuple[bytes, str, list[str]]:
    """An LMDB store with one of everything: returns the pepper, an account id and its keys' secrets."""
    pepper = load_pepper(data)
    store = open_store(data)
    try:
        acct, mk = accounts.create_account(store, "Old.Host@example.test", "payg", pepper)
        key, sk = accounts.create_key(store, acct.id, "sk", "app", pepper, limits=KeyLimits(rpm=5, budget_usd=1.5,
                                      budget_window="1d"), models=("SmolLM2-135M-Instruct",))
        gone, _ = accounts.create_key(store, acct.id, "sk", "revoked", pepper)
        store.add_usage({(key.id, "m", NOW // HOUR * HOUR): UsageCounter(3, 30, 60, 9),
                         (gone.id, "m", NOW // HOUR * HOUR - HOUR): UsageCounter(1, 1, 1, 1)}, {acct.id: 10})
        store.delete_key(gone.id)
        store.roll_up_usage(NOW // HOUR * HOUR - HOUR + 1)  # the revoked key's hour becomes a daily aggregate
        ledger = store.ledger
        accounts.grant_credit(store, acct.id, 5_000_000, "grant:welcome")
        ledger.record_payment_event(PaymentEvent("evt_1", "invoice.paid", NOW, True, acct.id, ("cus_OLD",),
                                                 {"plan": "payg", "status": "active"}, None))
        claim = ChainClaim(acct.id, 2_000_000, "0xSender", 7, NOW)
        ledger.claim_transfers(acct.id, [TransferClaim(8453, "0xABC", 1, claim, JournalEntry(
            "usdc:8453:0xabc:1", "usdc_topup", NOW, 2_000_000))])
        other, _ = accounts.create_account(store, "second@example.test", "free", pepper)
        accounts.set_status(store, other.id, "disabled")
    finally:
        store.close()
    return pepper, acct.id, [mk, sk]


def _everything(store: Store, account_id: str) -> dict[str, object]:
    """What the Store and Ledger interfaces say about the account (and the anonymous aggregates)."""
    history = store.key_history(account_id)
    ledger = store.ledger
    claim = ledger.chain_claim(8453, "0xabc", 1)
    return {
        "accounts": [msgspec.to_builtins(a) for a in store.list_accounts()],
        "keys": [msgspec.to_builtins(k) for k in store.list_keys(account_id)],
        "history": history,
        "usage": [msgspec.to_builtins(r) for r in store.usage(history)],
        "daily": [msgspec.to_builtins(d) for d in store.daily_usage()],
        "spend": [store.window_spend(k, "1d", NOW // 86400 * 86400) for k in history],
        "balance": ledger.balance(account_id),
        "journal": [msgspec.to_builtins(e) for e in ledger.journal(account_id)],
        "subscription": msgspec.to_builtins(ledger.subscription(account_id)),
        "event": msgspec.to_builtins(ledger.event("evt_1")),
        "claim": msgspec.to_builtins(claim),
    }


def _migrate(env: dict[str, str], source: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cheapest.cli", "store", "migrate", "--from", str(source), "--json"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_migrate_copies_everything_once(tmp_path: Path, pg_url: str) -> None:
    old = tmp_path / "old-host"
    pepper, account_id, secrets = _old_host(old)
    new = tmp_path / "new-host"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHEAPEST_")} | {
        "CHEAPEST_DATA_DIR": str(new), "CHEAPEST_STORE_URL": pg_url}
    refused = _migrate(env, old)  # the new host's own (generated) pepper cannot verify the old keys
    assert refused.returncode == 2 and "pepper" in refused.stderr
    (new / "secrets").mkdir(parents=True, exist_ok=True, mode=0o700)
    (new / "secrets" / "pepper").write_bytes(pepper)
    (new / "secrets" / "pepper").chmod(0o600)

    first = _migrate(env, old)
    assert first.returncode == 0, first.stderr
    report = json.loads(first.stdout)
    assert report["copied"] == report["read"] and report["read"]["accounts"] == 2 and report["read"]["usage"] == 1
    second = _migrate(env, old)
    assert second.returncode == 0 and set(json.loads(second.stdout)["copied"].values()) == {0}

    source = open_store(old)
    target = PostgresStore(pg_url)
    try:
        assert _everything(target, account_id) == _everything(source, account_id)
        assert target.ledger.balance(account_id) == 5_000_000 + 2_000_000 - 10
        for secret in secrets:  # the old keys authenticate against the new store with the shared pepper
            key = target.find_key_by_hash(cheapest_core.hash_key(secret, pepper))
            assert key is not None and key.account_id == account_id
    finally:
        source.close()
        target.close()
