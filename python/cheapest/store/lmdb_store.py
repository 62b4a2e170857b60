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
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import lmdb
import msgspec

from cheapest.store.base import StoreError, UsageKey
from cheapest.store.records import AccountRecord, KeyRecord, UsageCounter, UsageRow

_enc = msgspec.msgpack.Encoder()
_dec_account = msgspec.msgpack.Decoder(AccountRecord)
_dec_key = msgspec.msgpack.Decoder(KeyRecord)
_dec_usage = msgspec.msgpack.Decoder(UsageCounter)
_HOUR = struct.Struct(">Q")


def _usage_key(key_id: str, model: str, hour: int) -> bytes:
    return key_id.encode() + b"\0" + _HOUR.pack(hour) + b"\0" + model.encode()


class LmdbStore:
    def __init__(self, path: str | os.PathLike[str], map_size: int = 1 << 30) -> None:
        Path(path).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.env = lmdb.open(str(path), map_size=map_size, max_dbs=8, subdir=True, readahead=False)
        self._accounts = self.env.open_db(b"accounts")
        self._email = self.env.open_db(b"account_email")
        self._keys = self.env.open_db(b"keys")
        self._hash = self.env.open_db(b"key_hash")
        self._account_keys = self.env.open_db(b"account_keys")
        self._usage = self.env.open_db(b"usage")

    def close(self) -> None:
        self.env.close()

    # --- accounts ---------------------------------------------------------------------------------------------
    def create_account(self, account: AccountRecord) -> None:
        with self.env.begin(write=True) as txn:
            if not txn.put(account.email.lower().encode(), account.id.encode(), db=self._email, overwrite=False):
                raise StoreError("an account with this email already exists")
            if not txn.put(account.id.encode(), _enc.encode(account), db=self._accounts, overwrite=False):
                raise StoreError("account id collision")

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
        with self.env.begin(write=True) as txn:
            txn.put(account.id.encode(), _enc.encode(account), db=self._accounts)

    def list_accounts(self) -> Iterator[AccountRecord]:
        with self.env.begin() as txn:
            rows = [_dec_account.decode(v) for _, v in txn.cursor(db=self._accounts)]
        return iter(rows)

    def count_accounts(self) -> int:
        with self.env.begin() as txn:
            return int(txn.stat(self._accounts)["entries"])

    # --- keys -------------------------------------------------------------------------------------------------
    def create_key(self, key: KeyRecord) -> None:
        with self.env.begin(write=True) as txn:
            if txn.get(key.account_id.encode(), db=self._accounts) is None:
                raise StoreError("unknown account")
            if not txn.put(key.hash, key.id.encode(), db=self._hash, overwrite=False):
                raise StoreError("key hash collision")
            txn.put(key.id.encode(), _enc.encode(key), db=self._keys, overwrite=False)
            txn.put(key.account_id.encode() + b"\0" + key.id.encode(), b"", db=self._account_keys)

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
        with self.env.begin(write=True) as txn:
            old = txn.get(key.id.encode(), db=self._keys)
            if old is None:
                raise StoreError("unknown key")
            prev = _dec_key.decode(old)
            if prev.hash != key.hash or prev.account_id != key.account_id:
                raise StoreError("a key's hash and account are immutable")
            txn.put(key.id.encode(), _enc.encode(key), db=self._keys)

    def delete_key(self, key_id: str) -> bool:
        with self.env.begin(write=True) as txn:
            raw = txn.get(key_id.encode(), db=self._keys)
            if raw is None:
                return False
            key = _dec_key.decode(raw)
            txn.delete(key.hash, db=self._hash)
            txn.delete(key_id.encode(), db=self._keys)
            txn.delete(key.account_id.encode() + b"\0" + key_id.encode(), db=self._account_keys)
        return True  # usage rows stay: they are the account's billing history

    def list_keys(self, account_id: str, after: str | None = None, limit: int = 100) -> list[KeyRecord]:
        prefix = account_id.encode() + b"\0"
        out: list[KeyRecord] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self._account_keys)
            start = prefix + (after.encode() + b"\0" if after else b"")
            if not cur.set_range(start):
                return out
            for k in cur.iternext(values=False):
                if not k.startswith(prefix) or len(out) >= limit:
                    break
                raw = txn.get(k[len(prefix):], db=self._keys)
                if raw is not None:
                    out.append(_dec_key.decode(raw))
        return out

    # --- usage ------------------------------------------------------------------------------------------------
    def add_usage(self, deltas: Mapping[UsageKey, UsageCounter]) -> None:
        """Add per-worker deltas to the stored totals in ONE write transaction (exact across workers)."""
        if not deltas:
            return
        with self.env.begin(write=True, db=self._usage) as txn:
            for (key_id, model, hour), delta in deltas.items():
                k = _usage_key(key_id, model, hour)
                raw = txn.get(k)
                total = UsageCounter() if raw is None else _dec_usage.decode(raw)
                total.add(delta)
                txn.put(k, _enc.encode(total))

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
