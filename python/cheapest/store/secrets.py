"""The server pepper for key hashing: the configured `key_pepper`, or generated once into <data>/secrets/pepper
(0600, in a 0700 directory)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cheapest.privacy.hardening import owner_only_dir

MIN_PEPPER_BYTES = 16


def load_pepper(data_dir: str | Path, configured: str = "") -> bytes:
    if configured:
        pepper = configured.encode()
        if len(pepper) < MIN_PEPPER_BYTES:
            raise ValueError(f"key_pepper must be at least {MIN_PEPPER_BYTES} bytes")
        return pepper
    folder = Path(data_dir) / "secrets"
    owner_only_dir(folder)
    path = folder / "pepper"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    # Race-free first creation across workers: write a temp file, then link it into place; the loser reads
    # the winner's pepper.
    tmp = folder / f".pepper.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()
