"""Retention and erasure on each real store (LMDB; PostgreSQL with Redis), driven by an explicit clock (`now` is
passed in; nothing sleeps)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from cheapest.store.payments import ChainClaim, EventRecord, JournalEntry, PaymentEvent, TransferClaim
from cheapest.privacy.deletion import PROMISED_WITHIN, PURGE_AFTER, delete_account
from cheapest.privacy.export import export_account
from cheapest.privacy.retention import (
    USAGE_KEPT, PeriodicRetention, retention_lock, run_locked, run_retention, usage_cutoff,
)
from cheapest.store import Store, UsageCounter, accounts
from cheapest.vocabulary import DAY, HOUR

PEPPER = b"p" * 32
NOW = 1_900_000_000  # a fixed "present": every time below is relative to it
MODEL_A, MODEL_B = "SmolLM2-135M-Instruct", "Other-Model"


@pytest.fixture
def store(any_store: Store) -> Store:
    return any_store


def _usage(store: Store, key_id: str, model: str, hour: int, n: int = 1) -> None:
    store.add_usage({(key_id, model, hour // HOUR * HOUR): UsageCounter(n, 10 * n, 20 * n, 3 * n)})


def _account(store: Store, email: str) -> tuple[str, str, str]:
    account, _ = accounts.create_account(store, email, "free", PEPPER)
    key, _ = accounts.create_key(store, account.id, "sk", "app", PEPPER)
    return account.id, key.id, key.hash.hex()


def _stored_rows(store: Store) -> list[tuple[str, bytes]]:
    """Every record the store holds, as (table, raw bytes): LMDB's keys and values of every sub-database, or
    every row of every PostgreSQL table in its text form."""
    if hasattr(store, "env"):
        env = store.env
        out = []
        with env.begin() as txn:
            for name in [bytes(k) for k, _ in txn.cursor()]:
                db = env.open_db(name, txn=txn, create=False)
                out += [(name.decode(), bytes(k) + b"\0" + bytes(v)) for k, v in txn.cursor(db=db)]
        return out
    with store.db.connect() as conn:  # type: ignore[attr-defined]
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return [(t, str(row).encode() + b"\0" + b"".join(v for v in row if isinstance(v, bytes)))
                for t in tables for row in conn.execute(f"SELECT * FROM {t}").fetchall()]


def test_usage_older_than_90_days_becomes_anonymous_daily_aggregates(store: Store, tmp_path: Path) -> None:
    _, k1, _ = _account(store, "a@example.test")
    _, k2, _ = _account(store, "b@example.test")
    cutoff = usage_cutoff(NOW)
    old_day = (NOW - USAGE_KEPT - 5 * DAY) // DAY * DAY
    # Two keys, two models, several hours of one old day; the hour that ended exactly 90 days ago is old too.
    for h in (1, 2, 7):
        _usage(store, k1, MODEL_A, old_day + h * HOUR, n=h)
        _usage(store, k2, MODEL_A, old_day + h * HOUR, n=10)
    _usage(store, k2, MODEL_B, old_day + 3 * HOUR, n=4)
    _usage(store, k1, MODEL_A, cutoff - HOUR, n=5)  # whole hour ended <= now - 90 d
    _usage(store, k1, MODEL_A, cutoff, n=6)  # its hour is not over 90 days ago: kept
    _usage(store, k2, MODEL_B, NOW - DAY, n=7)  # recent: kept

    report = run_retention(store, NOW)
    assert report.usage_rows_rolled_up == 8 and report.accounts_purged == 0

    kept = sorted((r.key_id, r.model, r.hour, r.counter.requests) for r in store.usage([k1, k2]))
    assert kept == sorted([(k1, MODEL_A, cutoff, 6), (k2, MODEL_B, (NOW - DAY) // HOUR * HOUR, 7)])
    daily = {(d.day, d.model): d.counter for d in store.daily_usage()}
    cutoff_day = (cutoff - HOUR) // DAY * DAY
    assert daily == {
        (old_day, MODEL_A): UsageCounter(1 + 2 + 7 + 30, 400, 800, 120),
        (old_day, MODEL_B): UsageCounter(4, 40, 80, 12),
        (cutoff_day, MODEL_A): UsageCounter(5, 50, 100, 15),
    }
    # Idempotent: a second pass (another worker, the CLI) finds nothing more to do and changes nothing.
    assert run_retention(store, NOW).usage_rows_rolled_up == 0
    assert {(d.day, d.model): d.counter for d in store.daily_usage()} == daily
    # Anonymous: an aggregate's stored key and value name no key or account.
    for d in store.daily_usage():
        assert set(type(d).__struct_fields__) == {"day", "model", "counter"}
    # An hour later, the kept row at the cutoff has aged out too, and lands in the same day's aggregate.
    assert run_retention(store, NOW + HOUR).usage_rows_rolled_up == 1
    assert [r.hour for r in store.usage([k1])] == []


def test_roll_up_in_small_batches_is_exact(store: Store) -> None:
    _, k1, _ = _account(store, "a@example.test")
    _, k2, _ = _account(store, "b@example.test")
    base = (NOW - USAGE_KEPT - 30 * DAY) // DAY * DAY
    for h in range(0, 24 * 20, 5):
        _usage(store, k1, MODEL_A, base + h * HOUR)
        _usage(store, k2, MODEL_A, base + h * HOUR, n=2)
    rows = len(list(store.usage([k1, k2])))
    moved = store.roll_up_usage(usage_cutoff(NOW), batch=7)  # type: ignore[call-arg]
    assert moved == rows and list(store.usage([k1, k2])) == []
    assert sum(d.counter.requests for d in store.daily_usage()) == 3 * rows // 2
    assert [d.day for d in store.daily_usage()] == [base + i * DAY for i in range(20)]


def _payments(store: Store, account_id: str, other_id: str) -> None:
    ledger = store.ledger
    ledger.record_payment(account_id, JournalEntry("stripe:invoice:in_1", "stripe_invoice_paid", NOW, 0, 500, "usd"))
    ledger.merge_subscription(account_id, {"plan": "standard", "status": "active", "customer_id": "cus_PURGEME",
                                           "subscription_id": "sub_PURGEME"}, NOW)
    # An event naming each account links its Stripe customer id to it.
    ledger.record_payment_event(PaymentEvent("evt_1", "invoice.paid", NOW, True, account_id, ("cus_PURGEME",)))
    ledger.record_payment_event(PaymentEvent("evt_2", "invoice.paid", NOW, True, other_id, ("cus_OTHER",)))
    for account, tx, index, units, sender, block in ((account_id, "0xabc", 1, 5_000_000, "0xSENDERPURGE", 7),
                                                     (other_id, "0xdef", 2, 1_000_000, "0xSENDEROTHER", 8)):
        ledger.claim_transfers(account, [TransferClaim(8453, tx, index, ChainClaim(account, units, sender, block, NOW),
                                                       JournalEntry(f"usdc:8453:{tx}:{index}", "usdc_topup", NOW,
                                                                    units))])


def test_deleted_account_is_purged_before_30_days_and_usage_stays_anonymous(store: Store, tmp_path: Path) -> None:
    acct, key, key_hash = _account(store, "Gone.User@example.test")
    other, other_key, _ = _account(store, "stays@example.test")
    revoked, _ = accounts.create_key(store, acct, "sk", "old app", PEPPER)
    for k in (key, revoked.id, other_key):
        _usage(store, k, MODEL_A, NOW - 2 * DAY, n=3)
    store.delete_key(revoked.id)  # revoked earlier: its usage is still the account's
    _payments(store, acct, other)
    assert len(export_account(store, store.get_account(acct), NOW).payments) == 2  # type: ignore[arg-type]

    deleted_at = NOW - PURGE_AFTER + 1
    marked = delete_account(store, acct, deleted_at)
    assert marked is not None and marked.status == "deleted" and marked.deleted_at == deleted_at
    assert delete_account(store, acct, deleted_at + 500).deleted_at == deleted_at  # type: ignore[union-attr]
    # Still inside the grace period: nothing is purged yet.
    assert run_retention(store, NOW).accounts_purged == 0
    assert store.get_account(acct) is not None

    # A day before the promised 30 days are over, the account data is gone.
    later = deleted_at + PURGE_AFTER
    assert later < deleted_at + PROMISED_WITHIN
    assert run_retention(store, later).accounts_purged == 1
    assert store.get_account(acct) is None and store.find_account_by_email("gone.user@example.test") is None
    assert store.get_key(key) is None and store.find_key_by_hash(bytes.fromhex(key_hash)) is None
    assert store.list_keys(acct) == [] and store.key_history(acct) == []
    assert list(store.usage([key, revoked.id])) == []
    ledger = store.ledger
    assert ledger.journal(acct) == [] and ledger.subscription(acct) is None and ledger.balance(acct) == 0
    # The purged account's Stripe link is gone; the other account's still names it.
    assert ledger.record_payment_event(PaymentEvent("evt_p1", "invoice.paid", NOW, True, None, ("cus_PURGEME",))
                                       ).account_id is None
    assert ledger.record_payment_event(PaymentEvent("evt_p2", "invoice.paid", NOW, True, None, ("cus_OTHER",))
                                       ).account_id == other
    # Once-only records stay (a replayed event or transfer still changes nothing) but name nobody.
    event = ledger.event("evt_1")
    assert event is not None and (event.type, event.created, event.account_id) == ("invoice.paid", NOW, None)
    claim = ledger.chain_claim(8453, "0xabc", 1)
    assert claim is not None and claim.account_id == "" and claim.sender == ""
    # Its usage survives only in the anonymous aggregate (6 requests: both of its keys); the other account's
    # usage and payments are untouched.
    day = (NOW - 2 * DAY) // DAY * DAY
    assert [(d.day, d.model, d.counter.requests) for d in store.daily_usage()] == [(day, MODEL_A, 6)]
    assert [r.counter.requests for r in store.usage([other_key])] == [3]
    assert [e.ref for e in ledger.journal(other)] == ["usdc:8453:0xdef:2"]
    assert ledger.chain_claim(8453, "0xdef", 2).sender == "0xSENDEROTHER"  # type: ignore[union-attr]
    assert store.get_account(other) is not None
    # The email may be used again for a new account.
    accounts.create_account(store, "gone.user@example.test", "free", PEPPER)


def test_late_stripe_event_for_a_deleted_or_purged_account_stores_nothing(store: Store) -> None:
    from cheapest.billing.stripe_events import StripeEvent, apply_event
    from cheapest.config import BillingSettings

    acct, _, _ = _account(store, "late.webhook@example.test")
    live, _, _ = _account(store, "live@example.test")
    ledger = store.ledger

    def event(n: int, account_id: str) -> StripeEvent:
        sub = {"id": f"sub_LATE{n}", "object": "subscription", "customer": f"cus_LATE{n}", "status": "active",
               "current_period_end": NOW + 30 * DAY, "metadata": {"account_id": account_id, "plan": "pro"},
               "items": {"data": []}}
        return msgspec.convert({"id": f"evt_late{n}", "type": "customer.subscription.updated", "created": NOW + n,
                                "data": {"object": sub}}, StripeEvent)

    assert apply_event(ledger, BillingSettings(), event(0, live)).result == "applied"  # the control: it can apply
    delete_account(store, acct, NOW)
    assert apply_event(ledger, BillingSettings(), event(1, acct)).result == "unmatched"  # deleted, not yet purged
    run_retention(store, NOW + PURGE_AFTER)
    assert apply_event(ledger, BillingSettings(), event(2, acct)).result == "unmatched"  # purged
    assert ledger.subscription(acct) is None
    for n, linked in ((3, "cus_LATE1"), (4, "sub_LATE2")):  # their Stripe ids were never linked to the account
        probe = PaymentEvent(f"evt_probe{n}", "customer.subscription.updated", NOW + n, True, None, (linked,))
        assert ledger.record_payment_event(probe).result == "unmatched"
    assert ledger.event("evt_late2") == EventRecord("customer.subscription.updated", NOW + 2,
                                                    ledger.event("evt_late2").received_at, None)  # type: ignore[union-attr]


def test_purged_account_leaves_no_readable_trace(store: Store) -> None:
    """Every table, read through the backend: neither the account id, its email, its keys nor payment ids remain."""
    acct, key, key_hash = _account(store, "trace.me@example.test")
    other, _, _ = _account(store, "keep@example.test")
    _usage(store, key, MODEL_A, NOW - DAY)
    _payments(store, acct, other)
    delete_account(store, acct, NOW - PROMISED_WITHIN)
    assert run_retention(store, NOW).accounts_purged == 1
    needles = [acct.encode(), b"trace.me@example.test", key.encode(), bytes.fromhex(key_hash), b"cus_PURGEME",
               b"sub_PURGEME", b"0xSENDERPURGE", b"0xsenderpurge", b"in_1"]
    rows = _stored_rows(store)
    assert any(other.encode() in raw for _, raw in rows)  # the search sees what is there
    for table, raw in rows:
        for needle in needles:
            assert needle not in raw, (table, needle)


def test_account_without_deletion_time_is_due_at_once(store: Store) -> None:
    acct, _, _ = _account(store, "legacy@example.test")
    import msgspec

    store.update_account(acct, lambda a: msgspec.structs.replace(a, status="deleted"))
    assert run_retention(store, NOW).accounts_purged == 1


def _hold_lock(data_dir: str, ready: multiprocessing.synchronize.Event, release: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    with retention_lock(data_dir, blocking=True):
        ready.set()
        release.wait(30)


def test_one_worker_at_a_time_and_once_per_interval(store: Store, tmp_path: Path) -> None:
    _, k1, _ = _account(store, "a@example.test")
    _usage(store, k1, MODEL_A, NOW - USAGE_KEPT - 3 * DAY)
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        # Another process holds the lock: this worker skips instead of waiting or running twice.
        assert run_locked(store, tmp_path, NOW, interval=3600, blocking=False) is None
        assert len(list(store.usage([k1]))) == 1
    finally:
        release.set()
        holder.join(30)
    job = PeriodicRetention(store, tmp_path, interval=3600, clock=lambda: clock[0])
    clock = [float(NOW)]
    first = job.check()
    assert first is not None and first.usage_rows_rolled_up == 1
    clock[0] += 3599  # within the interval: any worker skips
    assert job.check() is None
    clock[0] += 1
    second = job.check()
    assert second is not None and second.usage_rows_rolled_up == 0
