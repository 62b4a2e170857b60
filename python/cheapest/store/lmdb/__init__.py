"""The embedded store: one LMDB environment per host holding accounts, keys, usage and the payment ledger."""

from cheapest.store.lmdb.ledger import LmdbLedger
from cheapest.store.lmdb.store import LmdbStore

__all__ = ["LmdbLedger", "LmdbStore"]
