"""One worker's connections to PostgreSQL: a small pool, transactions retried where that is safe, and failures
turned into `StoreUnavailable` (the server's 503) rather than a driver exception.

What is retried: a transaction that failed on a serialization or deadlock error (it did not commit), and one
whose connection turned out dead before COMMIT was sent (the pool hands out a connection PostgreSQL closed when
it restarted; the next one is fresh). A connection lost DURING commit leaves it unknown whether the transaction
committed: that is not retried here but raised, and the callers that retry later make the retry harmless - a
usage flush carries its flush id, the ledger's steps are once-only by their references.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg_pool import ConnectionPool, PoolTimeout

from cheapest.store.base import StoreFull, StoreUnavailable

log = logging.getLogger("cheapest.store")

T = TypeVar("T")
Conn = psycopg.Connection[Any]

POOL_SIZE = 4  # per worker: its requests (one event loop), the usage flusher, the retention job, a spare
CONNECT_TIMEOUT = 2  # seconds to open a connection; a request waits at most about this long for one
_CONFLICTS = (errors.SerializationFailure, errors.DeadlockDetected)
_TRIES = POOL_SIZE + 2


class _BeforeCommit(Exception):
    """The connection failed while the transaction was still open: nothing was committed."""


class Database:
    def __init__(self, url: str, pool_size: int = POOL_SIZE) -> None:
        self.url = url
        self.pool = ConnectionPool(url, min_size=1, max_size=pool_size, timeout=CONNECT_TIMEOUT,
                                   kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                                   name="cheapest", open=False)
        self.pool.open(wait=False)

    def connect(self) -> Conn:
        """A connection of its own (migrations, bulk copies), outside the pool."""
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except psycopg.OperationalError:
            raise StoreUnavailable("the PostgreSQL store is unreachable") from None

    def read(self, work: Callable[[Conn], T]) -> T:
        """`work(conn)` outside a transaction (one statement sees one snapshot), retried on a dead connection."""
        return self._run(work, transaction=False)

    def write(self, work: Callable[[Conn], T]) -> T:
        """`work(conn)` in one transaction (READ COMMITTED: the statements lock the rows they change)."""
        return self._run(work, transaction=True)

    def _run(self, work: Callable[[Conn], T], transaction: bool) -> T:
        for attempt in range(_TRIES):
            try:
                with self.pool.connection() as conn, conn.transaction() if transaction else nullcontext():
                    try:
                        return work(conn)
                    except errors.DiskFull:
                        raise
                    except psycopg.OperationalError as exc:
                        raise _BeforeCommit() from exc
            except errors.DiskFull:  # nothing was committed; retrying cannot help until the operator acts
                raise StoreFull("the PostgreSQL store's disk is full") from None
            except _CONFLICTS:
                time.sleep(0.002 * (attempt + 1))
            except _BeforeCommit as exc:
                if attempt == _TRIES - 1:
                    raise StoreUnavailable("the PostgreSQL store is unreachable") from exc.__cause__
                if attempt:  # the first retry is at once: a restarted server leaves dead connections behind
                    time.sleep(0.05 * attempt)
            except PoolTimeout:
                raise StoreUnavailable("the PostgreSQL store is unreachable") from None
            except psycopg.OperationalError:  # lost during COMMIT: whether it committed is unknown
                raise StoreUnavailable("the PostgreSQL store connection was lost") from None
        raise StoreUnavailable("the PostgreSQL store kept refusing the transaction")

    def close(self) -> None:
        self.pool.close()
