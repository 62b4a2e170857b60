//! `y = x · Wᵀ` for a 4-bit block-quantized weight W [N, K] and fp32 activations x [M, K].
//!
//! W is stored in blocks of 32 along K (GGUF's Q4_0 / Q4_1 blocking):
//!
//! ```text
//!   W[n, 32b + j] = scale[i] * (q[i, j] - zero_point) + offset[i]      i = index of block (n, b)
//!   q[i, j]       = low nibble of codes[i, j] for j < 16, high nibble of codes[i, j - 16] otherwise
//! ```
//!
//! Blocks are indexed row by row (`i = n * K/32 + b`, `group` 1) or, with `group` G, G rows interleaved:
//! `i = ((n / G) * K/32 + b) * G + n % G`, so the G rows a tile reads together are one sequential stream
//! instead of G streams a cache line apart (measured on SmolLM2's down projection, K=1536: separate rows
//! outran the hardware prefetcher and ran at half the bytes per second of the interleaved layout).
//!
//! which is GGUF's own nibble order, so a block's low nibbles meet x[32b .. 32b+16] and its high nibbles
//! x[32b+16 .. 32b+32], two contiguous loads. Activations stay fp32 and every weight is formed exactly as the
//! formula says (one fused multiply-add), so the result is the fp32 product with the dequantized matrix up to
//! summation order; nothing is rounded to int8 on the way (llama.cpp's and ONNX Runtime's fast paths do that,
//! and it flips near-tie greedy tokens).
//!
//! Why it is fast where it is (decode, M = 1..8, is the case that matters):
//! * AVX-512: the 16 possible weights of a block are one register, `scale * (iota - zp) + offset`, and
//!   `vpermps` uses only the low 4 bits of each index, so the zero-extended code bytes index that table
//!   directly (low nibbles) and after one shift (high nibbles): 32 dequantized weights in five instructions,
//!   with no int -> float conversion.
//! * The dequantized block is used for up to `MC` (12) rows of x at once, so batched decode and prefill pay
//!   the unpacking once per weight row and 12 sequences or prompt tokens, not once per row of x.
//! * Several weight rows run together (`R` accumulators per x row) to hide the fused multiply-add latency.
//! * AVX2+FMA (no 16-wide permute) converts the nibbles to floats; a portable loop covers everything else.

use core::ops::Range;

pub use super::{Scale, BLOCK};
use super::BlockMatrix;

const BLOCK_BYTES: usize = BLOCK / 2;

/// What a 4-bit matrix adds to its codes and scales (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Q4Format<'a, S = f32> {
    /// One per block (Q4_1's minimum), or none (Q4_0); stored as the scales are.
    pub offsets: Option<&'a [S]>,
    /// 0..=15.
    pub zero_point: u8,
    /// Rows whose blocks are interleaved: 1 = none; N must be a multiple of it.
    pub group: usize,
}

row_blocks!(Q4Format);

/// A borrowed 4-bit weight matrix whose block scales and offsets are stored as `S` (f32 or f16).
pub type Q4Weights<'a, S = f32> = BlockMatrix<'a, Q4Format<'a, S>, S>;

impl<'a, S: Scale> Q4Weights<'a, S> {
    /// `codes`: N * K/2 bytes; `scales` and the format's `offsets`: N * K/32 values; K a multiple of 32.
    pub fn new(n: usize, k: usize, codes: &'a [u8], scales: &'a [S], format: Q4Format<'a, S>) -> Result<Self, &'static str> {
        if format.zero_point > 15 {
            return Err("the zero point of a 4-bit code is at most 15");
        }
        Self::checked_rows(n, k, BLOCK, codes, scales, BLOCK_BYTES, format)
    }

    /// The fp32 weight W[n, j] (for tests and the portable path).
    pub fn weight(&self, n: usize, j: usize) -> f32 {
        let (b, i) = (j / BLOCK, j % BLOCK);
        let block = self.first_block(n) + b * self.format.group;
        let byte = self.codes[block * BLOCK_BYTES + i % BLOCK_BYTES];
        let q = if i < BLOCK_BYTES { byte & 0x0F } else { byte >> 4 };
        let offset = self.format.offsets.map_or(0.0, |o| o[block].to_f32());
        (f32::from(q) - f32::from(self.format.zero_point)).mul_add(self.scales[block].to_f32(), offset)
    }
}

/// Instruction sets a kernel can run on; `Isa::detect` picks the best this CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                out.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                out.push(Isa::Avx512);
            }
        }
        out
    }
}

