"""The embedded store: one LMDB environment per host, opened inside each worker process after fork.

Why LMDB: readers never block (an auth lookup is one read transaction, a few microseconds), and writers of all
worker processes are serialized by LMDB's own lock, so a read-modify-write of a usage counter inside one write
transaction is exact under any number of workers, with no server to run. Records are msgpack-encoded Structs.

Sub-databases:
    accounts       account_id                         -> AccountRecord
    account_email  email (lower-cased)                 -> account_id
    keys           key_id                             -> KeyRecord
    key_hash       HMAC(pepper, secret)               -> key_id
    account_keys   account_id \\0 key_id                -> b""   (listing and pagination in id order)
    usage          key_id \\0 hour(u64 BE) \\0 model      -> UsageCounter
    account_history account_id \\0 key_id               -> b""   (every key ever made: usage of revoked keys)
    spend          owner \\0 window \\0 start(u64 BE)      -> cost in micro-dollars (budget windows, all four);
                                                          owner: a key id, or an account id (all its keys)
    meta           b"epoch"                           -> u64 BE, bumped by every key/account change
    usage_daily    day(u64 BE) \\0 model                 -> UsageCounter (anonymous: no key or account id)

Why an epoch: workers cache key and account records (the gateway's key cache). Every write that changes a key or
an account bumps `meta/epoch` IN THE SAME write transaction, and a worker compares it (one read) before trusting
its cache, so a revocation, a disabled account or new limits are seen by every worker's next request.

The payment ledger (`LmdbLedger`, tables pay_*) lives in the same environment (`self.ledger`); it owns the
spendable credit balance. Usage flushes debit it in the same write transaction as the usage counters.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import lmdb
import msgspec

from cheapest.store.base import LastManagementKey, QuotaExceeded, StoreError, UsageKey
from cheapest.store.lmdb.ledger import LmdbLedger
from cheapest.store.lmdb.txn import writing
from cheapest.store.payments import SubscriptionView
from cheapest.store.records import AccountRecord, DailyUsage, KeyRecord, UsageCounter, UsageRow
from cheapest.vocabulary import BUDGET_WINDOWS, DAY, KeyKind, window_start

_enc = msgspec.msgpack.Encoder()
_dec_account = msgspec.msgpack.Decoder(AccountRecord)
_dec_key = msgspec.msgpack.Decoder(KeyRecord)


class _KeyState(msgspec.Struct):
    """The fields of a stored KeyRecord that say whether it is usable (the rest is skipped when decoding)."""

    kind: str
    disabled: bool = False
    expires_at: int | None = None


_dec_key_state = msgspec.msgpack.Decoder(_KeyState)
_dec_usage = msgspec.msgpack.Decoder(UsageCounter)
_HOUR = struct.Struct(">Q")
_EPOCH_KEY = b"epoch"
_dec_int = msgspec.msgpack.Decoder(int)
_PAGE = 1000  # records per read transaction when listing a whole table


def _usage_key(key_id: str, model: str, hour: int) -> bytes:
    return key_id.encode() + b"\0" + _HOUR.pack(hour) + b"\0" + model.encode()


class LmdbStore:
    def __init__(self, path: str | os.PathLike[str], map_size: int = 1 << 30) -> None:
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
        # Room for these tables, the payment ledger's (LmdbLedger.DATABASES) and a few more. `mode`: the
        # directory 0700, data.mdb and lock.mdb 0600 (LMDB drops the execute bits), whatever the umask.
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=32, subdir=True, readahead=False, mode=0o700)
        self._accounts = self.env.open_db(b"accounts")
        self._email = self.env.open_db(b"account_email")
        self._keys = self.env.open_db(b"keys")
        self._hash = self.env.open_db(b"key_hash")
        self._account_keys = self.env.open_db(b"account_keys")
        self._usage = self.env.open_db(b"usage")
        self._history = self.env.open_db(b"account_history")
        self._spend = self.env.open_db(b"spend")
        self._meta = self.env.open_db(b"meta")
        self._daily = self.env.open_db(b"usage_daily")
        self.ledger = LmdbLedger(self.env, AccountMirror(self))

    def close(self) -> None:
        self.env.close()

    # --- change epoch -----------------------------------------------------------------------------------------
    def epoch(self) -> int:
        with self.env.begin() as txn:
            raw = txn.get(_EPOCH_KEY, db=self._meta)
        return 0 if raw is None else _HOUR.unpack(raw)[0]

    def bump_epoch(self, txn: lmdb.Transaction) -> None:
        """Call inside every write transaction that changes a key or an account."""
        raw = txn.get(_EPOCH_KEY, db=self._meta)
        txn.put(_EPOCH_KEY, _HOUR.pack((0 if raw is None else _HOUR.unpack(raw)[0]) + 1), db=self._meta)

    # --- accounts ---------------------------------------------------------------------------------------------
    def create_account(self, account: AccountRecord) -> None:
        with writing(self.env) as txn:
            if not txn.put(account.email.lower().encode(), account.id.encode(), db=self._email, overwrite=False):
                raise StoreError("an account with this email already exists")
            if not txn.put(account.id.encode(), _enc.encode(account), db=self._accounts, overwrite=False):
                raise StoreError("account id collision")
            self.bump_epoch(txn)

    def get_account(self, account_id: str) -> AccountRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(account_id.encode(), db=self._accounts)
        return None if raw is None else _dec_account.decode(raw)

    def find_account_by_email(self, email: str) -> AccountRecord | None:
        with self.env.begin() as txn:
            account_id = txn.get(email.lower().encode(), db=self._email)
            raw = None if account_id is None else txn.get(account_id, db=self._accounts)
        return None if raw is None else _dec_account.decode(raw)

    def put_account(self, account: AccountRecord) -> None:
        with writing(self.env) as txn:
            txn.put(account.id.encode(), _enc.encode(account), db=self._accounts)
            self.bump_epoch(txn)

    def update_account(self, account_id: str, change: Callable[[AccountRecord], AccountRecord]) -> AccountRecord | None:
        """Read-modify-write in ONE write transaction (no lost updates between workers); None if unknown."""
        with writing(self.env) as txn:
            raw = txn.get(account_id.encode(), db=self._accounts)
            if raw is None:
                return None
            new = change(_dec_account.decode(raw))
            if new.id != account_id or new.email != _dec_account.decode(raw).email:
                raise StoreError("an account's id and email are immutable here")
            txn.put(account_id.encode(), _enc.encode(new), db=self._accounts)
            self.bump_epoch(txn)
        return new

    def list_accounts(self) -> Iterator[AccountRecord]:
        """Every account, a page per read transaction: memory stays bounded and no reader is held open while the
        caller works on a page."""
        after = b""
        while True:
            with self.env.begin() as txn, txn.cursor(db=self._accounts) as cur:
                ok = cur.set_range(after) if after else cur.first()
                if ok and after and cur.key() == after:
                    ok = cur.next()
                page: list[AccountRecord] = []
                while ok and len(page) < _PAGE:
                    page.append(_dec_account.decode(cur.value()))
                    after = bytes(cur.key())
                    ok = cur.next()
            yield from page
            if not ok:
                return

    def count_accounts(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._accounts)["entries"])

    # --- keys -------------------------------------------------------------------------------------------------
    def create_key(self, key: KeyRecord, max_keys: int | None = None) -> None:
        with writing(self.env) as txn:
            if txn.get(key.account_id.encode(), db=self._accounts) is None:
                raise StoreError("unknown account")
            if max_keys is not None and self._live_keys(txn, key.account_id, stop_at=max_keys) >= max_keys:
                raise QuotaExceeded(f"the account already has {max_keys} keys")
            if not txn.put(key.hash, key.id.encode(), db=self._hash, overwrite=False):
                raise StoreError("key hash collision")
            txn.put(key.id.encode(), _enc.encode(key), db=self._keys, overwrite=False)
            txn.put(key.account_id.encode() + b"\0" + key.id.encode(), b"", db=self._account_keys)
            txn.put(key.account_id.encode() + b"\0" + key.id.encode(), b"", db=self._history)
            self.bump_epoch(txn)

    def get_key(self, key_id: str) -> KeyRecord | None:
        with self.env.begin() as txn:
            raw = txn.get(key_id.encode(), db=self._keys)
        return None if raw is None else _dec_key.decode(raw)

    def find_key_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        with self.env.begin() as txn:
            key_id = txn.get(key_hash, db=self._hash)
            raw = None if key_id is None else txn.get(key_id, db=self._keys)
        return None if raw is None else _dec_key.decode(raw)

    def put_key(self, key: KeyRecord) -> None:
        """Replace a key's metadata (name, limits, disabled, expiry); its hash and owner never change."""
        with writing(self.env) as txn:
            old = txn.get(key.id.encode(), db=self._keys)
            if old is None:
                raise StoreError("unknown key")
            prev = _dec_key.decode(old)
            if prev.hash != key.hash or prev.account_id != key.account_id:
                raise StoreError("a key's hash and account are immutable")
            txn.put(key.id.encode(), _enc.encode(key), db=self._keys)
            self.bump_epoch(txn)

    def update_key(self, key_id: str, account_id: str,
                   change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        """Read-modify-write of one of `account_id`'s keys in ONE write transaction, so two concurrent PATCHes
        of different fields on different workers both land. None if the key is unknown or not the account's."""
        with writing(self.env) as txn:
            raw = txn.get(key_id.encode(), db=self._keys)
            if raw is None:
                return None
            old = _dec_key.decode(raw)
            if old.account_id != account_id:
                return None
            new = change(old)
            if (new.id, new.hash, new.account_id, new.kind) != (old.id, old.hash, old.account_id, old.kind):
                raise StoreError("a key's id, hash, account and kind are immutable")
            txn.put(key_id.encode(), _enc.encode(new), db=self._keys)
            self.bump_epoch(txn)
        return new

    def delete_key(self, key_id: str, keep_last_management: bool = False) -> bool:
        with writing(self.env) as txn:
            raw = txn.get(key_id.encode(), db=self._keys)
            if raw is None:
                return False
            key = _dec_key.decode(raw)
            if keep_last_management and key.kind == "mk" and not any(
                    k.id != key_id for k in self._keys_of(txn, key.account_id, "mk", 2)):
                raise LastManagementKey("this is the account's only management key")
            txn.delete(key.hash, db=self._hash)
            txn.delete(key_id.encode(), db=self._keys)
            txn.delete(key.account_id.encode() + b"\0" + key_id.encode(), db=self._account_keys)
            self.bump_epoch(txn)
        return True  # usage rows (and the account_history entry) stay: they are the account's billing history

    def list_keys(self, account_id: str, after: str | None = None, limit: int = 100,
                  kind: KeyKind | None = None) -> list[KeyRecord]:
        with self.env.begin() as txn:
            return list(self._keys_of(txn, account_id, kind, limit, after))

    def count_keys(self, account_id: str, kind: KeyKind | None, now: float) -> tuple[int, int]:
        """One read transaction over the account's index, decoding only what usability needs."""
        total = usable = 0
        prefix = account_id.encode() + b"\0"
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._account_keys)
            if not cur.set_range(prefix):
                return 0, 0
            for k in cur.iternext(values=False):
                if not k.startswith(prefix):
                    break
                raw = txn.get(k[len(prefix):], db=self._keys)
                if raw is None:
                    continue
                state = _dec_key_state.decode(raw)
                if kind is None or state.kind == kind:
                    total += 1
                    usable += not state.disabled and (state.expires_at is None or now < state.expires_at)
        return total, usable

    def _keys_of(self, txn: lmdb.Transaction[bytes], account_id: str, kind: KeyKind | None, limit: int,
                 after: str | None = None) -> Iterator[KeyRecord]:
        """The account's live keys (of `kind`) in id order after `after`, at most `limit`."""
        prefix = account_id.encode() + b"\0"
        cur = txn.cursor(db=self._account_keys)
        if limit <= 0 or not cur.set_range(prefix + (after.encode() + b"\0" if after else b"")):
            return
        n = 0
        for k in cur.iternext(values=False):
            if not k.startswith(prefix):
                return
            raw = txn.get(k[len(prefix):], db=self._keys)
            if raw is not None:
                key = _dec_key.decode(raw)
                if kind is None or key.kind == kind:
                    yield key
                    n += 1
                    if n >= limit:
                        return

    def _live_keys(self, txn: lmdb.Transaction[bytes], account_id: str, stop_at: int) -> int:
        """How many live keys the account has, counting no further than `stop_at` (the index alone, no decode)."""
        prefix = account_id.encode() + b"\0"
        cur = txn.cursor(db=self._account_keys)
        n = 0
        if cur.set_range(prefix):
            for k in cur.iternext(values=False):
                if not k.startswith(prefix) or n >= stop_at:
                    break
                n += 1
        return n

    def key_history(self, account_id: str) -> list[str]:
        """Ids of every key the account ever had, revoked ones included (their usage is still billed)."""
        prefix = account_id.encode() + b"\0"
        with self.env.begin(db=self._history) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return []
            return [k[len(prefix):].decode() for k in cur.iternext(values=False) if k.startswith(prefix)]

    # --- usage ------------------------------------------------------------------------------------------------
    def add_usage(self, deltas: Mapping[UsageKey, UsageCounter], debits: Mapping[str, int] | None = None,
                  flush_id: str | None = None, owners: Mapping[str, str] | None = None) -> None:
        """Add per-worker deltas to the stored totals, the budget-window spend of each key (and of its account,
        when `owners` names it), and debit the credit-funded accounts' balances, all in ONE write transaction
        (exact across workers). `flush_id` is not needed here: a local commit either happened or raised."""
        if not deltas and not debits:
            return
        owners = owners or {}
        with writing(self.env) as txn:
            for (key_id, model, hour), delta in deltas.items():
                k = _usage_key(key_id, model, hour)
                raw = txn.get(k, db=self._usage)
                total = UsageCounter() if raw is None else _dec_usage.decode(raw)
                total.add(delta)
                txn.put(k, _enc.encode(total), db=self._usage)
                if delta.cost_micro:
                    self._add_spend(txn, key_id, hour, delta.cost_micro)
                    account_id = owners.get(key_id)
                    if account_id is not None:
                        self._add_spend(txn, account_id, hour, delta.cost_micro)
            for account_id, micro in (debits or {}).items():
                if micro:
                    self.ledger.debit_in(txn, account_id, micro)

    def _add_spend(self, txn: lmdb.Transaction, owner_id: str, hour: int, micro: int) -> None:
        # Every window is a whole number of hours and epoch-aligned, so an hourly delta falls in exactly one
        # window of each length. All four are kept, so changing a key's window later starts from exact spend.
        for window, length in BUDGET_WINDOWS.items():
            start = window_start(window, hour)
            k = _spend_key(owner_id, window, start)
            raw = txn.get(k, db=self._spend)
            if raw is None and start >= length:  # a new window: the one before it is over, drop it
                txn.delete(_spend_key(owner_id, window, start - length), db=self._spend)
            txn.put(k, _enc.encode((0 if raw is None else _dec_int.decode(raw)) + micro), db=self._spend)

    def window_spend(self, owner_id: str, window: str, start: int) -> int:
        """Micro-dollars a key or an account spent in the budget window that began at `start` (flushed usage)."""
        with self.env.begin(db=self._spend) as txn:
            raw = txn.get(_spend_key(owner_id, window, start))
        return 0 if raw is None else _dec_int.decode(raw)

    def usage(self, key_ids: Iterable[str], start: int = 0, end: int | None = None) -> Iterator[UsageRow]:
        """Rows of the given keys with start <= hour < end, by key then hour."""
        rows: list[UsageRow] = []
        with self.env.begin(db=self._usage) as txn:
            cur = txn.cursor()
            for key_id in key_ids:
                prefix = key_id.encode() + b"\0"
                if not cur.set_range(prefix + _HOUR.pack(max(start, 0))):
                    continue
                for k, v in cur:
                    if not k.startswith(prefix):
                        break
                    hour = _HOUR.unpack_from(k, len(prefix))[0]
                    if end is not None and hour >= end:
                        break
                    model = k[len(prefix) + 9:].decode()
                    rows.append(UsageRow(key_id, model, hour, _dec_usage.decode(v)))
        return iter(rows)

    # --- data lifecycle: anonymous aggregates and erasure (see privacy/) ---------------------------------------
    def _fold_usage(self, txn: lmdb.Transaction[bytes], cur: lmdb.Cursor[bytes], stop: Callable[[bytes], bool],
                    keep: Callable[[int], bool], limit: int) -> tuple[int, bool]:
        """From the cursor's row on, move rows into their day's aggregate (deleting each in this same
        transaction) until `stop(key)`, skipping rows whose hour `keep`s them. -> (moved, cursor still on a row)."""
        moved = 0
        ok = bool(cur.key())
        while ok and moved < limit:
            k = cur.key()
            if stop(k):
                break
            i = k.index(b"\0")
            hour = _HOUR.unpack_from(k, i + 1)[0]
            if keep(hour):
                ok = cur.next()
                continue
            day_key = _HOUR.pack(hour // DAY * DAY) + b"\0" + k[i + 10:]
            raw = txn.get(day_key, db=self._daily)
            total = UsageCounter() if raw is None else _dec_usage.decode(raw)
            total.add(_dec_usage.decode(cur.value()))
            txn.put(day_key, _enc.encode(total), db=self._daily)
            ok = cur.delete() and bool(cur.key())
            moved += 1
        return moved, ok

    def roll_up_usage(self, before: int, batch: int = 10_000) -> int:
        """Fold every usage row of an hour before `before` into per-day, per-model aggregates without key or
        account ids. Write transactions of at most `batch` rows keep other workers' flushes from waiting long."""
        moved, start = 0, b""
        while True:
            with writing(self.env) as txn:
                cur = txn.cursor(db=self._usage)
                if not (cur.set_range(start) if start else cur.first()):
                    return moved
                n, more = self._fold_usage(txn, cur, lambda k: False, lambda hour: hour >= before, batch)
                start = cur.key() if more else b""
            moved += n
            if not more:
                return moved

    def daily_usage(self, start: int = 0, end: int | None = None) -> Iterator[DailyUsage]:
        """Anonymous aggregates of days start <= day < end, by day then model."""
        rows: list[DailyUsage] = []
        with self.env.begin(db=self._daily) as txn:
            cur = txn.cursor()
            if cur.set_range(_HOUR.pack(max(start, 0))):
                for k, v in cur:
                    day = _HOUR.unpack_from(k)[0]
                    if end is not None and day >= end:
                        break
                    rows.append(DailyUsage(day, k[9:].decode(), _dec_usage.decode(v)))
        return iter(rows)

    def purge_account(self, account_id: str) -> bool:
        """Erase an account in ONE write transaction: its record and email, every key it ever had (hashes,
        indexes, budget spend), its payment references (the ledger's `forget_accounts_in`); its usage is folded
        into the anonymous daily aggregates. False if there is no such account."""
        aid = account_id.encode()
        prefix = aid + b"\0"
        with writing(self.env) as txn:
            raw = txn.get(aid, db=self._accounts)
            if raw is None:
                return False
            account = _dec_account.decode(raw)
            key_ids: set[bytes] = set()
            for db in (self._history, self._account_keys):
                with txn.cursor(db=db) as cur:
                    ok = cur.set_range(prefix)
                    while ok and cur.key().startswith(prefix):
                        key_ids.add(cur.key()[len(prefix):])
                        ok = cur.delete() and bool(cur.key())
            for kid in sorted(key_ids | {aid}):  # the account's own budget spend goes with its keys'
                key_raw = None if kid == aid else txn.get(kid, db=self._keys)
                if key_raw is not None:
                    txn.delete(_dec_key.decode(key_raw).hash, db=self._hash)
                    txn.delete(kid, db=self._keys)
                kp = kid + b"\0"
                with txn.cursor(db=self._usage) as cur:
                    if cur.set_range(kp):
                        self._fold_usage(txn, cur, lambda k: not k.startswith(kp), lambda hour: False, 1 << 62)
                with txn.cursor(db=self._spend) as cur:
                    ok = cur.set_range(kp)
                    while ok and cur.key().startswith(kp):
                        ok = cur.delete() and bool(cur.key())
            email = account.email.lower().encode()
            if txn.get(email, db=self._email) == aid:
                txn.delete(email, db=self._email)
            txn.delete(aid, db=self._accounts)
            self.ledger.forget_accounts_in(txn, [account_id])
            self.bump_epoch(txn)
        return True


def _spend_key(owner_id: str, window: str, start: int) -> bytes:
    return owner_id.encode() + b"\0" + window.encode() + b"\0" + _HOUR.pack(start)


class AccountMirror:
    """The ledger's view of the accounts: Stripe subscription state is mirrored into the account record (plan,
    status, period end) inside the ledger's own write transaction, with the epoch bumped so every worker sees it
    at once. Credits are not mirrored: the ledger owns the balance."""

    def __init__(self, store: LmdbStore) -> None:
        self.store = store

    def holds_account(self, txn: lmdb.Transaction, account_id: str) -> bool:
        raw = txn.get(account_id.encode(), db=self.store._accounts)
        return raw is not None and _dec_account.decode(raw).status != "deleted"

    def on_subscription(self, txn: lmdb.Transaction, account_id: str, view: SubscriptionView) -> None:
        store = self.store
        raw = txn.get(account_id.encode(), db=store._accounts)
        if raw is None:
            return
        acct = _dec_account.decode(raw)
        new = msgspec.structs.replace(acct, plan=view.plan or acct.plan, subscription_status=view.status or "none",
                                      period_end=view.current_period_end)
        if new != acct:
            txn.put(account_id.encode(), _enc.encode(new), db=store._accounts)
            store.bump_epoch(txn)
