"""The embedders' door: the `cheapest-core` wheel alone, in an empty virtual environment, runs the README's
metering example. Nothing else is installed there: no `cheapest`, no numpy, no tokenizers."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"


def _example(readme: Path) -> str:
    """The first python block that imports the core (the README mentions cheapest-core before it, elsewhere)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme.read_text(), re.S) if "import cheapest_core" in b]
    assert blocks, f"no python example in {readme}"
    return str(blocks[0])


def _version(pyproject: Path) -> str:
    return str(tomllib.loads(pyproject.read_text())["project"]["version"])


def _core_wheel(tmp: Path) -> Path:
    """dist/ holds it after `make wheels` (a step of `make test`); otherwise build it here."""
    wheels = sorted(DIST.glob("cheapest_core-*-abi3-*.whl"))
    if wheels:
        return wheels[-1]
    subprocess.run([sys.executable, "-m", "maturin", "build", "--release", "--quiet", "--out", str(tmp)],
                   cwd=REPO, check=True)
    return sorted(tmp.glob("cheapest_core-*-abi3-*.whl"))[-1]


def test_both_distributions_have_one_version() -> None:
    core = _version(REPO / "pyproject.toml")
    service = tomllib.loads((REPO / "python" / "pyproject.toml").read_text())["project"]
    assert service["name"] == "cheapest"
    assert f"cheapest-core=={core}" in service["dependencies"]
    assert _version(REPO / "python" / "pyproject.toml") == core
    cargo = tomllib.loads((REPO / "Cargo.toml").read_text())["package"]["version"]
    assert cargo == core


def test_readme_examples_agree() -> None:
    assert _example(REPO / "README.md") == _example(REPO / "rust" / "README.md")


@pytest.mark.slow
def test_core_wheel_alone_runs_the_readme_example(tmp_path: Path) -> None:
    wheel = _core_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "cheapest_core/py.typed" in names and "cheapest_core/_cheapest_core.pyi" in names
    assert not any(n.startswith("cheapest/") for n in names), "the service must not ride along"
    requires = [line for line in zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))).decode().splitlines()
        if line.startswith("Requires-Dist:")]
    assert requires == []

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--no-index", "--disable-pip-version-check",
                    str(wheel)], check=True)
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                            check=True, capture_output=True, text=True).stdout.split()
    assert sorted(p.split("==")[0].lower() for p in listed if not p.startswith(("pip==", "setuptools=="))) \
        == ["cheapest-core"]

    work = tmp_path / "work"
    work.mkdir()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["How many tokens is this? Count them, exactly."] * 20,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(work / "tokenizer.json"))
    expected = len(tok.encode("How many tokens is this?").ids)

    script = _example(REPO / "README.md") + (
        "\nassert tokens == int(__import__('sys').argv[1]), tokens"
        "\nassert body.endswith(b'data: [DONE]\\n\\n') and b'Hello' in body"
        "\nprint('ok', tokens)\n")
    out = subprocess.run([str(py), "-I", "-c", script, str(expected)], cwd=work, check=True, capture_output=True,
                         text=True)
    assert out.stdout.split() == ["ok", str(expected)]
