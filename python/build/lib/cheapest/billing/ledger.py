"""The payment ledger: what was paid, by whom, credited exactly once, in LMDB.

`PaymentLedger(env)` takes an already-open `lmdb.Environment` (opened in the
worker process, after fork) and keeps its own named sub-databases, listed in
`PaymentLedger.DATABASES` (the environment needs `max_dbs` room for them):

  pay_events         Stripe event id -> EventRecord      (each event applied once)
  pay_chain_claims   "chain:tx:log"  -> ChainClaim       (each transfer credited once)
  pay_subscriptions  account id      -> SubscriptionState
  pay_credits        account id      -> credit balance, integer micro-dollars
  pay_journal        account \\0 ref  -> JournalEntry     (payments and credits, by reference)
  pay_links          "sub:"/"cus:" Stripe id -> account id

Exactly once: the record that makes a change happen once (event id, chain
claim, journal reference) is inserted with `overwrite=False` in the SAME write
transaction as the change itself. LMDB has one writer at a time across all
processes of the host, so of two workers applying the same thing, the second
finds the record and changes nothing.

Hooks for the accounts store: pass a `PaymentSink` to mirror credits and
subscription changes into the account record inside the same transaction, or
call `credit(txn, ...)`, `debit(txn, ...)`, `balance(...)`, `subscription(...)`
directly. Nothing here stores card data or any Stripe object verbatim: only
the few fields named in the Structs below.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Protocol

import lmdb
import msgspec

__all__ = [
    "ChainClaim", "EventRecord", "JournalEntry", "PaymentLedger", "PaymentSink", "SubscriptionState",
    "SubscriptionView", "status_rank",
]

# Ties between two facts stamped in the same second are broken by this rank so
# that the outcome never depends on arrival order: a later lifecycle stage wins.
_STATUS_RANK = {
    "incomplete": 0, "trialing": 1, "active": 2, "past_due": 3, "paused": 4, "unpaid": 5,
    "incomplete_expired": 6, "canceled": 7,
}


def status_rank(status: str) -> int:
    return _STATUS_RANK.get(status, -1)


class EventRecord(msgspec.Struct, frozen=True, array_like=True):
    type: str
    created: int
    received_at: int
    account_id: str | None  # None: no account could be resolved; recorded anyway so retries stay no-ops


class ChainClaim(msgspec.Struct, frozen=True, array_like=True):
    account_id: str
    amount_units: int
    sender: str
    block_number: int
    claimed_at: int


class JournalEntry(msgspec.Struct, frozen=True, array_like=True):
    ref: str  # "stripe:invoice:in_..." / "usdc:8453:0x...:3"
    kind: str  # "usdc_topup" / "stripe_invoice_paid" / any credit kind the caller names
    at: int
    micro_usd: int  # credited to the balance (0 for a subscription payment)
    amount_minor: int = 0  # what was paid, in the currency's minor units (Stripe)
    currency: str = "usd"


class _Field(msgspec.Struct, frozen=True, array_like=True):
    value: str | int | None
    version: int  # `created` of the Stripe object state that set it
    tie: int  # tie-break among equal versions (status rank, or the value itself)

    def order(self) -> tuple[int, int, str]:
        return (self.version, self.tie, "" if self.value is None else str(self.value))


class SubscriptionState(msgspec.Struct, frozen=True):
    """Per-field last-writer-wins registers: merging is commutative, associative and idempotent,
    so any delivery order and any number of duplicates converge on the same state."""

    fields: dict[str, _Field] = {}

    def merged(self, updates: dict[str, str | int | None], version: int) -> SubscriptionState:
        out = dict(self.fields)
        for name, value in updates.items():
            candidate = _Field(value, version, _tie(name, value))
            old = out.get(name)
            if old is None or candidate.order() > old.order():
                out[name] = candidate
        return SubscriptionState(out)

    def view(self) -> SubscriptionView:
        def get(name: str) -> str | int | None:
            f = self.fields.get(name)
            return None if f is None else f.value

        return SubscriptionView(
            plan=_str(get("plan")),
            status=_str(get("status")),
            current_period_end=_int(get("current_period_end")),
            subscription_id=_str(get("subscription_id")),
            customer_id=_str(get("customer_id")),
            updated_at=max((f.version for f in self.fields.values()), default=0),
        )


class SubscriptionView(msgspec.Struct, frozen=True):
    """What the accounts store and `GET /api/billing/status` need to know."""

    plan: str | None
    status: str | None  # Stripe's subscription status: active, past_due, canceled, ...
    current_period_end: int | None  # unix seconds
    subscription_id: str | None
    customer_id: str | None
    updated_at: int

    def effective_status(self, now: float, grace_s: int = 86_400) -> str:
        """Stripe's status, except that a paid-up period that ended more than `grace_s` ago reads
        `expired` (a renewal we never heard about). The accounts store refuses `expired`/`canceled`."""
        status = self.status or "none"
        if status in ("active", "trialing", "past_due") and self.current_period_end is not None:
            if now > self.current_period_end + grace_s:
                return "expired"
        if status in ("incomplete_expired", "unpaid"):
            return "expired"
        return status


class PaymentSink(Protocol):
    """Optional mirror into the accounts store, called inside the ledger's write transaction."""

    def on_credit(self, txn: lmdb.Transaction, account_id: str, micro_usd: int, ref: str) -> None: ...

    def on_subscription(self, txn: lmdb.Transaction, account_id: str, view: SubscriptionView) -> None: ...

    def holds_account(self, txn: lmdb.Transaction, account_id: str) -> bool:
        """False for an account that is deleted or already purged: no payment reference is kept for it."""
        ...


