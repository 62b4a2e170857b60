"""Storage behind one interface (`Store`, with its payment `Ledger`): accounts, keys, usage counters, payments.

`lmdb/` is the embedded backend (one host, any number of workers); nothing outside this package knows which
backend runs.
"""

from __future__ import annotations

from pathlib import Path

from cheapest.store.base import LastManagementKey, Ledger, QuotaExceeded, Store, StoreError, StoreFull, UsageKey
from cheapest.store.records import AccountRecord, KeyLimits, KeyRecord, UsageCounter, UsageRow
from cheapest.store.settings import StoreSettings

__all__ = [
    "AccountRecord", "KeyLimits", "KeyRecord", "LastManagementKey", "Ledger", "QuotaExceeded", "Store", "StoreError",
    "StoreFull", "StoreSettings", "UsageCounter", "UsageKey", "UsageRow", "open_configured_store", "open_store",
]


def open_store(data_dir: str | Path, map_size: int = 1 << 30) -> Store:
    """Open the host's store. Call inside the process that uses it (after fork), never in a server master."""
    from cheapest.store.lmdb import LmdbStore

    return LmdbStore(Path(data_dir) / "store", map_size=map_size)


def open_configured_store(settings: StoreSettings) -> Store:
    """The store the configuration names (its data directory and backend settings)."""
    return open_store(settings.data_path, settings.lmdb_map_size)
