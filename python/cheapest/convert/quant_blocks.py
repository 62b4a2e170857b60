"""GGUF weights -> the fused graph's linear weights: dense fp32, or ONNX Runtime's block-quantized layout
without re-quantizing.

Every GGUF block type maps onto `MatMulNBits` / `GatherBlockQuantized` blocks along the input axis
(w = (code - zero_point) * scale, plus an additive per-block term where the type has one):

  type   GGUF                        block  bits  codes           zero point  scale      additive term
  Q4_0   d * (q - 8)                 32     4     q               8           d
  Q4_1   d * q + m                   32     4     q               0           d          m
  Q5_0   d * (q - 16)                32     8     q + 112         128         d
  Q5_1   d * q + m                   32     8     q + 128         128         d          m
  Q8_0   d * q, q signed             32     8     q + 128         128         d
  Q2_K   d*sc * q - dmin*m           16     4     q + 8           8           d*sc       -dmin*m
  Q3_K   d*(sc - 32) * q, q -4..3    16     4     q + 8           8           d*(sc-32)
  Q4_K   d*sc * q - dmin*m           32     4     q               0           d*sc       -dmin*m
  Q5_K   d*sc * q - dmin*m           32     8     q + 128         128         d*sc       -dmin*m
  Q6_K   d*sc * (q - 32)             16     8     q + 96          128         d*sc
  F32, F16, BF16: dense fp32 (exact).

K-quant super-blocks (256 weights) hold 8 sub-blocks of 32 or 16 of 16, each with its own scale (and minimum);
the product of the super-block's fp16 scale and the sub-block's small integer is exact in fp32, so each
sub-block becomes one ONNX Runtime block. 5- and 6-bit codes are held as 8-bit codes. `BlockLinear.dequantize`
reproduces the `gguf` package's own dequantization bit for bit (tests/convert check every type).

The additive term is not an integer multiple of the scale, so it cannot be a zero point on MatMulNBits' fast
path; it is applied exactly as a second, tiny product:
  x . w = sum_blocks scale * (x_blk . (code - zp)) + term * sum(x_blk)
i.e. `MatMulNBits(x) + BlockSums(x) @ terms^T` (see graph_fused.py). Float zero points (-m/d) would also be
exact, but ONNX Runtime's CPU kernel then dequantizes the whole matrix on every call (~40x slower).

ONNX Runtime's CPU kernel for 8-bit weights at fp32 activations also dequantizes the whole matrix per call, so
the fused graph feeds it 8-bit codes split into two 4-bit planes (`BlockLinear.nibble_planes`): with
code = 16h + l, scale * (code - zp) = scale * (l - zp % 16) + 16 * scale * (h - zp // 16), both exact.

The only layout work is nibble order: GGUF stores element j of a 4-bit block in the low nibble of byte j
and element j+16 in the high nibble; ONNX Runtime packs elements (2j, 2j+1) into byte j, low nibble first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import QK_K
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K as GGUF_Q4_K

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

    def nibble_planes(self) -> BlockLinear:
        """An 8-bit weight as an exact 4-bit one over the input repeated twice ([x, x], K' = 2K): the low
        nibbles with scale s, then the high nibbles with scale 16 s. The additive term stays with `self`."""
        assert self.bits == 8
        q = self.codes
        lo, hi = q & 0x0F, q >> 4
        return BlockLinear(
            self.n, 2 * self.k, 4,
            np.concatenate([_pack4(lo), _pack4(hi)], axis=1),
            np.concatenate([self.scales, self.scales * np.float32(16)], axis=1),
            np.concatenate([self.zero_points % 16, self.zero_points // 16], axis=1).astype(np.uint8),
            None, self.block_size,
        )

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


def _pack4(q: np.ndarray) -> np.ndarray:
    """uint8 [..., block] codes 0..15 in element order -> ONNX Runtime's packing (elements 2j, 2j+1 in byte j)."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """A GGUF 16-byte nibble block -> its 32 codes in element order (low nibbles first)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: the 4-byte high-bit mask -> bit j of element j, as uint8 [..., 32]."""
    bits = qh.copy().view(np.uint32)  # [..., 1]
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _blocks(t: GGUFTensor, block_bytes: int, weights_per_block: int) -> np.ndarray:
    return np.asarray(t.raw).reshape(t.rows, t.cols // weights_per_block, block_bytes)


def _full(t: GGUFTensor, n_blocks: int, value: int) -> np.ndarray:
    return np.full((t.rows, n_blocks), value, np.uint8)


def _k_scales(blocks: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 12 packed bytes of 6-bit sub-block scales and minimums (gguf's own unpacking)."""
    n, nsb = blocks.shape[:2]
    sc, m = GGUF_Q4_K.get_scale_min(blocks[..., start:start + 12].reshape(n * nsb, 12))
    return sc.reshape(n, nsb, 8).astype(np.float32), m.reshape(n, nsb, 8).astype(np.float32)


def _legacy(t: GGUFTensor) -> BlockLinear:
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: blocks of 32 with one fp16 scale (and minimum)."""
    n, k, nb = t.rows, t.cols, t.cols // BLOCK
    if t.qtype == Q.Q4_0:
        b = _blocks(t, 18, BLOCK)
        return BlockLinear(n, k, 4, _pack4(_nibbles(b[..., 2:])), _f16(b, 0), _full(t, nb, 8))
    if t.qtype == Q.Q4_1:
        b = _blocks(t, 20, BLOCK)
        return BlockLinear(n, k, 4, _pack4(_nibbles(b[..., 4:])), _f16(b, 0), _full(t, nb, 0), _f16(b, 2))
    if t.qtype == Q.Q5_0:
        b = _blocks(t, 22, BLOCK)
        q = _nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << 4)
        return BlockLinear(n, k, 8, q + np.uint8(112), _f16(b, 0), _full(t, nb, 128))
    if t.qtype == Q.Q5_1:
        b = _blocks(t, 24, BLOCK)
        q = _nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << 4)
        return BlockLinear(n, k, 8, q + np.uint8(128), _f16(b, 0), _full(t, nb, 128), _f16(b, 2))
    assert t.qtype == Q.Q8_0
    b = _blocks(t, 34, BLOCK)
    codes = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return BlockLinear(n, k, 8, codes, _f16(b, 0), _full(t, nb, 128))


def _k_quant(t: GGUFTensor) -> BlockLinear:
    """Q2_K .. Q6_K: super-blocks of 256 weights, each sub-block one ONNX Runtime block."""
    n, k, nsb = t.rows, t.cols, t.cols // QK_K
    if t.qtype == Q.Q4_K or t.qtype == Q.Q5_K:
        b = _blocks(t, 144 if t.qtype == Q.Q4_K else 176, QK_K)
        sc, m = _k_scales(b, 4)
        qs = b[..., -128:].reshape(n, nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, nsb, 8, 32)
        scales = (_f16(b, 0)[..., None] * sc).reshape(n, -1)
        mins = -(_f16(b, 2)[..., None] * m).reshape(n, -1)
        if t.qtype == Q.Q4_K:
            return BlockLinear(n, k, 4, _pack4(q.reshape(n, -1, 32)), scales, _full(t, nsb * 8, 0), mins)
        qh = b[..., 16:48].reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
        q5 = q | ((qh & 1) << 4)
        return BlockLinear(n, k, 8, (q5 + np.uint8(128)).reshape(n, -1, 32), scales, _full(t, nsb * 8, 128), mins)
    if t.qtype == Q.Q6_K:
        b = _blocks(t, 210, QK_K)
        ql = b[..., :128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        qh = b[..., 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        q = (ql & 0x0F).reshape(n, nsb, 8, 32) | ((qh & 0x03).reshape(n, nsb, 8, 32) << 4)
        scales = (_f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)).reshape(n, -1)
        return BlockLinear(n, k, 8, (q + np.uint8(96)).reshape(n, -1, 16), scales, _full(t, nsb * 16, 128),
                           None, 16)
    if t.qtype == Q.Q2_K:
        b = _blocks(t, 84, QK_K)
        sc = b[..., :16]
        qs = b[..., 16:80].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        q2 = (qs & 0x03).reshape(n, -1, 16)
        scales = (_f16(b, 80)[..., None] * (sc & 0x0F).astype(np.float32)).reshape(n, -1)
        mins = -(_f16(b, 82)[..., None] * (sc >> 4).astype(np.float32)).reshape(n, -1)
        return BlockLinear(n, k, 4, _pack4(q2 + np.uint8(8)), scales, _full(t, nsb * 16, 8), mins, 16)
    assert t.qtype == Q.Q3_K
    b = _blocks(t, 110, QK_K)
    packed = b[..., 96:108]
    lo = (packed[..., :8].reshape(n, nsb, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)).reshape(n, nsb, 16)
    hi = (packed[..., 8:].reshape(n, nsb, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1))
    sc = ((lo & 0x0F) | ((hi.reshape(n, nsb, 16) & 0x03) << 4)).astype(np.float32) - 32
    ql = b[..., 32:96].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    hm = b[..., :32].reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    # q = low 2 bits - 4 unless the mask bit is set; code = q + 8
    codes = (ql & 0x03).reshape(n, nsb, 8, 32) + (hm & 1) * np.uint8(4) + np.uint8(4)
    scales = (_f16(b, 108)[..., None] * sc).reshape(n, -1)
    return BlockLinear(n, k, 4, _pack4(codes.reshape(n, -1, 16)), scales, _full(t, nsb * 16, 8), None, 16)


def linear_weight(t: GGUFTensor) -> Linear:
    if t.qtype in (Q.F32, Q.F16, Q.BF16):
        return DenseLinear(t.rows, t.cols, t.dequantize())
    if t.qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _k_quant(t)
    if t.qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0):
        return _legacy(t)
    raise ValueError(f"no block layout for {t.qtype.name}")  # read_gguf refuses these earlier


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
