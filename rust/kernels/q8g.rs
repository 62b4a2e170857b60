//! `y ≈ x · Wᵀ` for an 8-bit block-quantized W held in row groups of 16, with x rounded to int8 per block of 32
//! (kernels::q8's `QuantizedRow`): an LM head's approximate scoring pass, one integer dot product per lane and row.
//!
//! kernels::q8 reads W row by row, so each `vpdpbusd` sums two blocks of one row spread over 16 lanes, and every
//! block of every row needs its own conversion, scale product and accumulation (four vector operations per 64
//! products). Here the rows of a group share every instruction:
//!
//! ```text
//!   codes: group g (rows 16g .. 16g + 16), block b: 512 bytes at (g * K/32 + b) * 512, as 8 lines of 64 bytes;
//!          line j holds bytes 4j .. 4j + 4 of each row r of the group, at 64 j + 4 r
//!   scales: fp32, [g, b, r] at (g * K/32 + b) * 16 + r
//! ```
//!
//! so one `vpdpbusd` multiplies four code bytes of each of 16 rows by the same four bytes of x (broadcast), lane r
//! summing row r; a block is 8 of them, then one conversion and one multiply-add for all 16 rows. Per row and block
//! `y += float(sum_j codes * xq - 128 * sum xq) * (scale * dx)` (an exact integer, then one fused multiply-add), in
//! block order, so AVX-512 VNNI, AVX2 (`vpmaddubsw` on |code - 128| and xq with its sign, `vpmaddwd`) and the
//! portable loop give the same bits, and a row's result does not depend on the batch around it.
//!
//! The same layout serves the embedding's and the rescoring's gathers (`row`), so the tied head is stored once.

use core::ops::Range;

use super::q4::Isa;
use super::q8::QuantizedRow;
use super::BLOCK;

/// Rows of a group: one lane each.
pub const GROUP: usize = 16;
/// Bytes of a group's block: 32 codes of 16 rows.
const GROUP_BLOCK: usize = GROUP * BLOCK;

/// A borrowed 8-bit weight matrix [N, K] in the grouped layout (N a multiple of 16, K of 32).
pub struct Q8Grouped<'a> {
    n: usize,
    k: usize,
    codes: &'a [u8],
    scales: &'a [f32],
}

impl<'a> Q8Grouped<'a> {
    pub fn new(n: usize, k: usize, codes: &'a [u8], scales: &'a [f32]) -> Result<Self, &'static str> {
        if n == 0 || n % GROUP != 0 || k == 0 || k % BLOCK != 0 {
            return Err("N must be a positive multiple of 16 and K of 32");
        }
        if codes.len() != n * k || scales.len() != n * k / BLOCK {
            return Err("codes must hold N * K bytes and scales N * K / 32 values");
        }
        Ok(Q8Grouped { n, k, codes, scales })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Row `n` dequantized: `(code - 128) * scale`, as GatherBlockQuantized computes it.
    pub fn row(&self, n: usize, out: &mut [f32]) {
        assert!(n < self.n && out.len() == self.k);
        let (g, r, nb) = (n / GROUP, n % GROUP, self.k / BLOCK);
        for (b, block) in out.chunks_exact_mut(BLOCK).enumerate() {
            let lines = &self.codes[(g * nb + b) * GROUP_BLOCK..][..GROUP_BLOCK];
            let scale = self.scales[(g * nb + b) * GROUP + r];
            for (e, o) in block.iter_mut().enumerate() {
                *o = (f32::from(lines[64 * (e / 4) + 4 * r + e % 4]) - 128.0) * scale;
            }
        }
    }
}

/// Row-major codes [N, K] and scales [N, K/32] in the grouped layout (what the converter writes; tests).
pub fn group_codes(n: usize, k: usize, codes: &[u8], scales: &[f32]) -> (Vec<u8>, Vec<f32>) {
    assert!(n % GROUP == 0 && k % BLOCK == 0 && codes.len() == n * k && scales.len() == n * k / BLOCK);
    let nb = k / BLOCK;
    let (mut out, mut sc) = (vec![0u8; n * k], vec![0f32; n * nb]);
    for row in 0..n {
        let (g, r) = (row / GROUP, row % GROUP);
        for b in 0..nb {
            for e in 0..BLOCK {
                out[(g * nb + b) * GROUP_BLOCK + 64 * (e / 4) + 4 * r + e % 4] = codes[row * k + b * BLOCK + e];
            }
            sc[(g * nb + b) * GROUP + r] = scales[row * nb + b];
        }
    }
    (out, sc)
}

