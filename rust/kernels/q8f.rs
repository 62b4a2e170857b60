//! `y = x · Wᵀ` for an 8-bit block-quantized weight W [N, K] and fp32 activations x [M, K]: GGUF's Q5_0,
//! Q5_1, Q8_0, Q5_K and Q6_K tensors, whose 5-, 6- and 8-bit codes the converter holds as 8-bit codes with
//! zero point 128 (convert/quant_blocks.py).
//!
//! W is stored in blocks of `block` (32, or 16 for Q6_K's sub-blocks) along K:
//!
//! ```text
//!   W[n, block * b + j] = scale[i] * q[i, j] + offset[i]      i = index of block (n, b)
//! ```
//!
//! with q the signed code (the stored 8-bit code minus its zero point, which the converter subtracts once) and
//! `offset` the block's additive term (Q5_1's minimum, Q5_K's `-dmin * m`) or absent. Blocks are indexed row
//! by row or, with `group` G, G rows interleaved, exactly as in kernels::q4.
//!
//! Activations stay fp32 and each weight is formed by one fused multiply-add from its code, scale and offset,
//! so the result is the fp32 product with the dequantized matrix up to summation order (no int8 rounding of x:
//! that is the LM head's approximate pass, kernels::q8).
//!
//! AVX-512: 16 codes sign-extended to int32 and converted (two instructions with the load folded in), one
//! multiply(-add) by the block scale, then the dequantized vector serves up to MC rows of x; R weight rows run
//! together to hide the multiply-add latency (the tiling and column panels of kernels::q4). AVX2+FMA does the
//! same 8 at a time; a portable loop covers everything else.

use core::ops::Range;

pub use super::q4::Isa;
pub use super::Scale;
use super::BlockMatrix;

/// What an 8-bit matrix adds to its codes and scales (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Q8Format<'a, S = f32> {
    /// One per block (an additive term), or none; stored as the scales are.
    pub offsets: Option<&'a [S]>,
    /// Rows whose blocks are interleaved: 1 = none; N must be a multiple of it.
    pub group: usize,
}

row_blocks!(Q8Format);

/// A borrowed 8-bit weight matrix with signed codes (bytes read as i8).
pub type Q8FWeights<'a, S = f32> = BlockMatrix<'a, Q8Format<'a, S>, S>;

