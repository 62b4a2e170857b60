"""Versioned schema migrations, applied at start: `migrations/NNNN_name.sql`, in order, each once.

`migrate(conn)` runs every file not yet recorded in `schema_migrations`, all in one transaction that first takes
a transaction-scoped advisory lock: of N hosts (or workers) starting at once, one applies them and the others
wait for it, then find nothing left to do. PostgreSQL's DDL is transactional, so a failed migration leaves the
schema as it was.
"""

from __future__ import annotations

import re
from importlib import resources

import psycopg

# pg_advisory_xact_lock's key: any constant shared by every process that migrates this database.
MIGRATION_LOCK = 0x63686561_70657374 >> 1  # "cheapest", as a positive bigint
_NAME = re.compile(r"(\d{4})_[a-z0-9_]+\.sql")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every migration shipped with the package, by version."""
    folder = resources.files("cheapest.store.postgres") / "migrations"
    found = []
    for entry in folder.iterdir():
        m = _NAME.fullmatch(entry.name)
        if m:
            found.append((int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort()
    if len({v for v, _, _ in found}) != len(found):
        raise RuntimeError("two migrations share a version number")
    return found


def migrate(conn: psycopg.Connection[object]) -> list[str]:
    """Apply the migrations this database lacks; returns the names applied (none: already up to date)."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT "
                     "NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}  # type: ignore[index]
        for version, name, sql in migrations():
            if version in done:
                continue
            conn.execute(sql.encode())  # several statements, no parameters
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (version, name))
            applied_now.append(name)
    return applied_now