/// Columns `cols` (multiples of 16) of y[M, N] for the quantized rows `xs`.
///
/// # Safety
/// `y` points to M*N writable floats, `cols` lies within 0..N with both ends multiples of 16, each row of `xs` has
/// K values, `isa` is supported by this CPU, and no other thread writes the same columns of y concurrently.
pub unsafe fn matmul_cols(w: &Q8Grouped, xs: &[QuantizedRow], y: *mut f32, cols: Range<usize>, isa: Isa) {
    debug_assert!(cols.start % GROUP == 0 && cols.end % GROUP == 0 && cols.end <= w.n);
    debug_assert!(xs.iter().all(|x| x.values.len() == w.k));
    let groups = cols.start / GROUP..cols.end / GROUP;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if super::cpu::has_vnni() => x86::vnni(w, xs, y, groups),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if super::cpu::has_avx2() => x86::avx2(w, xs, y, groups),
        _ => portable(w, xs, y, groups),
    }
}

/// y[M, N] for x[M, K], single-threaded (tests and benches).
pub fn matmul(w: &Q8Grouped, x: &[f32], m: usize, y: &mut [f32], isa: Isa) {
    assert_eq!(x.len(), m * w.k);
    assert_eq!(y.len(), m * w.n);
    let rows: Vec<QuantizedRow> = x.chunks_exact(w.k).map(QuantizedRow::new).collect();
    // SAFETY: sizes asserted above; 0..N is whole groups.
    unsafe { matmul_cols(w, &rows, y.as_mut_ptr(), 0..w.n, isa) }
}

