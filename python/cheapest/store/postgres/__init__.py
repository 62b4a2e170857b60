"""The store for many hosts: PostgreSQL, the system of record (accounts, keys, usage, the payment ledger), with
versioned migrations applied at start."""

from cheapest.store.postgres.ledger import PostgresLedger
from cheapest.store.postgres.store import ChangeFeed, PostgresStore

__all__ = ["ChangeFeed", "PostgresLedger", "PostgresStore"]
