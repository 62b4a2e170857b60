"""Storage behind one interface (`Store`, with its payment `Ledger`): accounts, keys, usage counters, payments;
and the rate `Limiter` (limiter.py).

`lmdb/` is the embedded backend (one host, any number of workers); `postgres/` (the system of record) with
`redis/` (rate limits, the published change epoch) lets many hosts act as one. Nothing outside this package
knows which backend runs.
"""

from __future__ import annotations

from pathlib import Path

from cheapest.store.base import (
    LastManagementKey, Ledger, QuotaExceeded, Store, StoreError, StoreFull, StoreUnavailable, UsageKey,
)
from cheapest.store.records import AccountRecord, KeyLimits, KeyRecord, UsageCounter, UsageRow
from cheapest.store.settings import StoreSettings

__all__ = [
    "AccountRecord", "KeyLimits", "KeyRecord", "LastManagementKey", "Ledger", "QuotaExceeded", "Store", "StoreError",
    "StoreFull", "StoreSettings", "StoreUnavailable", "UsageCounter", "UsageKey", "UsageRow", "open_configured_store",
    "open_store",
]


def open_store(data_dir: str | Path, map_size: int = 1 << 30) -> Store:
    """Open the host's store. Call inside the process that uses it (after fork), never in a server master."""
    from cheapest.store.lmdb import LmdbStore

    return LmdbStore(Path(data_dir) / "store", map_size=map_size)


def open_configured_store(settings: StoreSettings) -> Store:
    """The store the configuration names: PostgreSQL when `store_url` is set (its epoch published through Redis
    when `limiter_url` is), else LMDB in the data directory. Migrations are applied on opening PostgreSQL."""
    if not settings.store_url:
        return open_store(settings.data_path, settings.lmdb_map_size)
    from cheapest.store.postgres import PostgresStore
    from cheapest.store.redis import RedisChanges

    return PostgresStore(settings.store_url, RedisChanges(settings.limiter_url) if settings.limiter_url else None)
