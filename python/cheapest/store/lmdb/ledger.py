"""The payment ledger in LMDB: what was paid, by whom, credited exactly once.

It keeps its own named sub-databases in the store's environment (`LmdbLedger.DATABASES`):

  pay_events         Stripe event id -> EventRecord      (each event applied once)
  pay_chain_claims   "chain:tx:log"  -> ChainClaim       (each transfer credited once)
  pay_subscriptions  account id \\0 subscription id -> SubscriptionState (one per subscription; a record
                     under the bare account id is an older version's merged state, folded in when its
                     subscription next changes)
  pay_credits        account id      -> credit balance, integer micro-dollars
  pay_journal        account \\0 ref  -> JournalEntry     (payments and credits, by reference)
  pay_links          Stripe customer/subscription id -> account id

Exactly once: the record that makes a change happen once (event id, chain claim, journal reference) is inserted
with `overwrite=False` in the SAME write transaction as the change itself. LMDB has one writer at a time across
all processes of the host, so of two workers applying the same thing, the second finds the record and changes
nothing. The public methods are the `Ledger` interface, each one write transaction; the `*_in(txn, ...)` methods
let the LMDB store fold a debit or an erasure into its own transaction.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from typing import Protocol

import lmdb
import msgspec

from cheapest.store.lmdb.txn import writing
from cheapest.store.payments import (
    ChainClaim, ClaimOutcome, EventOutcome, EventRecord, JournalEntry, PaymentEvent, SubscriptionState,
    SubscriptionView, TransferClaim, credit_entry, governing,
)

__all__ = ["AccountSink", "LmdbLedger"]


class AccountSink(Protocol):
    """The accounts side of the store, called inside the ledger's write transaction."""

    def on_subscription(self, txn: lmdb.Transaction, account_id: str, view: SubscriptionView) -> None:
        """Mirror the merged subscription into the account record."""
        ...

    def holds_account(self, txn: lmdb.Transaction, account_id: str) -> bool:
        """False for an account that is deleted or already purged: no payment reference is kept for it."""
        ...


_enc = msgspec.msgpack.Encoder()
_event_dec = msgspec.msgpack.Decoder(EventRecord)
_claim_dec = msgspec.msgpack.Decoder(ChainClaim)
_journal_dec = msgspec.msgpack.Decoder(JournalEntry)
_sub_dec = msgspec.msgpack.Decoder(SubscriptionState)
_int_dec = msgspec.msgpack.Decoder(int)


