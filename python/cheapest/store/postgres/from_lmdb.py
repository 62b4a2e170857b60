"""`cheapest store migrate --from DIR`: copy one host's LMDB store into PostgreSQL, so an operator can grow from
one host to many without losing accounts, keys, balances or history.

Everything is copied as it is stored - accounts, keys (hashes), every key an account ever had, hourly usage, the
anonymous daily aggregates, budget-window spend, and the whole payment ledger (once-only event and transfer
records, journal, balances, subscription state, Stripe links) - in ONE transaction, each row inserted with
ON CONFLICT DO NOTHING: a second run copies nothing again, and a run that fails leaves PostgreSQL as it was.
Stop the LMDB host first: what it writes during the copy is not copied.

Keys are stored as HMAC(pepper, secret): every host must use the old host's pepper (`<data>/secrets/pepper`, or
its configured `key_pepper`), which `check_pepper` verifies before anything is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from cheapest.store.lmdb import LmdbStore
from cheapest.store.payments import ChainClaim, EventRecord, JournalEntry, SubscriptionState
from cheapest.store.postgres.rows import INSERT_ACCOUNT, KEY, account_values, json_encoder, key_values
from cheapest.store.postgres.store import PostgresStore
from cheapest.store.records import AccountRecord, KeyRecord, UsageCounter

_int = msgspec.msgpack.Decoder(int)


class MigrateReport(msgspec.Struct):
    """Per table: rows read from LMDB, and rows that were new to PostgreSQL (0 on a second run)."""

    read: dict[str, int] = {}
    copied: dict[str, int] = {}


def check_pepper(source_dir: Path, pepper: bytes) -> str | None:
    """Why `pepper` cannot verify the old host's keys, or None. (A host that had `key_pepper` configured has no
    pepper file; that pepper cannot be checked here.)"""
    path = source_dir / "secrets" / "pepper"
    if path.exists() and path.read_bytes() != pepper:
        return (f"keys in {source_dir} were hashed with the pepper in {path}; give every host that pepper (copy the "
                "file to <data_dir>/secrets/pepper on each host) before migrating")
    return None


def _records(src: LmdbStore, db: Any) -> Iterator[tuple[bytes, bytes]]:
    with src.env.begin(db=db) as txn:
        yield from ((bytes(k), bytes(v)) for k, v in txn.cursor())


def _split(key: bytes, parts: int) -> list[bytes]:
    return key.split(b"\0", parts - 1)


def copy_from_lmdb(src: LmdbStore, dst: PostgresStore) -> MigrateReport:
    report = MigrateReport()
    dec_account = msgspec.msgpack.Decoder(AccountRecord)
    dec_key = msgspec.msgpack.Decoder(KeyRecord)
    dec_usage = msgspec.msgpack.Decoder(UsageCounter)
    ledger = src.ledger

    tables: list[tuple[str, str, Callable[[], Iterator[tuple[Any, ...]]]]] = [
        ("accounts", INSERT_ACCOUNT,
         lambda: (account_values(dec_account.decode(v)) for _, v in _records(src, src._accounts))),
        ("keys", f"INSERT INTO keys ({KEY}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
         lambda: (key_values(dec_key.decode(v)) for _, v in _records(src, src._keys))),
        ("key_history", "INSERT INTO key_history (account_id, key_id) VALUES (%s, %s)",
         lambda: (tuple(p.decode() for p in _split(k, 2)) for k, _ in _records(src, src._history))),
        ("usage", "INSERT INTO usage (key_id, hour, model, requests, prompt_tokens, completion_tokens, cost_micro) "
                  "VALUES (%s, %s, %s, %s, %s, %s, %s)",
         lambda: (_usage_row(k, dec_usage.decode(v)) for k, v in _records(src, src._usage))),
        ("usage_daily", "INSERT INTO usage_daily (day, model, requests, prompt_tokens, completion_tokens, cost_micro) "
                        "VALUES (%s, %s, %s, %s, %s, %s)",
         lambda: ((int.from_bytes(k[:8], "big"), k[9:].decode(), *_counter(dec_usage.decode(v)))
                  for k, v in _records(src, src._daily))),
        ("spend", "INSERT INTO spend (key_id, window_len, start, micro) VALUES (%s, %s, %s, %s)",
         lambda: (_spend_row(k, _int.decode(v)) for k, v in _records(src, src._spend))),
        ("pay_events", "INSERT INTO pay_events (event_id, type, created, received_at, account_id) "
                       "VALUES (%s, %s, %s, %s, %s)",
         lambda: ((k.decode(), *msgspec.structs.astuple(msgspec.msgpack.decode(v, type=EventRecord)))
                  for k, v in _records(src, ledger._events))),
        ("pay_chain_claims", "INSERT INTO pay_chain_claims (chain_id, tx_hash, log_index, account_id, amount_units, "
                             "sender, block_number, claimed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
         lambda: (_claim_row(k, msgspec.msgpack.decode(v, type=ChainClaim)) for k, v in _records(src, ledger._claims))),
        ("pay_subscriptions", "INSERT INTO pay_subscriptions (account_id, subscription_id, state) VALUES (%s, %s, %s)",
         lambda: ((*(p.decode() for p in (k.split(b"\0", 1) + [b""])[:2]),
                   json_encoder.encode(msgspec.msgpack.decode(v, type=SubscriptionState)).decode())
                  for k, v in _records(src, ledger._subs))),
        ("pay_balances", "INSERT INTO pay_balances (account_id, micro) VALUES (%s, %s)",
         lambda: ((k.decode(), _int.decode(v)) for k, v in _records(src, ledger._credits))),
        ("pay_journal", "INSERT INTO pay_journal (account_id, ref, kind, at, micro_usd, amount_minor, currency) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
         lambda: ((_split(k, 2)[0].decode(), *msgspec.structs.astuple(msgspec.msgpack.decode(v, type=JournalEntry)))
                  for k, v in _records(src, ledger._journal))),
        ("pay_links", "INSERT INTO pay_links (provider_id, account_id) VALUES (%s, %s)",
         lambda: ((k.decode(), v.decode()) for k, v in _records(src, ledger._links))),
    ]

    def work(conn: Any) -> None:
        for name, insert, rows in tables:
            batch = list(rows())
            report.read[name] = len(batch)
            copied = 0
            with conn.cursor() as cur:
                for row in batch:
                    cur.execute(insert + " ON CONFLICT DO NOTHING", row)
                    copied += cur.rowcount
            report.copied[name] = copied
        conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'epoch'")  # running hosts drop their caches

    dst.db.write(work)
    dst.epoch()
    return report


def _counter(c: UsageCounter) -> tuple[int, int, int, int]:
    return c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micro


def _usage_row(key: bytes, c: UsageCounter) -> tuple[Any, ...]:
    key_id, rest = key.split(b"\0", 1)
    return (key_id.decode(), int.from_bytes(rest[:8], "big"), rest[9:].decode(), *_counter(c))


def _spend_row(key: bytes, micro: int) -> tuple[Any, ...]:
    key_id, window, start = key.split(b"\0", 2)
    return key_id.decode(), window.decode(), int.from_bytes(start, "big"), micro


def _claim_row(key: bytes, c: ChainClaim) -> tuple[Any, ...]:
    chain_id, tx_hash, log_index = key.decode().split(":")
    return int(chain_id), tx_hash, int(log_index), *msgspec.structs.astuple(c)
