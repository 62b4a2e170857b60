"""The store contract on each backend (LMDB; PostgreSQL with Redis), the usage meter and the pepper, without a
server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from cheapest.store import AccountRecord, KeyLimits, KeyRecord, StoreError, UsageCounter
from cheapest.store.metering import UsageMeter
from cheapest.vocabulary import hour_of
from cheapest.store.secrets import load_pepper
from fixtures_backends import Backend
from processes import in_processes


def _account(i: int = 0) -> AccountRecord:
    return AccountRecord(id=f"acct_{i:04d}", email=f"u{i}@example.test", created_at=1, plan="free")


def _key(i: int, account: str = "acct_0000", kind: str = "sk") -> KeyRecord:
    return KeyRecord(id=f"key_{i:04d}", account_id=account, kind=kind, hash=bytes([i]) * 32,  # type: ignore[arg-type]
                     hint="sk_…abcd", name=f"k{i}", created_at=1)


def test_accounts_and_keys_round_trip(backend: Backend) -> None:
    store = backend.open()
    store.create_account(_account())
    with pytest.raises(StoreError):
        store.create_account(msgspec.structs.replace(_account(), id="acct_other", email="U0@EXAMPLE.test"))
    assert store.find_account_by_email("U0@example.test") == _account()
    for i in range(5):
        store.create_key(_key(i))
    with pytest.raises(StoreError):
        store.create_key(_key(9, account="acct_missing"))
    assert store.find_key_by_hash(bytes([3]) * 32) == _key(3)
    assert [k.id for k in store.list_keys("acct_0000", limit=2)] == ["key_0000", "key_0001"]
    assert [k.id for k in store.list_keys("acct_0000", after="key_0001", limit=10)] == ["key_0002", "key_0003",
                                                                                      "key_0004"]
    changed = msgspec.structs.replace(_key(2), disabled=True, limits=KeyLimits(rpm=5))
    store.put_key(changed)
    assert store.get_key("key_0002") == changed
    with pytest.raises(StoreError):
        store.put_key(msgspec.structs.replace(changed, hash=b"x" * 32))
    assert store.delete_key("key_0002") and not store.delete_key("key_0002")
    assert store.find_key_by_hash(bytes([2]) * 32) is None
    assert len(store.list_keys("acct_0000")) == 4
    store.close()


def _add_usage(start: Callable[[], None], backend: Backend, n: int) -> None:
    store = backend.open()
    meter = UsageMeter(store, interval=0.01)
    start()
    meter.start()
    for i in range(n):
        meter.record("key_a", "m", 3, 5, 7, ts=7200.0 + (i % 2) * 3600)
    meter.stop()
    store.close()


def test_usage_totals_exact_across_processes(backend: Backend) -> None:
    in_processes(_add_usage, backend, 500, n=4)
    store = backend.open()
    rows = list(store.usage(["key_a"]))
    assert [(r.hour, r.counter) for r in rows] == [
        (7200, UsageCounter(1000, 3000, 5000, 7000)),
        (10800, UsageCounter(1000, 3000, 5000, 7000)),
    ]
    assert [r.hour for r in store.usage(["key_a"], start=10800)] == [10800]
    assert list(store.usage(["key_a"], start=0, end=7200)) == []
    store.close()


def test_hour_bucket() -> None:
    assert hour_of(7199.9) == 3600 and hour_of(7200) == 7200


def test_pepper_generated_once_private(tmp_path: Path) -> None:
    a = load_pepper(tmp_path)
    assert load_pepper(tmp_path) == a and len(a) == 32
    assert (tmp_path / "secrets" / "pepper").stat().st_mode & 0o777 == 0o600
    assert load_pepper(tmp_path, "x" * 20) == b"x" * 20
    with pytest.raises(ValueError, match="key_pepper"):
        load_pepper(tmp_path, "short")
