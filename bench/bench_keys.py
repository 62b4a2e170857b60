"""check_key + hash_key (the auth hot path) vs the same in Python: hmac + hashlib, base62 + zlib CRC32.

    make bench   (or: .venv/bin/python -m pytest bench/bench_keys.py --benchmark-enable)

Goal (issue 2): <= 1 us per key for the core. Compare the two medians of one run.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib

import pytest

from cheapest_core import check_key, generate_key, hash_key

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
DIGIT = {c: i for i, c in enumerate(ALPHABET)}
PEPPER = b"p" * 32
KEY = generate_key("sk")


def python_check_and_hash(key: str) -> bytes | None:
    if len(key) != 39 or key[:3] not in ("sk_", "mk_"):
        return None
    try:
        value = 0
        for c in key[33:]:
            value = value * 62 + DIGIT[c]
        if any(c not in DIGIT for c in key[3:33]):
            return None
    except KeyError:
        return None
    if value != zlib.crc32(key[:33].encode()):
        return None
    return hmac.new(PEPPER, key.encode(), hashlib.sha256).digest()


def core_check_and_hash(key: str) -> bytes | None:
    return hash_key(key, PEPPER) if check_key(key) else None


@pytest.mark.benchmark(group="keys: check_key + hash_key")
def test_core(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(core_check_and_hash, KEY) == python_check_and_hash(KEY)


@pytest.mark.benchmark(group="keys: check_key + hash_key")
def test_python_hmac_hashlib(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(python_check_and_hash, KEY) == hash_key(KEY, PEPPER)


@pytest.mark.benchmark(group="keys: check_key alone")
def test_core_check_only(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(check_key, KEY)