impl<'a, S: Scale> Q8FWeights<'a, S> {
    /// `codes`: N * K bytes (int8 two's complement); `scales` and the format's `offsets`: N * K/block values;
    /// K a multiple of 32, block 16 or 32.
    pub fn new(n: usize, k: usize, block: usize, codes: &'a [u8], scales: &'a [S], format: Q8Format<'a, S>) -> Result<Self, &'static str> {
        if block != 16 && block != 32 {
            return Err("the block must be 16 or 32 weights");
        }
        Self::checked_rows(n, k, block, codes, scales, block, format)
    }

    /// The fp32 weight W[n, j] (for tests and the portable path).
    pub fn weight(&self, n: usize, j: usize) -> f32 {
        let block = self.first_block(n) + (j / self.block) * self.format.group;
        let q = self.codes[block * self.block + j % self.block] as i8;
        f32::from(q).mul_add(self.scales[block].to_f32(), self.format.offsets.map_or(0.0, |o| o[block].to_f32()))
    }
}

fp32_linear_entry_points!(Q8FWeights);

/// Each weight row dequantized once, then applied to every row of x.
unsafe fn portable<S: Scale>(w: &Q8FWeights<S>, x: *const f32, m: usize, y: *mut f32, cols: Range<usize>) {
    let xs = core::slice::from_raw_parts(x, m * w.k);
    let mut row = vec![0f32; w.k];
    for n in cols {
        for (j, v) in row.iter_mut().enumerate() {
            *v = w.weight(n, j);
        }
        for (mi, xr) in xs.chunks_exact(w.k).enumerate() {
            *y.add(mi * w.n + n) = row.iter().zip(xr).fold(0f32, |acc, (wv, xv)| wv.mul_add(*xv, acc));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::WIDE_VALUES;
    use core::mem::MaybeUninit;
    use super::{Q8FWeights, Q8Format, Scale};
    use core::arch::x86_64::*;
    use core::ops::Range;

    type Tile<'w, 'a, S> = super::super::Tile<'w, 'a, Q8Format<'a, S>, S>;

    x86_drivers!(Q8FWeights);

    /// The block size as a constant (V vectors of 16 weights per block), so the inner loops unroll.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<S: Scale, const R: usize, const MC: usize, const OFF: bool>(t: Tile<S>) {
        if t.w.block == 16 {
            tile512_v::<S, R, MC, OFF, 1>(t)
        } else {
            tile512_v::<S, R, MC, OFF, 2>(t)
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile512_v<S: Scale, const R: usize, const MC: usize, const OFF: bool, const V: usize>(t: Tile<S>) {
        let Tile { w, x, y, n0 } = t;
        let bs = 16 * V;
        let nb = w.k / bs;
        let mut bufs = [MaybeUninit::<[f32; WIDE_VALUES]>::uninit(); 2];
        let (codes, scales, offsets, base) = t.arrays::<R>(&mut bufs);
        let codes = codes.cast::<i8>();
        // A tile of fewer rows than the converter's row groups (8) reads one line in every few of its blocks' bytes,
        // too sparse a stream for the hardware prefetcher (batch-8 steps stalled on these loads): such a tile asks
        // for its own lines two row groups ahead. A whole group's tile (decode) streams on its own.
        let sparse = R < w.format.group;
        let ahead = 2 * w.format.group * w.k;
        let mut acc = [[_mm512_setzero_ps(); R]; MC];
        for b in 0..nb {
            let mut wv = [[_mm512_setzero_ps(); V]; R];
            for r in 0..R {
                let block = base[r] + b * w.format.group;
                if sparse {
                    _mm_prefetch::<_MM_HINT_T0>(codes.add(block * bs).wrapping_add(ahead).cast());
                }
                let d = _mm512_set1_ps(*scales.at(block));
                for (v, slot) in wv[r].iter_mut().enumerate() {
                    let c = _mm512_cvtepi8_epi32(_mm_loadu_si128(codes.add(block * bs + 16 * v).cast()));
                    let q = _mm512_cvtepi32_ps(c);
                    *slot = if OFF { _mm512_fmadd_ps(q, d, _mm512_set1_ps(*offsets.at(block))) } else { _mm512_mul_ps(q, d) };
                }
            }
            for (mi, a) in acc.iter_mut().enumerate() {
                let xb = x.add(mi * w.k + b * bs);
                for v in 0..V {
                    let xv = _mm512_loadu_ps(xb.add(16 * v));
                    for r in 0..R {
                        a[r] = _mm512_fmadd_ps(wv[r][v], xv, a[r]);
                    }
                }
            }
        }
        let sums = super::super::cpu::tile_sums(&acc);
        for mi in 0..MC {
            for r in 0..R {
                *y.add(mi * w.n + n0 + r) = sums[mi * R + r];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<S: Scale, const R: usize, const MC: usize, const OFF: bool>(t: Tile<S>) {
        let Tile { w, x, y, n0 } = t;
        let bs = w.block;
        let nb = w.k / bs;
        let mut bufs = [MaybeUninit::<[f32; WIDE_VALUES]>::uninit(); 2];
        let (codes, scales, offsets, base) = t.arrays::<R>(&mut bufs);
        let codes = codes.cast::<i8>();
        let mut acc = [[_mm256_setzero_ps(); R]; MC];
        for b in 0..nb {
            for (r, first) in base.iter().enumerate() {
                let block = first + b * w.format.group;
                let (d, o) = (_mm256_set1_ps(*scales.at(block)), if OFF { _mm256_set1_ps(*offsets.at(block)) } else { _mm256_setzero_ps() });
                for part in 0..bs / 8 {
                    let c = _mm256_cvtepi8_epi32(_mm_loadl_epi64(codes.add(block * bs + 8 * part).cast()));
                    let wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), d, o);
                    for (mi, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(x.add(mi * w.k + b * bs + 8 * part));
                        a[r] = _mm256_fmadd_ps(wv, xv, a[r]);
                    }
                }
            }
        }
        for (mi, a) in acc.iter().enumerate() {
            for (r, v) in a.iter().enumerate() {
                let s = _mm_add_ps(_mm256_castps256_ps128(*v), _mm256_extractf128_ps::<1>(*v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                *y.add(mi * w.n + n0 + r) = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_columns_compose, assert_every_isa, assert_same_every_isa};
    use super::*;
    use half::f16;

    /// Deterministic pseudo-random values without an extra crate.
    fn noise(seed: usize, i: usize) -> f32 {
        (((i * 2654435761 + seed * 40503) % 100_003) as f32 / 50_001.5) - 1.0
    }

    /// The plain definition in f64 from the formula (not from `weight`): y and sum |w x| for the error bound.
    #[allow(clippy::too_many_arguments)]
    fn reference(n: usize, k: usize, block: usize, group: usize, codes: &[u8], scales: &[f32], offsets: Option<&[f32]>, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
        let nb = k / block;
        let (mut y, mut mag) = (vec![0.0; m * n], vec![0.0; m * n]);
        for mi in 0..m {
            for nn in 0..n {
                for j in 0..k {
                    let i = ((nn / group) * nb + j / block) * group + nn % group;
                    let q = f64::from(codes[i * block + j % block] as i8);
                    let wv = q * f64::from(scales[i]) + offsets.map_or(0.0, |o| f64::from(o[i]));
                    let p = wv * f64::from(x[mi * k + j]);
                    y[mi * n + nn] += p;
                    mag[mi * n + nn] += p.abs();
                }
            }
        }
        (y, mag)
    }

    #[test]
    fn every_isa_matches_the_definition() {
        for &(n, k, m) in &[(8, 32, 1), (13, 64, 1), (24, 96, 3), (64, 640, 1), (37, 640, 5), (16, 2048, 8), (9, 64, 9), (40, 64, 2)] {
            for block in [16, 32] {
                let blocks = n * k / block;
                let codes: Vec<u8> = (0..n * k).map(|i| (noise(1, i) * 127.9) as i8 as u8).collect();
                let scales: Vec<f32> = (0..blocks).map(|i| noise(2, i) * 0.05).collect();
                let offs: Vec<f32> = (0..blocks).map(|i| noise(3, i) * 0.2).collect();
                let x: Vec<f32> = (0..m * k).map(|i| noise(4 + m, i)).collect();
                for group in [1, if n % 8 == 0 { 8 } else { 1 }] {
                    for offsets in [Some(offs.as_slice()), None] {
                        let w = Q8FWeights::new(n, k, block, &codes, &scales, Q8Format { offsets, group }).unwrap();
                        let (want, mag) = reference(n, k, block, group, &codes, &scales, offsets, &x, m);
                        let case = format!("n={n} k={k} m={m} block={block} group={group}");
                        assert_every_isa(&want, &mag, &case, |isa, y| matmul(&w, &x, m, y, isa));
                    }
                }
            }
        }
    }

    #[test]
    fn half_scales_compute_what_their_fp32_values_do() {
        let (n, k, m) = (16, 640, 3);
        let codes: Vec<u8> = (0..n * k).map(|i| (noise(1, i) * 127.9) as i8 as u8).collect();
        let x: Vec<f32> = (0..m * k).map(|i| noise(4, i)).collect();
        for block in [16, 32] {
            let s16: Vec<f16> = (0..n * k / block).map(|i| f16::from_f32(noise(2, i) * 0.05)).collect();
            let o16: Vec<f16> = (0..n * k / block).map(|i| f16::from_f32(noise(3, i) * 0.2)).collect();
            let (s32, o32): (Vec<f32>, Vec<f32>) = (s16.iter().map(|v| v.to_f32()).collect(), o16.iter().map(|v| v.to_f32()).collect());
            let w16 = Q8FWeights::new(n, k, block, &codes, &s16, Q8Format { offsets: Some(&o16), group: 8 }).unwrap();
            let w32 = Q8FWeights::new(n, k, block, &codes, &s32, Q8Format { offsets: Some(&o32), group: 8 }).unwrap();
            assert_same_every_isa(m * n, |isa, y| matmul(&w16, &x, m, y, isa), |isa, y| matmul(&w32, &x, m, y, isa));
        }
    }

    #[test]
    fn column_ranges_compose() {
        let (n, k) = (24, 64);
        let codes: Vec<u8> = (0..n * k).map(|i| (i * 37 % 256) as u8).collect();
        let scales: Vec<f32> = (0..n * k / 16).map(|i| noise(5, i)).collect();
        let w = Q8FWeights::new(n, k, 16, &codes, &scales, Q8Format { offsets: None, group: 8 }).unwrap();
        let x: Vec<f32> = (0..2 * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut whole = vec![0.0; 2 * n];
        matmul(&w, &x, 2, &mut whole, Isa::detect());
        // SAFETY: x is [2, K] and each range writes its own columns of a [2, N] y.
        assert_columns_compose(&whole, |cols, y| unsafe { matmul_cols(&w, x.as_ptr(), 2, y, cols, Isa::detect()) });
    }

    #[test]
    fn bad_shapes_are_refused() {
        let (codes, scales) = ([0u8; 4 * 64], [0f32; 16]);
        let plain = Q8Format { offsets: None, group: 1 };
        assert!(Q8FWeights::new(4, 64, 32, &codes, &scales[..8], plain).is_ok());
        assert!(Q8FWeights::new(4, 64, 16, &codes, &scales, plain).is_ok());
        assert!(Q8FWeights::new(4, 48, 16, &codes[..4 * 48], &scales[..12], plain).is_err()); // K not a multiple of 32
        assert!(Q8FWeights::new(4, 64, 32, &codes[1..], &scales[..8], plain).is_err());
        assert!(Q8FWeights::new(4, 64, 8, &codes, &scales, plain).is_err()); // block 8
        assert!(Q8FWeights::new(4, 64, 16, &codes, &scales[..8], plain).is_err()); // too few scales
        assert!(Q8FWeights::new(4, 64, 32, &codes, &scales[..8], Q8Format { offsets: Some(&scales[1..8]), group: 1 }).is_err());
        assert!(Q8FWeights::new(4, 64, 32, &codes, &scales[..8], Q8Format { offsets: None, group: 8 }).is_err());
    }
}
