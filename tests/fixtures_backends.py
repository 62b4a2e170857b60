"""Fixtures for the many-hosts backend: one PostgreSQL and one Redis server per test session (tests/backends.py),
a fresh database per test, and `any_store`, parametrized over both backends so one contract test runs on each.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backends import PostgresServer, RedisServer
from cheapest.store import Store, open_store

BACKENDS = ("lmdb", "postgres")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.close()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, migrated database of the session's server (dropped after the test)."""
    url = postgres_server.database()
    yield url
    postgres_server.drop(url)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@dataclass(frozen=True)
class Backend:
    """Where one test's store state lives: an LMDB data directory, or a PostgreSQL database (its epoch published
    in Redis). Picklable, so processes started by the test open the same state, as more workers or hosts would."""

    kind: str
    location: str
    redis_url: str = ""

    def open(self) -> Store:
        if self.kind == "lmdb":
            return open_store(self.location, map_size=64 << 20)
        from cheapest.store.postgres import PostgresStore
        from cheapest.store.redis import RedisChanges

        return PostgresStore(self.location, RedisChanges(self.redis_url))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Each backend in turn (the test runs once per backend), with fresh state."""
    if request.param == "lmdb":
        return Backend("lmdb", str(tmp_path))
    return Backend("postgres", request.getfixturevalue("pg_url"), request.getfixturevalue("redis_url"))


@pytest.fixture
def any_store(backend: Backend) -> Iterator[Store]:
    """A store of each backend (the test runs once per backend)."""
    store = backend.open()
    yield store
    store.close()