fp32_linear_entry_points!(Q4Weights);

unsafe fn portable<S: Scale>(w: &Q4Weights<S>, x: *const f32, m: usize, y: *mut f32, cols: Range<usize>) {
    let x = core::slice::from_raw_parts(x, m * w.k);
    for n in cols {
        for mi in 0..m {
            let row = &x[mi * w.k..(mi + 1) * w.k];
            let mut sum = 0.0f32;
            for (j, xv) in row.iter().enumerate() {
                sum = w.weight(n, j).mul_add(*xv, sum);
            }
            *y.add(mi * w.n + n) = sum;
        }
    }
}

/// x[M, 2K] = [gate | up] -> out[M, K] = silu(gate) * up (SwiGLU), to fp32 rounding (exp within 2 ulp).
pub fn silu_mul(gate_up: &[f32], k: usize, out: &mut [f32]) {
    assert!(k > 0 && gate_up.len() % (2 * k) == 0 && out.len() * 2 == gate_up.len());
    for (row, o) in gate_up.chunks_exact(2 * k).zip(out.chunks_exact_mut(k)) {
        let (gate, up) = row.split_at(k);
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected; the slices have k elements each.
            done = unsafe { x86::silu_mul(gate, up, o) };
        }
        for ((o, g), u) in o[done..].iter_mut().zip(&gate[done..]).zip(&up[done..]) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::WIDE_VALUES;
    use core::mem::MaybeUninit;
    use super::{Q4Format, Q4Weights, Scale, BLOCK, BLOCK_BYTES};
    use core::arch::x86_64::*;
    use core::ops::Range;

    type Tile<'w, 'a, S> = super::super::Tile<'w, 'a, Q4Format<'a, S>, S>;

    x86_drivers!(Q4Weights);

    /// silu(g) * u, 8 at a time, for the whole multiples of 8; returns how many were done. exp is Cephes'
    /// single-precision polynomial (range reduction by ln 2 in two parts, degree-5 polynomial, 2^n by
    /// exponent bits): within 2 ulp of the true value, where a scalar `exp` per element would cost most of
    /// the down projection's time (1536 per row).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> usize {
        let whole = gate.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..whole).step_by(8) {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let e = super::super::cpu::exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(up.as_ptr().add(i))));
        }
        whole
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<S: Scale, const R: usize, const MC: usize, const OFF: bool>(t: Tile<S>) {
        let Tile { w, x, y, n0 } = t;
        let nb = w.k / BLOCK;
        let iota = _mm512_sub_ps(
            _mm512_setr_ps(0., 1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12., 13., 14., 15.),
            _mm512_set1_ps(f32::from(w.format.zero_point)),
        );
        let mut bufs = [MaybeUninit::<[f32; WIDE_VALUES]>::uninit(); 2];
        let (codes, scales, offsets, base) = t.arrays::<R>(&mut bufs);
        let mut acc = [[_mm512_setzero_ps(); R]; MC];
        for b in 0..nb {
            // The R rows' blocks first (2R registers), then each x row: two loads and 2R multiply-adds.
            let mut w_lo = [_mm512_setzero_ps(); R];
            let mut w_hi = [_mm512_setzero_ps(); R];
            for r in 0..R {
                let block = base[r] + b * w.format.group;
                let d = _mm512_set1_ps(*scales.at(block));
                let table = if OFF {
                    _mm512_fmadd_ps(iota, d, _mm512_set1_ps(*offsets.at(block)))
                } else {
                    _mm512_mul_ps(iota, d)
                };
                let c = _mm512_cvtepu8_epi32(_mm_loadu_si128(codes.add(block * BLOCK_BYTES) as *const __m128i));
                w_lo[r] = _mm512_permutexvar_ps(c, table);
                w_hi[r] = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(c), table);
            }
            for mi in 0..MC {
                let xb = x.add(mi * w.k + b * BLOCK);
                let (lo, hi) = (_mm512_loadu_ps(xb), _mm512_loadu_ps(xb.add(16)));
                for r in 0..R {
                    acc[mi][r] = _mm512_fmadd_ps(w_lo[r], lo, acc[mi][r]);
                    acc[mi][r] = _mm512_fmadd_ps(w_hi[r], hi, acc[mi][r]);
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
        let nb = w.k / BLOCK;
        let zp = _mm256_set1_ps(f32::from(w.format.zero_point));
        let nibble = _mm_set1_epi8(0x0F);
        let mut bufs = [MaybeUninit::<[f32; WIDE_VALUES]>::uninit(); 2];
        let (codes, scales, offsets, base) = t.arrays::<R>(&mut bufs);
        let mut acc = [[_mm256_setzero_ps(); R]; MC];
        for b in 0..nb {
            for r in 0..R {
                let block = base[r] + b * w.format.group;
                let (d, o) = (_mm256_set1_ps(*scales.at(block)), if OFF { _mm256_set1_ps(*offsets.at(block)) } else { _mm256_setzero_ps() });
                let bytes = _mm_loadu_si128(codes.add(block * BLOCK_BYTES) as *const __m128i);
                let lo = _mm_and_si128(bytes, nibble);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(bytes), nibble);
                let q = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                for (part, qp) in q.iter().enumerate() {
                    let qf = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(*qp));
                    let wv = _mm256_fmadd_ps(_mm256_sub_ps(qf, zp), d, o);
                    for mi in 0..MC {
                        let xv = _mm256_loadu_ps(x.add(mi * w.k + b * BLOCK + 8 * part));
                        acc[mi][r] = _mm256_fmadd_ps(wv, xv, acc[mi][r]);
                    }
                }
            }
        }
        for mi in 0..MC {
            for r in 0..R {
                let v = acc[mi][r];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                *y.add(mi * w.n + n0 + r) = _mm_cvtss_f32(s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{assert_columns_compose, assert_every_isa, assert_same_every_isa, Lcg};
    use super::*;
    use half::f16;

    struct Case {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offsets: Vec<f32>,
    }

    fn case(n: usize, k: usize, seed: u64) -> Case {
        let mut rng = Lcg(seed);
        let blocks = n * k / BLOCK;
        Case {
            codes: (0..blocks * BLOCK_BYTES).map(|_| rng.next() as u8).collect(),
            scales: (0..blocks).map(|_| rng.float() * 0.05).collect(),
            offsets: (0..blocks).map(|_| rng.float() * 0.2).collect(),
        }
    }

    /// The plain definition in f64: sum_j W[n, j] * x[m, j], with |W| |x| for the error bound.
    fn reference(w: &Q4Weights, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut mag) = (vec![0.0; m * w.n()], vec![0.0; m * w.n()]);
        for mi in 0..m {
            for n in 0..w.n() {
                for j in 0..w.k() {
                    let p = f64::from(w.weight(n, j)) * f64::from(x[mi * w.k() + j]);
                    y[mi * w.n() + n] += p;
                    mag[mi * w.n() + n] += p.abs();
                }
            }
        }
        (y, mag)
    }

    #[test]
    fn every_isa_matches_the_definition() {
        for &(n, k, m) in &[(8, 32, 1), (13, 64, 1), (24, 96, 3), (64, 576, 1), (37, 576, 5), (16, 1536, 8), (9, 64, 9), (40, 64, 2)] {
            let c = case(n, k, (n * k * m) as u64);
            let x: Vec<f32> = {
                let mut rng = Lcg(7 + m as u64);
                (0..m * k).map(|_| rng.float()).collect()
            };
            for (zp, group) in [(0u8, 1), (8, 1), (0, if n % 8 == 0 { 8 } else { 1 })] {
                for offsets in [Some(c.offsets.as_slice()), None] {
                    let w = Q4Weights::new(n, k, &c.codes, &c.scales, Q4Format { offsets, zero_point: zp, group }).unwrap();
                    let (want, mag) = reference(&w, &x, m);
                    let case = format!("n={n} k={k} m={m} zp={zp}");
                    assert_every_isa(&want, &mag, &case, |isa, y| matmul(&w, &x, m, y, isa));
                }
            }
        }
    }

    #[test]
    fn half_scales_compute_what_their_fp32_values_do() {
        for &(n, k, m) in &[(16, 64, 1), (24, 576, 3), (16, 1536, 8), (8, 64, 13)] {
            let c = case(n, k, 11 + m as u64);
            let halves = |v: &[f32]| v.iter().map(|&s| f16::from_f32(s)).collect::<Vec<_>>();
            let (s16, o16) = (halves(&c.scales), halves(&c.offsets));
            let (s32, o32): (Vec<f32>, Vec<f32>) = (s16.iter().map(|v| v.to_f32()).collect(), o16.iter().map(|v| v.to_f32()).collect());
            let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.61).sin()).collect();
            for (group, with_offsets) in [(1, true), (8, true), (8, false)] {
                let w16 = Q4Weights::new(n, k, &c.codes, &s16, Q4Format { offsets: with_offsets.then_some(&o16[..]), zero_point: 8, group }).unwrap();
                let w32 = Q4Weights::new(n, k, &c.codes, &s32, Q4Format { offsets: with_offsets.then_some(&o32[..]), zero_point: 8, group }).unwrap();
                assert_same_every_isa(m * n, |isa, y| matmul(&w16, &x, m, y, isa), |isa, y| matmul(&w32, &x, m, y, isa));
            }
        }
    }

    #[test]
    fn column_ranges_compose() {
        let c = case(24, 64, 3);
        let w = Q4Weights::new(24, 64, &c.codes, &c.scales, Q4Format { offsets: Some(&c.offsets), zero_point: 8, group: 8 }).unwrap();
        let x: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut whole = vec![0.0; 2 * 24];
        matmul(&w, &x, 2, &mut whole, Isa::detect());
        // SAFETY: x is [2, K] and each range writes its own columns of a [2, N] y.
        assert_columns_compose(&whole, |cols, y| unsafe { matmul_cols(&w, x.as_ptr(), 2, y, cols, Isa::detect()) });
    }

    #[test]
    fn bad_shapes_are_refused() {
        let c = case(4, 64, 1);
        let plain = Q4Format { offsets: None, zero_point: 8, group: 1 };
        assert!(Q4Weights::new(4, 48, &c.codes, &c.scales, plain).is_err());
        assert!(Q4Weights::new(4, 64, &c.codes[1..], &c.scales, plain).is_err());
        assert!(Q4Weights::new(4, 64, &c.codes, &c.scales, Q4Format { offsets: Some(&c.offsets[1..]), ..plain }).is_err());
        assert!(Q4Weights::new(4, 64, &c.codes, &c.scales, Q4Format { zero_point: 16, ..plain }).is_err());
        assert!(Q4Weights::new(4, 64, &c.codes, &c.scales, Q4Format { group: 8, ..plain }).is_err());
    }

    #[test]
    fn silu_mul_is_within_fp32_rounding_everywhere() {
        let k = 4099; // a tail that the vector loop leaves to the scalar one
        let gate: Vec<f32> = (0..k).map(|i| (i as f32 - 2050.0) * 0.05).collect();
        let gate_up: Vec<f32> = gate.iter().copied().chain((0..k).map(|i| 1.0 + (i % 7) as f32 * 0.25)).collect();
        let mut out = vec![0f32; k];
        silu_mul(&gate_up, k, &mut out);
        for i in 0..k {
            let (g, u) = (f64::from(gate_up[i]), f64::from(gate_up[k + i]));
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((f64::from(out[i]) - want).abs() <= 4.0 * f64::from(f32::EPSILON) * want.abs() + 1e-30, "{i}: {} vs {want}", out[i]);
        }
    }

    #[test]
    fn silu_mul_is_swiglu() {
        let gu = [1.0f32, -2.0, 0.5, 3.0, 10.0, 0.0, -1.0, 2.0];
        let mut out = [0.0f32; 4];
        silu_mul(&gu, 2, &mut out);
        let silu = |g: f32| g / (1.0 + (-g).exp());
        assert_eq!(out, [silu(1.0) * 0.5, silu(-2.0) * 3.0, silu(10.0) * -1.0, silu(0.0) * 2.0]);
    }
}
