"""Accounts, keys and usage counters behind a small interface (`Store`); LMDB is the embedded backend."""

from __future__ import annotations

from pathlib import Path

from cheapest.store.base import Store, StoreError, UsageKey
from cheapest.store.records import AccountRecord, KeyLimits, KeyRecord, UsageCounter, UsageRow

__all__ = [
    "AccountRecord", "KeyLimits", "KeyRecord", "Store", "StoreError", "UsageCounter", "UsageKey", "UsageRow",
    "open_store",
]


def open_store(data_dir: str | Path, map_size: int = 1 << 30) -> Store:
    """Open the host's store. Call inside the process that uses it (after fork), never in a server master."""
    from cheapest.store.lmdb_store import LmdbStore

    return LmdbStore(Path(data_dir) / "store", map_size=map_size)