class LmdbLedger:
    DATABASES = (b"pay_events", b"pay_chain_claims", b"pay_subscriptions", b"pay_credits", b"pay_journal",
                 b"pay_links")

    def __init__(self, env: lmdb.Environment, accounts: AccountSink) -> None:
        self.env = env
        self.accounts = accounts
        with writing(env) as txn:
            dbs = [env.open_db(name, txn=txn) for name in self.DATABASES]
        self._events, self._claims, self._subs, self._credits, self._journal, self._links = dbs

    # -- reads ----------------------------------------------------------------------------------------------
    def balance(self, account_id: str) -> int:
        with self.env.begin() as txn:
            return self._balance(txn, account_id)

    def journal(self, account_id: str) -> list[JournalEntry]:
        prefix = account_id.encode() + b"\0"
        out = []
        with self.env.begin() as txn, txn.cursor(db=self._journal) as cur:
            if cur.set_range(prefix):
                for key, raw in cur:
                    if not key.startswith(prefix):
                        break
                    out.append(_journal_dec.decode(raw))
        return sorted(out, key=lambda e: (e.at, e.ref))

    def subscription(self, account_id: str) -> SubscriptionView | None:
        """The subscription the account's plan and standing follow (`governing` over all of them)."""
        with self.env.begin() as txn:
            return governing([state.view() for state in self._subscriptions(txn, account_id).values()])

    def subscriptions(self, account_id: str) -> list[SubscriptionView]:
        with self.env.begin() as txn:
            return [state.view() for state in self._subscriptions(txn, account_id).values()]

    def event(self, event_id: str) -> EventRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(event_id.encode(), db=self._events)
        return None if raw is None else _event_dec.decode(raw)

    def chain_claim(self, chain_id: int, tx_hash: str, log_index: int) -> ChainClaim | None:
        with self.env.begin() as txn:
            return self._chain_claim(txn, claim_key(chain_id, tx_hash, log_index))

    # -- money ----------------------------------------------------------------------------------------------
    def credit(self, account_id: str, micro_usd: int, ref: str, kind: str = "credit") -> bool:
        return self.record_payment(account_id, credit_entry(micro_usd, ref, kind))

    def debit(self, account_id: str, micro_usd: int) -> int:
        with writing(self.env) as txn:
            return self.debit_in(txn, account_id, micro_usd)

    def record_payment(self, account_id: str, entry: JournalEntry) -> bool:
        with writing(self.env) as txn:
            return self._record_payment(txn, account_id, entry)

    # -- subscriptions and provider events ------------------------------------------------------------------
    def merge_subscription(self, account_id: str, updates: dict[str, str | int | None], version: int) -> bool:
        with writing(self.env) as txn:
            return self._merge_subscription(txn, account_id, updates, version)

    def record_payment_event(self, event: PaymentEvent) -> EventOutcome:
        with writing(self.env) as txn:
            account = event.account_id
            for provider_id in event.provider_ids:
                if account is None:
                    account = self._linked_account(txn, provider_id)
            if account is not None and not self.accounts.holds_account(txn, account):
                account = None  # deleted or purged: a late event must not bring its payment references back
            record = EventRecord(type=event.type, created=event.created, received_at=int(time.time()),
                                 account_id=account)
            recorded = txn.put(event.event_id.encode(), _enc.encode(record), db=self._events, overwrite=False)
            early = event.settled_early(recorded, account)
            if early is not None:
                return early
            assert account is not None
            for provider_id in event.provider_ids:  # first writer wins
                txn.put(provider_id.encode(), account.encode(), db=self._links, overwrite=False)
            changed = self._merge_subscription(txn, account, event.subscription, event.created)
            if event.payment is not None:
                changed = self._record_payment(txn, account, event.payment) or changed
        return EventOutcome("applied" if changed else "unchanged", account)

    def claim_transfers(self, account_id: str, claims: Sequence[TransferClaim]) -> ClaimOutcome:
        credited = others = 0
        with writing(self.env) as txn:
            for c in claims:
                key = claim_key(c.chain_id, c.tx_hash, c.log_index)
                if txn.put(key, _enc.encode(c.claim), db=self._claims, overwrite=False):
                    self._record_payment(txn, account_id, c.payment)
                    credited += c.payment.micro_usd
                else:
                    held = self._chain_claim(txn, key)
                    if held is not None and held.account_id != account_id:
                        others += 1
            balance = self._balance(txn, account_id)
        return ClaimOutcome(credited, others, balance)

    # -- inside the store's own transactions ----------------------------------------------------------------
    def debit_in(self, txn: lmdb.Transaction, account_id: str, micro_usd: int) -> int:
        if micro_usd < 0:
            raise ValueError("a debit must not be negative")
        return self._add(txn, account_id, -micro_usd)

    def forget_accounts_in(self, txn: lmdb.Transaction[bytes], account_ids: Collection[str]) -> int:
        """Erase accounts' payment references (GDPR erasure): journal, subscription state, balance, Stripe
        links. The once-only records (event ids, chain claims) stay, so a replayed event or transfer still
        changes nothing, but lose the account id and a transfer's sender. Returns the records touched."""
        ids = {a.encode() for a in account_ids}
        if not ids:
            return 0
        touched = 0
        for account in ids:
            for db in (self._subs, self._credits):
                touched += bool(txn.delete(account, db=db))
        for db in (self._journal, self._subs):
            with txn.cursor(db=db) as cur:
                for account in ids:
                    prefix = account + b"\0"
                    ok = cur.set_range(prefix)
                    while ok and cur.key().startswith(prefix):
                        ok = cur.delete()
                        touched += 1
        with txn.cursor(db=self._links) as cur:
            for key, value in list(cur):
                if bytes(value) in ids:
                    txn.delete(key, db=self._links)
                    touched += 1
        with txn.cursor(db=self._events) as cur:
            for key, raw in list(cur):
                event = _event_dec.decode(raw)
                if event.account_id is not None and event.account_id.encode() in ids:
                    txn.put(key, _enc.encode(msgspec.structs.replace(event, account_id=None)), db=self._events)
                    touched += 1
        with txn.cursor(db=self._claims) as cur:
            for key, raw in list(cur):
                claim = _claim_dec.decode(raw)
                if claim.account_id.encode() in ids:
                    txn.put(key, _enc.encode(msgspec.structs.replace(claim, account_id="", sender="")),
                            db=self._claims)
                    touched += 1
        return touched

    # -- transaction-level steps ----------------------------------------------------------------------------
    def _balance(self, txn: lmdb.Transaction, account_id: str) -> int:
        raw = txn.get(account_id.encode(), db=self._credits)
        return 0 if raw is None else _int_dec.decode(raw)

    def _add(self, txn: lmdb.Transaction, account_id: str, delta: int) -> int:
        new = self._balance(txn, account_id) + delta
        txn.put(account_id.encode(), _enc.encode(new), db=self._credits)
        return new

    def _chain_claim(self, txn: lmdb.Transaction, key: bytes) -> ChainClaim | None:
        raw = txn.get(key, db=self._claims)
        return None if raw is None else _claim_dec.decode(raw)

    def _record_payment(self, txn: lmdb.Transaction, account_id: str, entry: JournalEntry) -> bool:
        key = account_id.encode() + b"\0" + entry.ref.encode()
        if not txn.put(key, _enc.encode(entry), db=self._journal, overwrite=False):
            return False
        if entry.micro_usd:
            self._add(txn, account_id, entry.micro_usd)
        return True

    def _subscriptions(self, txn: lmdb.Transaction[bytes], account_id: str) -> dict[bytes, SubscriptionState]:
        """The account's subscriptions by their record key (an older version's merged record included)."""
        out: dict[bytes, SubscriptionState] = {}
        legacy = txn.get(account_id.encode(), db=self._subs)
        if legacy is not None:
            out[account_id.encode()] = _sub_dec.decode(legacy)
        prefix = account_id.encode() + b"\0"
        with txn.cursor(db=self._subs) as cur:
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                out[bytes(cur.key())] = _sub_dec.decode(cur.value())
                ok = cur.next()
        return out

    def _merge_subscription(self, txn: lmdb.Transaction[bytes], account_id: str, updates: dict[str, str | int | None],
                            version: int) -> bool:
        """Merge facts into the state of the subscription they name, then mirror what all of the account's
        subscriptions together say into the account record."""
        states = self._subscriptions(txn, account_id)
        subscription = updates.get("subscription_id")
        key = account_id.encode() + b"\0" + (b"" if subscription is None else str(subscription).encode())
        old = states.get(key, SubscriptionState())
        legacy = states.get(account_id.encode())
        if legacy is not None and legacy.view().subscription_id in (None, subscription):
            old = old.absorb(legacy)  # an older version's record of this subscription: it moves here
            txn.delete(account_id.encode(), db=self._subs)
            del states[account_id.encode()]
        new = old.merged(updates, version)
        if new == states.get(key):
            return False
        txn.put(key, _enc.encode(new), db=self._subs)
        states[key] = new
        view = governing([state.view() for state in states.values()])
        assert view is not None
        self.accounts.on_subscription(txn, account_id, view)
        return True

    def _linked_account(self, txn: lmdb.Transaction, provider_id: str) -> str | None:
        raw = txn.get(provider_id.encode(), db=self._links)
        return None if raw is None else bytes(raw).decode()


def claim_key(chain_id: int, tx_hash: str, log_index: int) -> bytes:
    return f"{chain_id}:{tx_hash.lower()}:{log_index}".encode()