_event_enc = msgspec.msgpack.Encoder()
_event_dec = msgspec.msgpack.Decoder(EventRecord)
_claim_dec = msgspec.msgpack.Decoder(ChainClaim)
_journal_dec = msgspec.msgpack.Decoder(JournalEntry)
_sub_dec = msgspec.msgpack.Decoder(SubscriptionState)
_int_dec = msgspec.msgpack.Decoder(int)


class PaymentLedger:
    DATABASES = (b"pay_events", b"pay_chain_claims", b"pay_subscriptions", b"pay_credits", b"pay_journal",
                 b"pay_links")

    def __init__(self, env: lmdb.Environment, sink: PaymentSink | None = None) -> None:
        self.env = env
        self.sink = sink
        with env.begin(write=True) as txn:
            dbs = [env.open_db(name, txn=txn) for name in self.DATABASES]
        self._events, self._claims, self._subs, self._credits, self._journal, self._links = dbs

    def knows_account(self, txn: lmdb.Transaction, account_id: str) -> bool:
        """Whether payments may still be recorded for `account_id` (the accounts store decides, when mirrored)."""
        return True if self.sink is None else self.sink.holds_account(txn, account_id)

    @contextmanager
    def write(self) -> Iterator[lmdb.Transaction]:
        """One write transaction: everything inside commits together or not at all."""
        with self.env.begin(write=True) as txn:
            yield txn

    # -- once-only records -------------------------------------------------------------------------
    def record_event(self, txn: lmdb.Transaction, event_id: str, record: EventRecord) -> bool:
        """False if this Stripe event id was recorded before (then change nothing)."""
        return bool(txn.put(event_id.encode(), _event_enc.encode(record), db=self._events, overwrite=False))

    def event(self, event_id: str) -> EventRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(event_id.encode(), db=self._events)
        return None if raw is None else _event_dec.decode(raw)

    def claim_transfer(self, txn: lmdb.Transaction, chain_id: int, tx_hash: str, log_index: int,
                       claim: ChainClaim) -> bool:
        """False if this (chain, tx hash, log index) was claimed before, by anyone."""
        return bool(txn.put(claim_key(chain_id, tx_hash, log_index), _event_enc.encode(claim), db=self._claims,
                            overwrite=False))

    def chain_claim(self, chain_id: int, tx_hash: str, log_index: int,
                    txn: lmdb.Transaction | None = None) -> ChainClaim | None:
        if txn is None:
            with self.env.begin() as own:
                return self.chain_claim(chain_id, tx_hash, log_index, own)
        raw = txn.get(claim_key(chain_id, tx_hash, log_index), db=self._claims)
        return None if raw is None else _claim_dec.decode(raw)

    # -- money -------------------------------------------------------------------------------------
    def record_payment(self, txn: lmdb.Transaction, account_id: str, entry: JournalEntry) -> bool:
        """Journal a payment/credit under its reference; credits `entry.micro_usd` to the balance.
        False (and nothing changes) if that reference was journaled for this account before."""
        key = account_id.encode() + b"\0" + entry.ref.encode()
        if not txn.put(key, _event_enc.encode(entry), db=self._journal, overwrite=False):
            return False
        if entry.micro_usd:
            self._add(txn, account_id, entry.micro_usd)
            if self.sink is not None:
                self.sink.on_credit(txn, account_id, entry.micro_usd, entry.ref)
        return True

    def credit(self, txn: lmdb.Transaction, account_id: str, micro_usd: int, ref: str,
               kind: str = "credit") -> bool:
        """Add `micro_usd` to the account's balance once per `ref` (e.g. an operator grant)."""
        if micro_usd <= 0:
            raise ValueError("a credit must be positive")
        return self.record_payment(txn, account_id, JournalEntry(ref=ref, kind=kind, at=int(time.time()),
                                                                 micro_usd=micro_usd))

    def debit(self, txn: lmdb.Transaction, account_id: str, micro_usd: int) -> int:
        """Usage cost; may go below zero (cost is known after the request). Returns the new balance."""
        if micro_usd < 0:
            raise ValueError("a debit must not be negative")
        return self._add(txn, account_id, -micro_usd)

    def balance(self, account_id: str, txn: lmdb.Transaction | None = None) -> int:
        if txn is None:
            with self.env.begin() as own:
                return self.balance(account_id, own)
        raw = txn.get(account_id.encode(), db=self._credits)
        return 0 if raw is None else _int_dec.decode(raw)

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

    def _add(self, txn: lmdb.Transaction, account_id: str, delta: int) -> int:
        new = self.balance(account_id, txn) + delta
        txn.put(account_id.encode(), _event_enc.encode(new), db=self._credits)
        return new

    # -- subscriptions -----------------------------------------------------------------------------
    def merge_subscription(self, txn: lmdb.Transaction, account_id: str, updates: dict[str, str | int | None],
                           version: int) -> bool:
        """Merge facts stamped `version` (the Stripe object's `created`); True if anything changed."""
        raw = txn.get(account_id.encode(), db=self._subs)
        old = SubscriptionState() if raw is None else _sub_dec.decode(raw)
        new = old.merged(updates, version)
        if new == old:
            return False
        txn.put(account_id.encode(), _event_enc.encode(new), db=self._subs)
        if self.sink is not None:
            self.sink.on_subscription(txn, account_id, new.view())
        return True

    def subscription(self, account_id: str, txn: lmdb.Transaction | None = None) -> SubscriptionView | None:
        if txn is None:
            with self.env.begin() as own:
                return self.subscription(account_id, own)
        raw = txn.get(account_id.encode(), db=self._subs)
        return None if raw is None else _sub_dec.decode(raw).view()

    def link(self, txn: lmdb.Transaction, stripe_id: str, account_id: str) -> None:
        """Remember which account a Stripe customer/subscription id belongs to (first writer wins)."""
        txn.put(_link_key(stripe_id), account_id.encode(), db=self._links, overwrite=False)

    def linked_account(self, txn: lmdb.Transaction, stripe_id: str) -> str | None:
        raw = txn.get(_link_key(stripe_id), db=self._links)
        return None if raw is None else bytes(raw).decode()

    # -- erasure -----------------------------------------------------------------------------------
    def forget_accounts(self, txn: lmdb.Transaction[bytes], account_ids: Collection[str]) -> int:
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
        with txn.cursor(db=self._journal) as cur:
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
                    txn.put(key, _event_enc.encode(msgspec.structs.replace(event, account_id=None)),
                            db=self._events)
                    touched += 1
        with txn.cursor(db=self._claims) as cur:
            for key, raw in list(cur):
                claim = _claim_dec.decode(raw)
                if claim.account_id.encode() in ids:
                    txn.put(key, _event_enc.encode(msgspec.structs.replace(claim, account_id="", sender="")),
                            db=self._claims)
                    touched += 1
        return touched


def claim_key(chain_id: int, tx_hash: str, log_index: int) -> bytes:
    return f"{chain_id}:{tx_hash.lower()}:{log_index}".encode()


def _link_key(stripe_id: str) -> bytes:
    return stripe_id.encode()


def _tie(name: str, value: str | int | None) -> int:
    if name == "status":
        return status_rank(str(value))
    if isinstance(value, int):
        return value
    return 0  # ids and plan names: `_Field.order` falls back to the text itself


def _str(v: str | int | None) -> str | None:
    return None if v is None else str(v)


def _int(v: str | int | None) -> int | None:
    return None if v is None else int(v)
