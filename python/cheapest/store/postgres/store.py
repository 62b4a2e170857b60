"""The store for many hosts: PostgreSQL is the system of record (accounts, keys, usage, budget spend, the ledger),
shared by every worker of every host; the tables are in migrations/.

How it stays exact with N writers: every step is one transaction. Changes of keys and accounts lock the rows they
read (SELECT ... FOR UPDATE) and bump `meta.epoch` in the same transaction. Usage is never read-modify-written:
a flush is one batched upsert (INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x) with its rows in key
order, so concurrent flushes from many hosts lock rows in one order and never deadlock, and the flush's id makes
a retried flush once-only. Once-only payment records are unique keys (see ledger.py).

The change epoch: workers cache key and account records and must see a change on their next request. The epoch
lives in PostgreSQL (bumped inside the change's transaction) and, when a change feed is configured (Redis, see
store/redis/changes.py), is published there after the commit, so reading it per request is one cheap GET instead
of a database query. Without the feed, or while it is unreachable, `epoch()` reads PostgreSQL: exact, slower.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import msgspec
from psycopg import errors

from cheapest.store.base import LastManagementKey, QuotaExceeded, StoreError, UsageKey
from cheapest.store.postgres.connection import Conn, Database
from cheapest.store.postgres.ledger import PostgresLedger
from cheapest.store.postgres.rows import (
    ACCOUNT, INSERT_ACCOUNT, KEY, account_of, account_values, json_encoder, key_of, key_values,
)
from cheapest.store.postgres.schema import migrate
from cheapest.store.records import AccountRecord, DailyUsage, KeyRecord, UsageCounter, UsageRow
from cheapest.vocabulary import BUDGET_WINDOWS, DAY, KeyKind, window_start

_COUNTER = "requests, prompt_tokens, completion_tokens, cost_micro"
_PAGE = 1000  # rows per read when listing a whole table
_ADD_COUNTER = ", ".join(f"{c} = {{t}}.{c} + excluded.{c}" for c in _COUNTER.split(", "))


class ChangeFeed(Protocol):
    """Where hosts read the change epoch cheaply (Redis); PostgreSQL stays its source of truth."""

    def current(self) -> int | None:
        """The published epoch; None if nothing is published yet (e.g. the feed was restarted empty). Raises
        ConnectionError when unreachable."""
        ...

    def publish(self, epoch: int) -> None:
        """Raise the published epoch to at least `epoch` (best effort: never raises)."""
        ...

    def close(self) -> None: ...


class Changes:
    """One write transaction's change of keys or accounts: the epoch it bumped, published after the commit."""

    __slots__ = ("conn", "epoch")

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.epoch: int | None = None

    def bump(self) -> None:
        row = self.conn.execute("UPDATE meta SET value = value + 1 WHERE name = 'epoch' RETURNING value").fetchone()
        assert row is not None
        self.epoch = int(row[0])


