"""GGUF weights -> the fused graph's linear weights: dense fp32, or ONNX Runtime's block-quantized layout
without re-quantizing.

All three GGUF block types used here quantize 32 weights along the input axis, the same blocking as
`MatMulNBits(block_size=32)` / `GatherBlockQuantized(block_size=32)`:

  Q4_0  w = d * (q - 8)       -> 4-bit codes, scale d, zero point 8              (exact)
  Q8_0  w = d * q, q in int8  -> 8-bit codes q + 128, scale d, zero point 128     (exact)
  Q4_1  w = d * q + m         -> 4-bit codes, scale d, zero point 0, plus a per-block minimum m

MatMulNBits only has integer zero points on its fast (int8-activation) path, and -m/d is not an integer,
so Q4_1's minimum is kept apart and applied exactly as a second, tiny product:
  x . w = sum_blocks d * (x_blk . q_blk) + m * sum(x_blk)
i.e. `MatMulNBits(x) + BlockSums(x) @ mins^T` (see graph_fused.py). Float zero points (-m/d) would also be
exact, but ONNX Runtime's CPU kernel then dequantizes the whole matrix on every call (~40x slower).

The only layout work is nibble order: GGUF stores element j of a 4-bit block in the low nibble of byte j
and element j+16 in the high nibble; ONNX Runtime packs elements (2j, 2j+1) into byte j, low nibble first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as Q

from .gguf_reader import GGUFTensor

BLOCK = 32


@dataclass(frozen=True)
class DenseLinear:
    """A [N, K] weight kept as fp32 (GGUF F32 / F16 tensors)."""

    n: int
    k: int
    weight: np.ndarray  # float32 [N, K]

    def dequantize(self) -> np.ndarray:
        return self.weight


@dataclass(frozen=True)
class BlockLinear:
    """A [N, K] weight in MatMulNBits form: w[n, k] = (code - zero_point) * scale (+ min) per block of K."""

    n: int
    k: int
    bits: int  # 4 or 8
    codes: np.ndarray  # uint8 [N, K/block, block*bits/8], ONNX Runtime's packing
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray  # uint8 [N, K/block] (unpacked values)
    mins: np.ndarray | None = None  # float32 [N, K/block] additive block term (Q4_1), else None
    block_size: int = BLOCK

    @property
    def n_blocks(self) -> int:
        return self.k // self.block_size

    @property
    def default_zero_point(self) -> int:
        """MatMulNBits' zero point when its zero-point input is absent."""
        return 1 << (self.bits - 1)

    def packed_zero_points(self) -> np.ndarray | None:
        """MatMulNBits' uint8 layout, or None when every zero point is the operator's default."""
        default = self.default_zero_point
        if np.all(self.zero_points == default):
            return None
        if self.bits == 8:
            return self.zero_points
        zp = self.zero_points
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.full((zp.shape[0], 1), default, np.uint8)], axis=1)
        return (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)

    def unpacked_codes(self) -> np.ndarray:
        """uint8 [N, K/block, block]: one code per weight."""
        if self.bits == 8:
            return self.codes
        lo, hi = self.codes & 0x0F, self.codes >> 4
        return np.stack([lo, hi], axis=-1).reshape(self.n, self.n_blocks, self.block_size)

    def dequantize(self) -> np.ndarray:
        """fp32 [N, K] — what the graph computes with; used by tests."""
        q = self.unpacked_codes()
        w = (q.astype(np.float32) - self.zero_points[..., None]) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(self.n, self.k)


Linear = DenseLinear | BlockLinear


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start:start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _pack_nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF 16-byte nibble block -> ONNX Runtime's element order."""
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # elements 0..31 in order
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def linear_weight(t: GGUFTensor) -> Linear:
    n, k = t.rows, t.cols
    if t.qtype in (Q.F32, Q.F16):
        return DenseLinear(n, k, t.dequantize())
    nb = k // BLOCK
    if t.qtype == Q.Q4_0:
        blocks = t.raw.reshape(n, nb, 18)
        return BlockLinear(n, k, 4, _pack_nibbles(blocks[..., 2:]), _f16(blocks, 0), np.full((n, nb), 8, np.uint8))
    if t.qtype == Q.Q4_1:
        blocks = t.raw.reshape(n, nb, 20)
        return BlockLinear(n, k, 4, _pack_nibbles(blocks[..., 4:]), _f16(blocks, 0), np.zeros((n, nb), np.uint8),
                           _f16(blocks, 2))
    if t.qtype == Q.Q8_0:
        blocks = t.raw.reshape(n, nb, 34)
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return BlockLinear(n, k, 8, codes, _f16(blocks, 0), np.full((n, nb), 128, np.uint8))
    raise ValueError(f"no block layout for {t.qtype.name}")  # read_gguf rejects these earlier


def concat_rows(parts: list[Linear]) -> Linear | None:
    """Stack weights that share an input (q|k|v, gate|up) into one matrix; None if their encodings differ."""
    if len({p.k for p in parts}) != 1:
        return None
    n, k = sum(p.n for p in parts), parts[0].k
    dense = [p for p in parts if isinstance(p, DenseLinear)]
    if len(dense) == len(parts):
        return DenseLinear(n, k, np.concatenate([p.weight for p in dense]))
    blocks = [p for p in parts if isinstance(p, BlockLinear)]
    if len(blocks) != len(parts) or len({(p.bits, p.block_size) for p in blocks}) != 1:
        return None
    mins = None
    if any(p.mins is not None for p in blocks):
        mins = np.concatenate([p.mins if p.mins is not None else np.zeros_like(p.scales) for p in blocks])
    return BlockLinear(
        n, k, blocks[0].bits,
        np.concatenate([p.codes for p in blocks]),
        np.concatenate([p.scales for p in blocks]),
        np.concatenate([p.zero_points for p in blocks]),
        mins, blocks[0].block_size,
    )
