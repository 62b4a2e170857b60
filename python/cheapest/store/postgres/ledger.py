"""The payment ledger in PostgreSQL: what was paid, by whom, credited exactly once - across every host.

Exactly once: the record that makes a change happen once is a row under a unique key, inserted with ON CONFLICT
DO NOTHING in the SAME transaction as the change (tables pay_*, see migrations/):

  pay_events        Stripe event id                 each event applied once
  pay_chain_claims  (chain, tx hash, log index)     each transfer credited once
  pay_journal       (account, reference)            each payment or credit journaled (and credited) once

Two hosts applying the same event at once: the second INSERT waits on the first's uncommitted row, then finds it
committed and changes nothing. Balances (pay_balances) move only by atomic `micro = micro + delta` upserts. An
event for an account locks the account's row first, as a purge does, so a late event either lands before the
purge (and is erased with it) or finds no account; taking that lock first everywhere (then ledger rows, the epoch
last) keeps concurrent steps from deadlocking.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from cheapest.store.payments import (
    ChainClaim, ClaimOutcome, EventOutcome, EventRecord, JournalEntry, PaymentEvent, SubscriptionState,
    SubscriptionView, TransferClaim, credit_entry, governing,
)
from cheapest.store.postgres.connection import Conn
from cheapest.store.postgres.rows import ACCOUNT, account_of

if TYPE_CHECKING:
    from cheapest.store.postgres.store import Changes, PostgresStore

_json = msgspec.json.Encoder()
_JOURNAL = "ref, kind, at, micro_usd, amount_minor, currency"
_CLAIM = "account_id, amount_units, sender, block_number, claimed_at"


class PostgresLedger:
    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        self.db = store.db

    # -- reads ----------------------------------------------------------------------------------------------
    def balance(self, account_id: str) -> int:
        return self.db.read(lambda c: self._balance(c, account_id))

    def journal(self, account_id: str) -> list[JournalEntry]:
        rows = self.db.read(lambda c: c.execute(
            f"SELECT {_JOURNAL} FROM pay_journal WHERE account_id = %s ORDER BY at, ref", (account_id,)).fetchall())
        return [JournalEntry(*r) for r in rows]

    def subscription(self, account_id: str) -> SubscriptionView | None:
        """The subscription the account's plan and standing follow (`governing` over all of them)."""
        return governing(self.subscriptions(account_id))

    def subscriptions(self, account_id: str) -> list[SubscriptionView]:
        return [state.view() for state in self.db.read(lambda c: self._subscriptions(c, account_id)).values()]

    def event(self, event_id: str) -> EventRecord | None:
        row = self.db.read(lambda c: c.execute(
            "SELECT type, created, received_at, account_id FROM pay_events WHERE event_id = %s",
            (event_id,)).fetchone())
        return None if row is None else EventRecord(*row)

    def chain_claim(self, chain_id: int, tx_hash: str, log_index: int) -> ChainClaim | None:
        return self.db.read(lambda c: self._chain_claim(c, chain_id, tx_hash, log_index))

    # -- money ----------------------------------------------------------------------------------------------
    def credit(self, account_id: str, micro_usd: int, ref: str, kind: str = "credit") -> bool:
        return self.record_payment(account_id, credit_entry(micro_usd, ref, kind))

    def debit(self, account_id: str, micro_usd: int) -> int:
        if micro_usd < 0:
            raise ValueError("a debit must not be negative")
        return self.db.write(lambda c: self.add_in(c, [(account_id, -micro_usd)])[0])

    def record_payment(self, account_id: str, entry: JournalEntry) -> bool:
        return bool(self.db.write(lambda c: self._record_payment(c, account_id, entry)))

    # -- subscriptions and provider events ------------------------------------------------------------------
    def merge_subscription(self, account_id: str, updates: dict[str, str | int | None], version: int) -> bool:
        return bool(self.store.change(lambda tx: self._merge_subscription(tx, account_id, updates, version)))

    def record_payment_event(self, event: PaymentEvent) -> EventOutcome:
        def work(tx: Changes) -> EventOutcome:
            conn = tx.conn
            account = event.account_id
            for provider_id in event.provider_ids:
                if account is None:
                    row = conn.execute("SELECT account_id FROM pay_links WHERE provider_id = %s",
                                       (provider_id,)).fetchone()
                    account = None if row is None else row[0]
            if account is not None:  # locked first, as every step that changes an account does: no deadlocks
                row = conn.execute("SELECT status FROM accounts WHERE id = %s FOR UPDATE", (account,)).fetchone()
                if row is None or row[0] == "deleted":
                    account = None  # deleted or purged: a late event must not bring its payment references back
            recorded = conn.execute(
                "INSERT INTO pay_events (event_id, type, created, received_at, account_id) VALUES "
                "(%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                (event.event_id, event.type, event.created, int(time.time()), account)).fetchone() is not None
            early = event.settled_early(recorded, account)
            if early is not None:
                return early
            assert account is not None
            for provider_id in event.provider_ids:  # first writer wins
                conn.execute("INSERT INTO pay_links (provider_id, account_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                             (provider_id, account))
            changed = self._merge_subscription(tx, account, event.subscription, event.created)
            if event.payment is not None:
                changed = self._record_payment(conn, account, event.payment) or changed
            return EventOutcome("applied" if changed else "unchanged", account)

        outcome: EventOutcome = self.store.change(work)
        return outcome

    def claim_transfers(self, account_id: str, claims: Sequence[TransferClaim]) -> ClaimOutcome:
        def work(conn: Conn) -> ClaimOutcome:
            credited = others = 0
            for c in claims:
                claim = c.claim
                if conn.execute(
                        f"INSERT INTO pay_chain_claims (chain_id, tx_hash, log_index, {_CLAIM}) VALUES "
                        "(%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                        (c.chain_id, c.tx_hash.lower(), c.log_index, claim.account_id, claim.amount_units,
                         claim.sender, claim.block_number, claim.claimed_at)).fetchone() is not None:
                    self._record_payment(conn, account_id, c.payment)
                    credited += c.payment.micro_usd
                else:
                    held = self._chain_claim(conn, c.chain_id, c.tx_hash, c.log_index)
                    if held is not None and held.account_id != account_id:
                        others += 1
            return ClaimOutcome(credited, others, self._balance(conn, account_id))

        outcome: ClaimOutcome = self.db.write(work)
        return outcome

    # -- inside the store's own transactions ----------------------------------------------------------------
    def add_in(self, conn: Conn, deltas: Sequence[tuple[str, int]]) -> list[int]:
        """Add each (account, micro-dollars) to its balance, atomically; returns the new balances. Callers pass
        them in account order, so concurrent transactions lock balances in one order."""
        rows = conn.execute(
            "INSERT INTO pay_balances (account_id, micro) SELECT * FROM unnest(%s::text[], %s::bigint[]) "
            "ON CONFLICT (account_id) DO UPDATE SET micro = pay_balances.micro + excluded.micro RETURNING micro",
            ([a for a, _ in deltas], [m for _, m in deltas])).fetchall()
        return [int(r[0]) for r in rows]

    def forget_accounts_in(self, conn: Conn, account_ids: Collection[str]) -> int:
        """Erase accounts' payment references (GDPR erasure): journal, subscription state, balance, Stripe
        links. The once-only records (event ids, chain claims) stay, so a replayed event or transfer still
        changes nothing, but lose the account id and a transfer's sender. Returns the records touched."""
        ids = list(account_ids)
        if not ids:
            return 0
        touched = 0
        for table in ("pay_subscriptions", "pay_balances", "pay_journal", "pay_links"):
            touched += conn.execute(f"DELETE FROM {table} WHERE account_id = ANY(%s)", (ids,)).rowcount
        touched += conn.execute("UPDATE pay_events SET account_id = NULL WHERE account_id = ANY(%s)", (ids,)).rowcount
        touched += conn.execute("UPDATE pay_chain_claims SET account_id = '', sender = '' WHERE account_id = ANY(%s)",
                                (ids,)).rowcount
        return touched

    # -- transaction-level steps ----------------------------------------------------------------------------
    @staticmethod
    def _balance(conn: Conn, account_id: str) -> int:
        row = conn.execute("SELECT micro FROM pay_balances WHERE account_id = %s", (account_id,)).fetchone()
        return 0 if row is None else int(row[0])

    @staticmethod
    def _chain_claim(conn: Conn, chain_id: int, tx_hash: str, log_index: int) -> ChainClaim | None:
        row = conn.execute(f"SELECT {_CLAIM} FROM pay_chain_claims WHERE chain_id = %s AND tx_hash = %s AND "
                           "log_index = %s", (chain_id, tx_hash.lower(), log_index)).fetchone()
        return None if row is None else ChainClaim(row[0], int(row[1]), row[2], row[3], row[4])

    def _record_payment(self, conn: Conn, account_id: str, entry: JournalEntry) -> bool:
        if conn.execute(
                f"INSERT INTO pay_journal (account_id, {_JOURNAL}) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING RETURNING 1",
                (account_id, entry.ref, entry.kind, entry.at, entry.micro_usd, entry.amount_minor,
                 entry.currency)).fetchone() is None:
            return False
        if entry.micro_usd:
            self.add_in(conn, [(account_id, entry.micro_usd)])
        return True

    @staticmethod
    def _subscriptions(conn: Conn, account_id: str, lock: bool = False) -> dict[str, SubscriptionState]:
        """The account's subscriptions by id ('' for a first-schema row holding a merged state)."""
        rows: Any = conn.execute("SELECT subscription_id, state FROM pay_subscriptions WHERE account_id = %s "
                                 "ORDER BY subscription_id" + (" FOR UPDATE" if lock else ""), (account_id,)).fetchall()
        return {r[0]: msgspec.convert(r[1], SubscriptionState) for r in rows}

    def _merge_subscription(self, tx: Changes, account_id: str, updates: dict[str, str | int | None],
                            version: int) -> bool:
        """Merge facts into the state of the subscription they name, then mirror what all of the account's
        subscriptions together say into the account record."""
        if not updates:
            return False  # an event stating no subscription fact (a one-off payment): nothing to merge
        conn = tx.conn
        # Lock order everywhere: the account's row, then its ledger rows, the epoch last.
        conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account_id,))
        states = self._subscriptions(conn, account_id, lock=True)
        subscription = updates.get("subscription_id")
        sub = "" if subscription is None else str(subscription)
        old = states.get(sub, SubscriptionState())
        legacy = states.get("")
        if sub and legacy is not None and legacy.view().subscription_id in (None, sub):
            old = old.absorb(legacy)  # a first-schema record of this subscription: it moves here
            conn.execute("DELETE FROM pay_subscriptions WHERE account_id = %s AND subscription_id = ''", (account_id,))
            del states[""]
        new = old.merged(updates, version)
        if new == states.get(sub):
            return False
        conn.execute("INSERT INTO pay_subscriptions (account_id, subscription_id, state) VALUES (%s, %s, %s) "
                     "ON CONFLICT (account_id, subscription_id) DO UPDATE SET state = excluded.state",
                     (account_id, sub, _json.encode(new).decode()))
        states[sub] = new
        view = governing([state.view() for state in states.values()])
        assert view is not None
        self._mirror(tx, account_id, view)
        return True

    def _mirror(self, tx: Changes, account_id: str, view: SubscriptionView) -> None:
        """Mirror the merged subscription into the account record (plan, status, period end), epoch bumped."""
        row = tx.conn.execute(f"SELECT {ACCOUNT} FROM accounts WHERE id = %s FOR UPDATE", (account_id,)).fetchone()
        if row is None:
            return
        acct = account_of(row)
        new = msgspec.structs.replace(acct, plan=view.plan or acct.plan, subscription_status=view.status or "none",
                                      period_end=view.current_period_end)
        if new != acct:
            self.store.write_account(tx, new)