class PostgresStore:
    def __init__(self, url: str, feed: ChangeFeed | None = None, *, apply_migrations: bool = True) -> None:
        self.db = Database(url)
        self.feed = feed
        if apply_migrations:
            with self.db.connect() as conn:
                migrate(conn)
        self.ledger = PostgresLedger(self)

    def close(self) -> None:
        self.db.close()
        if self.feed is not None:
            self.feed.close()

    # --- transactions that change keys or accounts -----------------------------------------------------------
    def change(self, work: Callable[[Changes], Any]) -> Any:
        """`work` in one transaction; the epoch it bumped (if any) is published once committed."""
        box: list[Changes] = []

        def run(conn: Conn) -> Any:
            box[:] = [Changes(conn)]
            return work(box[0])

        result = self.db.write(run)
        if box and box[0].epoch is not None and self.feed is not None:
            self.feed.publish(box[0].epoch)
        return result

    # --- change epoch -----------------------------------------------------------------------------------------
    def epoch(self) -> int:
        if self.feed is not None:
            try:
                published = self.feed.current()
            except ConnectionError:
                published = None  # the feed is down: PostgreSQL answers (exact, one query)
            else:
                if published is not None:
                    return published
        value = self.db.read(lambda c: c.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone())
        epoch = int(value[0]) if value else 0
        if self.feed is not None:
            self.feed.publish(epoch)  # seeds a feed that restarted empty
        return epoch

    # --- accounts ---------------------------------------------------------------------------------------------
    def create_account(self, account: AccountRecord) -> None:
        def work(tx: Changes) -> None:
            try:
                tx.conn.execute(INSERT_ACCOUNT, account_values(account))
            except errors.UniqueViolation as exc:
                if exc.diag.constraint_name == "accounts_email_key_key":
                    raise StoreError("an account with this email already exists") from None
                raise StoreError("account id collision") from None
            tx.bump()

        self.change(work)

    def get_account(self, account_id: str) -> AccountRecord | None:
        row = self.db.read(lambda c: c.execute(f"SELECT {ACCOUNT} FROM accounts WHERE id = %s",
                                               (account_id,)).fetchone())
        return None if row is None else account_of(row)

    def find_account_by_email(self, email: str) -> AccountRecord | None:
        row = self.db.read(lambda c: c.execute(f"SELECT {ACCOUNT} FROM accounts WHERE email_key = %s",
                                               (email.lower(),)).fetchone())
        return None if row is None else account_of(row)

    def put_account(self, account: AccountRecord) -> None:
        def work(tx: Changes) -> None:
            tx.conn.execute(
                INSERT_ACCOUNT + " ON CONFLICT (id) DO UPDATE SET email = excluded.email, "
                "email_key = excluded.email_key, created_at = excluded.created_at, "
                "plan = excluded.plan, status = excluded.status, subscription_status = excluded.subscription_status, "
                "period_end = excluded.period_end, deleted_at = excluded.deleted_at", account_values(account))
            tx.bump()

        self.change(work)

    def update_account(self, account_id: str, change: Callable[[AccountRecord], AccountRecord]) -> AccountRecord | None:
        """Read-modify-write under the row's lock (no lost updates between hosts); None if unknown."""

        def work(tx: Changes) -> AccountRecord | None:
            row = tx.conn.execute(f"SELECT {ACCOUNT} FROM accounts WHERE id = %s FOR UPDATE",
                                  (account_id,)).fetchone()
            if row is None:
                return None
            old = account_of(row)
            new = change(old)
            if new.id != account_id or new.email != old.email:
                raise StoreError("an account's id and email are immutable here")
            self.write_account(tx, new)
            return new

        result: AccountRecord | None = self.change(work)
        return result

    def write_account(self, tx: Changes, account: AccountRecord) -> None:
        """Update a locked account row (its id and email unchanged) and bump the epoch."""
        tx.conn.execute("UPDATE accounts SET plan = %s, status = %s, subscription_status = %s, period_end = %s, "
                        "deleted_at = %s WHERE id = %s",
                        (account.plan, account.status, account.subscription_status, account.period_end,
                         account.deleted_at, account.id))
        tx.bump()

    def list_accounts(self) -> Iterator[AccountRecord]:
        """Every account, a page per query (keyset pagination by id): memory stays bounded."""
        after = ""
        while True:
            rows = self.db.read(lambda c: c.execute(
                f"SELECT {ACCOUNT} FROM accounts WHERE id > %s ORDER BY id LIMIT %s", (after, _PAGE)).fetchall())
            page = [account_of(r) for r in rows]
            yield from page
            if len(page) < _PAGE:
                return
            after = page[-1].id

    def count_accounts(self) -> int:
        row = self.db.read(lambda c: c.execute("SELECT count(*) FROM accounts").fetchone())
        return int(row[0]) if row else 0

    # --- keys -------------------------------------------------------------------------------------------------
    def create_key(self, key: KeyRecord, max_keys: int | None = None) -> None:
        def work(tx: Changes) -> None:
            # The account's row first (the one lock order): concurrent creations for it count one at a time.
            if tx.conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (key.account_id,)).fetchone() is None:
                raise StoreError("unknown account")
            if max_keys is not None and self._live_keys(tx.conn, key.account_id, max_keys) >= max_keys:
                raise QuotaExceeded(f"the account already has {max_keys} keys")
            try:
                tx.conn.execute(f"INSERT INTO keys ({KEY}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                                key_values(key))
            except errors.ForeignKeyViolation:
                raise StoreError("unknown account") from None
            except errors.UniqueViolation:
                raise StoreError("key hash collision") from None
            tx.conn.execute("INSERT INTO key_history (account_id, key_id) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                            (key.account_id, key.id))
            tx.bump()

        self.change(work)

    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self.db.read(lambda c: c.execute(f"SELECT {KEY} FROM keys WHERE id = %s", (key_id,)).fetchone())
        return None if row is None else key_of(row)

    def find_key_by_hash(self, key_hash: bytes) -> KeyRecord | None:
        row = self.db.read(lambda c: c.execute(f"SELECT {KEY} FROM keys WHERE hash = %s", (key_hash,)).fetchone())
        return None if row is None else key_of(row)

    def put_key(self, key: KeyRecord) -> None:
        """Replace a key's metadata (name, limits, disabled, expiry); its hash and owner never change."""

        def work(tx: Changes) -> None:
            row = tx.conn.execute("SELECT hash, account_id FROM keys WHERE id = %s FOR UPDATE", (key.id,)).fetchone()
            if row is None:
                raise StoreError("unknown key")
            if bytes(row[0]) != key.hash or row[1] != key.account_id:
                raise StoreError("a key's hash and account are immutable")
            self._write_key(tx, key)

        self.change(work)

    def _write_key(self, tx: Changes, key: KeyRecord) -> None:
        tx.conn.execute("UPDATE keys SET name = %s, limits = %s, disabled = %s, expires_at = %s, models = %s "
                        "WHERE id = %s", (key.name, json_encoder.encode(key.limits).decode(), key.disabled,
                                          key.expires_at, None if key.models is None else list(key.models), key.id))
        tx.bump()

    def update_key(self, key_id: str, account_id: str,
                   change: Callable[[KeyRecord], KeyRecord]) -> KeyRecord | None:
        """Read-modify-write of one of `account_id`'s keys under the row's lock, so two concurrent PATCHes of
        different fields on different hosts both land. None if the key is unknown or not the account's."""

        def work(tx: Changes) -> KeyRecord | None:
            row = tx.conn.execute(f"SELECT {KEY} FROM keys WHERE id = %s FOR UPDATE", (key_id,)).fetchone()
            if row is None:
                return None
            old = key_of(row)
            if old.account_id != account_id:
                return None
            new = change(old)
            if (new.id, new.hash, new.account_id, new.kind) != (old.id, old.hash, old.account_id, old.kind):
                raise StoreError("a key's id, hash, account and kind are immutable")
            self._write_key(tx, new)
            return new

        result: KeyRecord | None = self.change(work)
        return result

    def delete_key(self, key_id: str, keep_last_management: bool = False) -> bool:
        def work(tx: Changes) -> bool:
            conn = tx.conn
            row = conn.execute("SELECT account_id, kind FROM keys WHERE id = %s", (key_id,)).fetchone()
            if row is None:
                return False
            if keep_last_management and row[1] == "mk":
                conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (row[0],))  # one revocation at a time
                if conn.execute("SELECT 1 FROM keys WHERE account_id = %s AND kind = 'mk' AND id <> %s LIMIT 1",
                                (row[0], key_id)).fetchone() is None:
                    raise LastManagementKey("this is the account's only management key")
            if conn.execute("DELETE FROM keys WHERE id = %s RETURNING 1", (key_id,)).fetchone() is None:
                return False
            tx.bump()
            return True  # usage rows and the key_history entry stay: they are the account's billing history

        return bool(self.change(work))

    def list_keys(self, account_id: str, after: str | None = None, limit: int = 100,
                  kind: KeyKind | None = None) -> list[KeyRecord]:
        rows = self.db.read(lambda c: c.execute(
            f"SELECT {KEY} FROM keys WHERE account_id = %s AND id > %s AND (%s::text IS NULL OR kind = %s) "
            "ORDER BY id LIMIT %s", (account_id, after or "", kind, kind, limit)).fetchall())
        return [key_of(r) for r in rows]

    def count_keys(self, account_id: str, kind: KeyKind | None, now: float) -> tuple[int, int]:
        row = self.db.read(lambda c: c.execute(
            "SELECT count(*), count(*) FILTER (WHERE NOT disabled AND (expires_at IS NULL OR expires_at > %s)) "
            "FROM keys WHERE account_id = %s AND (%s::text IS NULL OR kind = %s)",
            (now, account_id, kind, kind)).fetchone())
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    @staticmethod
    def _live_keys(conn: Conn, account_id: str, stop_at: int) -> int:
        row = conn.execute("SELECT count(*) FROM (SELECT 1 FROM keys WHERE account_id = %s LIMIT %s) AS held",
                           (account_id, stop_at)).fetchone()
        return 0 if row is None else int(row[0])

    def key_history(self, account_id: str) -> list[str]:
        rows = self.db.read(lambda c: c.execute(
            "SELECT key_id FROM key_history WHERE account_id = %s ORDER BY key_id", (account_id,)).fetchall())
        return [r[0] for r in rows]

    # --- usage ------------------------------------------------------------------------------------------------
    def add_usage(self, deltas: Mapping[UsageKey, UsageCounter], debits: Mapping[str, int] | None = None,
                  flush_id: str | None = None, owners: Mapping[str, str] | None = None) -> None:
        """One transaction: the flush id (once-only), the usage upsert, the budget-window spend of each key and,
        when `owners` names it, of its account (the table's `key_id` column holds either: a plan's budget binds
        the account), the end of each one's previous windows, the ledger debits. Rows go in key order:
        concurrent flushes never deadlock."""
        owners = owners or {}
        debits = {a: m for a, m in (debits or {}).items() if m}
        if not deltas and not debits:
            return
        rows = sorted((k, h, m, c) for (k, m, h), c in deltas.items())
        spend: dict[tuple[str, str, int], int] = {}
        for key_id, hour, _, c in rows:
            if c.cost_micro:
                account_id = owners.get(key_id)
                for owner in (key_id,) if account_id is None else (key_id, account_id):
                    for window in BUDGET_WINDOWS:
                        at = (owner, window, window_start(window, hour))
                        spend[at] = spend.get(at, 0) + c.cost_micro
        spent = sorted(spend.items())

        def work(conn: Conn) -> None:
            if flush_id is not None and conn.execute(
                    "INSERT INTO usage_flushes (id, applied_at) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1",
                    (flush_id, int(time.time()))).fetchone() is None:
                return  # this flush committed before its connection was lost
            if rows:
                conn.execute(
                    f"INSERT INTO usage (key_id, hour, model, {_COUNTER}) SELECT * FROM unnest(%s::text[], "
                    "%s::bigint[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[]) "
                    f"ON CONFLICT (key_id, hour, model) DO UPDATE SET {_ADD_COUNTER.format(t='usage')}",
                    ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3].requests for r in rows],
                     [r[3].prompt_tokens for r in rows], [r[3].completion_tokens for r in rows],
                     [r[3].cost_micro for r in rows]))
            if spent:
                columns = ([k for (k, _, _), _ in spent], [w for (_, w, _), _ in spent],
                           [s for (_, _, s), _ in spent])
                conn.execute(
                    "INSERT INTO spend (key_id, window_len, start, micro) SELECT * FROM unnest(%s::text[], "
                    "%s::text[], %s::bigint[], %s::bigint[]) ON CONFLICT (key_id, window_len, start) DO UPDATE SET "
                    "micro = spend.micro + excluded.micro", (*columns, [m for _, m in spent]))
                # A window that is over is never read again: keep only each key's latest of each length.
                conn.execute(
                    "DELETE FROM spend s USING unnest(%s::text[], %s::text[], %s::bigint[]) AS v(key_id, window_len, "
                    "start) WHERE s.key_id = v.key_id AND s.window_len = v.window_len AND s.start < v.start", columns)
            if debits:
                self.ledger.add_in(conn, sorted((a, -m) for a, m in debits.items()))

        self.db.write(work)

    def window_spend(self, owner_id: str, window: str, start: int) -> int:
        row = self.db.read(lambda c: c.execute(
            "SELECT micro FROM spend WHERE key_id = %s AND window_len = %s AND start = %s",
            (owner_id, window, start)).fetchone())
        return 0 if row is None else int(row[0])

    def usage(self, key_ids: Iterable[str], start: int = 0, end: int | None = None) -> Iterator[UsageRow]:
        """Rows of the given keys with start <= hour < end, by key (in the order given) then hour."""
        ids = list(dict.fromkeys(key_ids))
        if not ids:
            return iter([])
        rows = self.db.read(lambda c: c.execute(
            f"SELECT key_id, model, hour, {_COUNTER} FROM usage WHERE key_id = ANY(%s) AND hour >= %s "
            "AND (%s::bigint IS NULL OR hour < %s) ORDER BY array_position(%s, key_id), hour, model",
            (ids, max(start, 0), end, end, ids)).fetchall())
        return iter([UsageRow(r[0], r[1], r[2], UsageCounter(*r[3:])) for r in rows])

    # --- data lifecycle: anonymous aggregates and erasure (see privacy/) ---------------------------------------
    _FOLD = (f"WITH moved AS (DELETE FROM usage WHERE {{where}} RETURNING hour, model, {_COUNTER}), "
             f"folded AS (INSERT INTO usage_daily (day, model, {_COUNTER}) SELECT hour / {DAY} * {DAY}, model, "
             "sum(requests)::bigint, sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint, "
             "sum(cost_micro)::bigint FROM moved GROUP BY 1, 2 ORDER BY 1, 2 ON CONFLICT (day, model) DO UPDATE SET "
             f"{_ADD_COUNTER.format(t='usage_daily')} RETURNING 1) SELECT count(*) FROM moved")

    def roll_up_usage(self, before: int, batch: int = 10_000) -> int:
        """Fold every usage row of an hour before `before` into per-day, per-model aggregates without key or
        account ids, `batch` rows per transaction. Each row is deleted by the statement that adds it to its day,
        so two hosts rolling up at once move each row once."""
        moved = 0
        query = self._FOLD.format(where="ctid IN (SELECT ctid FROM usage WHERE hour < %s LIMIT %s)")
        while True:
            n = self.db.write(lambda c: int(c.execute(query, (before, batch)).fetchone()[0]))  # type: ignore[index]
            moved += n
            if n < batch:
                return moved

    def daily_usage(self, start: int = 0, end: int | None = None) -> Iterator[DailyUsage]:
        rows = self.db.read(lambda c: c.execute(
            f"SELECT day, model, {_COUNTER} FROM usage_daily WHERE day >= %s AND (%s::bigint IS NULL OR day < %s) "
            "ORDER BY day, model", (max(start, 0), end, end)).fetchall())
        return iter([DailyUsage(r[0], r[1], UsageCounter(*r[2:])) for r in rows])

    def purge_account(self, account_id: str) -> bool:
        """Erase an account in ONE transaction (its row locked first, so a payment event racing the purge either
        finishes before it - and is erased with it - or finds the account gone): record and email, every key it
        ever had, budget spend, payment references; its usage folds into the anonymous daily aggregates."""

        def work(tx: Changes) -> bool:
            conn = tx.conn
            if conn.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (account_id,)).fetchone() is None:
                return False
            ids = [r[0] for r in conn.execute(
                "SELECT key_id FROM key_history WHERE account_id = %s UNION SELECT id FROM keys WHERE account_id = %s",
                (account_id, account_id)).fetchall()]
            conn.execute(self._FOLD.format(where="key_id = ANY(%s)"), (ids,))
            conn.execute("DELETE FROM spend WHERE key_id = ANY(%s)", ([*ids, account_id],))  # the account's own too
            conn.execute("DELETE FROM keys WHERE account_id = %s", (account_id,))
            conn.execute("DELETE FROM key_history WHERE account_id = %s", (account_id,))
            self.ledger.forget_accounts_in(conn, [account_id])
            conn.execute("DELETE FROM accounts WHERE id = %s", (account_id,))
            tx.bump()
            return True

        return bool(self.change(work))
