"""A GGUF file's header: its key/value metadata and tensor table, read in one pass without touching tensor data.

`gguf.GGUFReader` builds a numpy view for every element of every array field: ~10 s for SmolLM2's 49k-token
vocabulary and about a minute for Gemma 3's 262k, before a file of an unsupported kind could be refused.
Walking the header with `struct` takes a fraction of a second, so the converter refuses such a file at once
and reads tensor data straight from a memory map. The format's constants (value types, block sizes, the
magic, the alignment key) are the `gguf` package's.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType, Keys

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64,
}


class GGUFFormatError(ValueError):
    """Not a GGUF file, or a damaged one."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # GGMLQuantizationType value (may be one this `gguf` release does not know)
    shape: tuple[int, ...]  # GGUF order: shape[0] is the innermost (column) axis
    offset: int  # from the start of the file

    @property
    def qtype(self) -> GGMLQuantizationType | None:
        try:
            return GGMLQuantizationType(self.type_id)
        except ValueError:
            return None

    @property
    def type_name(self) -> str:
        qtype = self.qtype
        return qtype.name if qtype is not None else f"type {self.type_id}"

    @property
    def nbytes(self) -> int:
        qtype = self.qtype
        if qtype is None:
            raise GGUFFormatError(f"tensor {self.name} has an unknown type {self.type_id}")
        block, size = GGML_QUANT_SIZES[qtype]
        return int(np.prod(self.shape)) // block * size


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    fields: dict[str, Any]  # scalars as Python values, strings as str, arrays as lists (numbers: numpy arrays)
    tensors: list[TensorInfo]

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes, uint8 [rows, bytes per row], memory-mapped (read lazily)."""
        rows = int(np.prod(info.shape[1:])) if len(info.shape) > 1 else 1
        mapped = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,))
        return mapped.reshape(rows, -1)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item = GGUFValueType(self.unpack("<I"))
            count = self.unpack("<Q")
            if item in _NUMPY:  # fixed-size items: one read
                dtype = np.dtype(_NUMPY[item]).newbyteorder("<")
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
                self.pos += count * dtype.itemsize
                return arr
            return [self.value(item) for _ in range(count)]
        return self.unpack(_SCALAR[vtype])


def read_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse(path, _Cursor(buf))
        except (struct.error, ValueError, IndexError) as e:
            if isinstance(e, GGUFFormatError):
                raise
            raise GGUFFormatError(f"{path.name} is not a readable GGUF file") from e


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    if len(cur.buf) < 24 or cur.unpack("<I") != GGUF_MAGIC:
        raise GGUFFormatError(f"{path.name} is not a GGUF file")
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path.name}: unsupported GGUF version {version}")
    n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(GGUFValueType(cur.unpack("<I")))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        shape = tuple(cur.unpack("<Q") for _ in range(n_dims))
        type_id = cur.unpack("<I")
        infos.append((name, shape, type_id, cur.unpack("<Q")))
    alignment = int(fields.get(Keys.General.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT))
    start = -(-cur.pos // alignment) * alignment
    tensors = [TensorInfo(name, type_id, shape, start + offset) for name, shape, type_id, offset in infos]
    return GGUFHeader(path, fields, tensors)
