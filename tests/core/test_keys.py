"""API keys: format, checksum, hashing, hints (cheapest_core, keys.rs)."""

from __future__ import annotations

import collections
import hmac
import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cheapest_core import (
    KeyFormatError,
    check_key,
    generate_key,
    hash_key,
    key_hint,
    key_kind,
    verify_key,
)

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
KEY_RE = re.compile(r"^(sk|mk)_[0-9A-Za-z]{36}$")
PEPPER = bytes(range(32))


def reference_check(key: str) -> bool:
    """The format written independently in Python: prefix, 30 random, 6-char base62 CRC32."""
    if len(key) != 39 or key[:3] not in ("sk_", "mk_") or any(c not in ALPHABET for c in key[3:]):
        return False
    value = 0
    for c in key[33:]:
        value = value * 62 + ALPHABET.index(c)
    return value == zlib.crc32(key[:33].encode())


@pytest.mark.parametrize("kind", ["sk", "mk"])
def test_generated_keys_have_the_format(kind: str) -> None:
    for _ in range(200):
        key = generate_key(kind)
        assert KEY_RE.match(key) and key.startswith(kind + "_")
        assert reference_check(key)
        assert check_key(key) and check_key(key, kind=kind)
        assert not check_key(key, kind="mk" if kind == "sk" else "sk")
        assert key_kind(key) == kind


def test_keys_are_unique() -> None:
    keys = {generate_key("sk") for _ in range(20_000)}
    assert len(keys) == 20_000


def test_random_part_is_uniform_over_the_alphabet() -> None:
    # Chi-square over 62 symbols (61 degrees of freedom). A modulo-biased draw
    # (byte % 62 without rejection) scores about 390 here; a fair one 61 +- 11.
    counts = collections.Counter("".join(generate_key("sk")[3:33] for _ in range(2000)))
    n = 2000 * 30
    expected = n / 62
    chi2 = sum((counts.get(c, 0) - expected) ** 2 / expected for c in ALPHABET)
    assert chi2 < 140, chi2


def test_every_single_substitution_fails_exhaustively() -> None:
    key = generate_key("sk")
    for pos in range(len(key)):
        for c in ALPHABET + "_-. \u00e9":
            if c != key[pos]:
                bad = key[:pos] + c + key[pos + 1 :]
                assert not check_key(bad), (pos, c)
                assert key_kind(bad) is None


@settings(max_examples=300)
@given(
    kind=st.sampled_from(["sk", "mk"]),
    pos=st.integers(0, 38),
    char=st.characters(exclude_characters="\x00", codec="utf-8"),
)
def test_every_single_substitution_fails(kind: str, pos: int, char: str) -> None:
    key = generate_key(kind)
    if char == key[pos]:
        return
    assert not check_key(key[:pos] + char + key[pos + 1 :])


@given(st.text(max_size=60))
def test_check_key_agrees_with_the_reference_and_never_raises(text: str) -> None:
    assert check_key(text) == reference_check(text)


@given(st.text(alphabet=ALPHABET, min_size=30, max_size=30), st.sampled_from(["sk_", "mk_"]))
def test_any_body_with_the_right_checksum_passes(body: str, prefix: str) -> None:
    value = zlib.crc32((prefix + body).encode())
    digits = ""
    for _ in range(6):
        value, d = divmod(value, 62)
        digits = ALPHABET[d] + digits
    assert check_key(prefix + body + digits)


def test_check_key_rejects_odd_strings_without_raising() -> None:
    key = generate_key("sk")
    for s in ["", "sk_", key[:-1], key + "0", key.upper(), "\ud800" * 39, key[:10] + "\ud800" + key[11:]]:
        assert check_key(s) is False
    with pytest.raises(KeyFormatError):
        check_key(key, kind="xx")


@given(st.binary(min_size=16, max_size=100), st.text(max_size=80))
def test_hash_key_is_hmac_sha256(pepper: bytes, key: str) -> None:
    expected = hmac.new(pepper, key.encode(), "sha256").digest()
    assert hash_key(key, pepper) == expected
    assert verify_key(key, pepper, expected)


def test_verify_key_rejects_other_hashes() -> None:
    key = generate_key("sk")
    h = hash_key(key, PEPPER)
    assert verify_key(key, PEPPER, h)
    assert not verify_key(key, PEPPER, h[:-1])
    assert not verify_key(key, PEPPER, b"")
    assert not verify_key(key, PEPPER, bytes([h[0] ^ 1]) + h[1:])
    assert not verify_key(key, PEPPER[::-1], h)
    assert not verify_key(generate_key("sk"), PEPPER, h)


def test_short_pepper_and_bad_kind_are_refused_without_echoing_the_key() -> None:
    key = generate_key("sk")
    for call in (lambda: hash_key(key, b"x" * 15), lambda: verify_key(key, b"", b"")):
        with pytest.raises(KeyFormatError) as err:
            call()
        assert isinstance(err.value, ValueError)
        assert key not in str(err.value) and key[3:] not in repr(err.value.args)
    with pytest.raises(KeyFormatError):
        generate_key("pk")


def test_key_hint() -> None:
    key = generate_key("mk")
    assert key_hint(key) == "mk_\u2026" + key[-4:]
    bad = key[:-1] + ("0" if key[-1] != "0" else "1")
    with pytest.raises(KeyFormatError) as err:
        key_hint(bad)
    assert bad not in str(err.value) and bad[3:] not in str(err.value)
