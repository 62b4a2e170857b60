"""Write transactions of the LMDB backend: a full map is the store's `StoreFull`, never a bare `MapFullError`.

LMDB aborts a transaction whose page allocation fails, so a refused write changes nothing and everything
committed before stays; the caller answers "the store is full" (HTTP 507) instead of an unhandled error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lmdb

from cheapest.store.base import StoreFull


@contextmanager
def writing(env: lmdb.Environment) -> Iterator[lmdb.Transaction[bytes]]:
    """One write transaction, committed when the block ends."""
    try:
        with env.begin(write=True) as txn:
            yield txn
    except lmdb.MapFullError:
        raise StoreFull("the store is full") from None