unsafe fn portable(w: &Q8Grouped, xs: &[QuantizedRow], y: *mut f32, groups: Range<usize>) {
    let nb = w.k / BLOCK;
    for (mi, x) in xs.iter().enumerate() {
        for g in groups.clone() {
            for r in 0..GROUP {
                let mut acc = 0f32;
                for b in 0..nb {
                    let lines = &w.codes[(g * nb + b) * GROUP_BLOCK..][..GROUP_BLOCK];
                    let xq = &x.values[b * BLOCK..][..BLOCK];
                    let dot: i32 = (0..BLOCK).map(|e| i32::from(lines[64 * (e / 4) + 4 * r + e % 4]) * i32::from(xq[e])).sum::<i32>() + x.corrections[b];
                    acc = (dot as f32).mul_add(w.scales[(g * nb + b) * GROUP + r] * x.scales[b], acc);
                }
                *y.add(mi * w.n + g * GROUP + r) = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;
    use core::ops::Range;

    use super::{Q8Grouped, QuantizedRow, BLOCK, GROUP, GROUP_BLOCK};

    /// Four bytes of x (one line's share of a block) as an int32 to broadcast.
    #[inline(always)]
    unsafe fn x4(x: &QuantizedRow, b: usize, j: usize) -> i32 {
        x.values.as_ptr().add(b * BLOCK + 4 * j).cast::<i32>().read_unaligned()
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni(w: &Q8Grouped, xs: &[QuantizedRow], y: *mut f32, groups: Range<usize>) {
        for g in groups {
            let mut m0 = 0;
            while m0 < xs.len() {
                m0 += match xs.len() - m0 {
                    8.. => { tile512::<8>(w, xs, m0, g, y); 8 }
                    4.. => { tile512::<4>(w, xs, m0, g, y); 4 }
                    2.. => { tile512::<2>(w, xs, m0, g, y); 2 }
                    _ => { tile512::<1>(w, xs, m0, g, y); 1 }
                };
            }
        }
    }

    /// Group `g` against rows m0 .. m0 + MC of x: per row of x, one exact block sum and one accumulator of 16 rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile512<const MC: usize>(w: &Q8Grouped, xs: &[QuantizedRow], m0: usize, g: usize, y: *mut f32) {
        let nb = w.k / BLOCK;
        let base = w.codes.as_ptr().add(g * nb * GROUP_BLOCK);
        let scales = w.scales.as_ptr().add(g * nb * GROUP);
        let x = &xs[m0..m0 + MC];
        let mut acc = [_mm512_setzero_ps(); MC];
        for b in 0..nb {
            let lines = base.add(b * GROUP_BLOCK);
            // Two blocks ahead: the group's rows are one sequential stream.
            _mm_prefetch::<_MM_HINT_T0>(lines.wrapping_add(2 * GROUP_BLOCK).cast());
            _mm_prefetch::<_MM_HINT_T0>(lines.wrapping_add(2 * GROUP_BLOCK + 256).cast());
            let mut dot: [__m512i; MC] = core::array::from_fn(|mi| _mm512_set1_epi32(*x[mi].corrections.get_unchecked(b)));
            for j in 0..BLOCK / 4 {
                let c = _mm512_loadu_si512(lines.add(64 * j).cast());
                for (d, xr) in dot.iter_mut().zip(x) {
                    *d = _mm512_dpbusd_epi32(*d, c, _mm512_set1_epi32(x4(xr, b, j)));
                }
            }
            let ws = _mm512_loadu_ps(scales.add(b * GROUP));
            for ((a, d), xr) in acc.iter_mut().zip(dot).zip(x) {
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(ws, _mm512_set1_ps(*xr.scales.get_unchecked(b))), *a);
            }
        }
        for (mi, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(y.add((m0 + mi) * w.n + g * GROUP), *a);
        }
    }

    /// AVX2: each half of a group (8 rows) in one register; `vpmaddubsw` of |code - 128| by xq carrying the code's
    /// sign (at most 2 * 128 * 127 per pair: no saturation), `vpmaddwd` by ones, the same integers as `vpdpbusd`
    /// with the zero point's term.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(w: &Q8Grouped, xs: &[QuantizedRow], y: *mut f32, groups: Range<usize>) {
        let nb = w.k / BLOCK;
        let (flip, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        for g in groups {
            let base = w.codes.as_ptr().add(g * nb * GROUP_BLOCK);
            let scales = w.scales.as_ptr().add(g * nb * GROUP);
            for (mi, x) in xs.iter().enumerate() {
                let mut acc = [_mm256_setzero_ps(); 2];
                for b in 0..nb {
                    let lines = base.add(b * GROUP_BLOCK);
                    let mut dot = [_mm256_setzero_si256(); 2];
                    for j in 0..BLOCK / 4 {
                        let xv = _mm256_set1_epi32(x4(x, b, j));
                        for (h, d) in dot.iter_mut().enumerate() {
                            let signed = _mm256_xor_si256(_mm256_loadu_si256(lines.add(64 * j + 32 * h).cast()), flip);
                            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(signed), _mm256_sign_epi8(xv, signed));
                            *d = _mm256_add_epi32(*d, _mm256_madd_epi16(pairs, ones));
                        }
                    }
                    let xs_b = _mm256_set1_ps(x.scales[b]);
                    for (h, (a, d)) in acc.iter_mut().zip(dot).enumerate() {
                        let ws = _mm256_loadu_ps(scales.add(b * GROUP + 8 * h));
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(ws, xs_b), *a);
                    }
                }
                for (h, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(y.add(mi * w.n + g * GROUP + 8 * h), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::q8::{self, Q8Weights};

    #[test]
    fn every_isa_gives_the_same_bits_and_the_row_major_kernels_values() {
        for &(n, k, m) in &[(32, 96, 2), (16, 576, 1), (48, 640, 11), (64, 64, 8), (16, 32, 15)] {
            let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7919 + 13) % 256) as u8).collect();
            let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.001 + (i % 17) as f32 * 0.0003).collect();
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 5) as f32)).collect();
            let (gc, gs) = group_codes(n, k, &codes, &scales);
            let w = Q8Grouped::new(n, k, &gc, &gs).unwrap();
            let mut want = vec![0f32; m * n];
            matmul(&w, &x, m, &mut want, Isa::Portable);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                matmul(&w, &x, m, &mut got, isa);
                assert_eq!(got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{isa:?} n={n} k={k} m={m}");
            }
            // The same products as the row-major kernel, summed in another order.
            let rows = Q8Weights::new(n, k, &codes, &scales).unwrap();
            let mut row_major = vec![0f32; m * n];
            q8::matmul(&rows, &x, m, &mut row_major, Isa::Portable);
            for i in 0..m * n {
                assert!((row_major[i] - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0), "{i}: {} vs {}", row_major[i], want[i]);
            }
            // A row alone gives the bits it gives in a batch.
            let mut one = vec![0f32; n];
            matmul(&w, &x[(m - 1) * k..], 1, &mut one, Isa::detect());
            assert_eq!(one, want[(m - 1) * n..]);
        }
    }

    #[test]
    fn rows_are_gathered_dequantized() {
        let (n, k) = (32, 64);
        let codes: Vec<u8> = (0..n * k).map(|i| (i % 251) as u8).collect();
        let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.5 + i as f32).collect();
        let (gc, gs) = group_codes(n, k, &codes, &scales);
        let w = Q8Grouped::new(n, k, &gc, &gs).unwrap();
        let mut row = vec![0f32; k];
        for r in [0, 5, 17, 31] {
            w.row(r, &mut row);
            for j in 0..k {
                assert_eq!(row[j], (f32::from(codes[r * k + j]) - 128.0) * scales[r * (k / BLOCK) + j / BLOCK]);
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Q8Grouped::new(8, 32, &[0; 256], &[0.0; 8]).is_err());
        assert!(Q8Grouped::new(16, 32, &[0; 511], &[0.0; 16]).is_err());
    }
}
