//! `y ≈ x · Wᵀ` for an 8-bit block-quantized W [N, K] with x rounded to int8 per block of 32: the
//! approximate scoring pass of an LM head (the graph then recomputes the best candidates exactly in fp32).
//!
//! W is MatMulNBits' 8-bit layout with the default zero point: `W[n, 32b + j] = scale[n, b] * (codes[n, b, j]
//! - 128)`. Each block of x is quantized symmetrically, `xq = round(x / dx)`, `dx = max|x| / 127` (ONNX
//! Runtime's accuracy_level 4 does the same), and
//!
//! ```text
//!   y[n] = sum_b scale[n, b] * dx[b] * (sum_j codes[n, b, j] * xq[b, j] - 128 * sum_j xq[b, j])
//! ```
//!
//! The inner sums are exact integers: AVX-512 VNNI's `vpdpbusd` multiplies the unsigned codes by the signed
//! xq directly, two blocks per instruction, with the `-128 * sum xq` term preloaded into the accumulator;
//! AVX2 widens both to 16 bits (`vpmaddwd`); a portable loop covers everything else.

use core::ops::Range;

use super::q4::Isa;

pub use super::BLOCK;
use super::BlockMatrix;

/// A borrowed 8-bit weight matrix: `codes` N * K bytes (zero point 128), `scales` N * K/32 values.
pub type Q8Weights<'a> = BlockMatrix<'a, ()>;

impl<'a> Q8Weights<'a> {
    pub fn new(n: usize, k: usize, codes: &'a [u8], scales: &'a [f32]) -> Result<Self, &'static str> {
        Self::checked(n, k, BLOCK, codes, scales, BLOCK, ())
    }
}

/// One row of x quantized per block: int8 values, their scales and `-128 * sum(xq)` per block.
pub struct QuantizedRow {
    pub(super) values: Vec<i8>,
    pub(super) scales: Vec<f32>,
    pub(super) corrections: Vec<i32>,
}

impl QuantizedRow {
    pub fn new(x: &[f32]) -> QuantizedRow {
        assert!(x.len() % BLOCK == 0);
        let blocks = x.len() / BLOCK;
        let mut values = vec![0i8; x.len()];
        let mut scales = vec![0f32; blocks];
        let mut corrections = vec![0i32; blocks];
        for b in 0..blocks {
            let block = &x[b * BLOCK..(b + 1) * BLOCK];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in values[b * BLOCK..(b + 1) * BLOCK].iter_mut().zip(block) {
                *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
                sum += i32::from(*q);
            }
            scales[b] = scale;
            corrections[b] = -128 * sum;
        }
        QuantizedRow { values, scales, corrections }
    }
}

/// Columns `cols` of y[M, N] for the quantized rows `xs` (M of them).
///
/// # Safety
/// `y` points to M*N writable floats, `cols` lies within 0..N, each row of `xs` has K values, `isa` is
/// supported by this CPU, and no other thread writes the same columns of y concurrently.
pub unsafe fn matmul_cols(w: &Q8Weights, xs: &[QuantizedRow], y: *mut f32, cols: Range<usize>, isa: Isa) {
    debug_assert!(xs.iter().all(|x| x.values.len() == w.k));
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if std::arch::is_x86_feature_detected!("avx512vnni") => x86::vnni(w, xs, y, cols),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 => {
            for (mi, x) in xs.iter().enumerate() {
                x86::avx2(w, x, y.add(mi * w.n), cols.clone());
            }
        }
        _ => {
            for (mi, x) in xs.iter().enumerate() {
                portable(w, x, y.add(mi * w.n), cols.clone());
            }
        }
    }
}

/// y[M, N] for x[M, K], single-threaded (tests).
pub fn matmul(w: &Q8Weights, x: &[f32], m: usize, y: &mut [f32], isa: Isa) {
    assert_eq!(x.len(), m * w.k);
    assert_eq!(y.len(), m * w.n);
    let rows: Vec<QuantizedRow> = x.chunks_exact(w.k).map(QuantizedRow::new).collect();
    // SAFETY: sizes asserted above.
    unsafe { matmul_cols(w, &rows, y.as_mut_ptr(), 0..w.n, isa) }
}

unsafe fn portable(w: &Q8Weights, x: &QuantizedRow, y: *mut f32, cols: Range<usize>) {
    let nb = w.k / BLOCK;
    for n in cols {
        let mut sum = 0f32;
        for b in 0..nb {
            let codes = &w.codes[(n * nb + b) * BLOCK..(n * nb + b + 1) * BLOCK];
            let xq = &x.values[b * BLOCK..(b + 1) * BLOCK];
            let dot: i32 = codes.iter().zip(xq).map(|(&c, &q)| i32::from(c) * i32::from(q)).sum::<i32>() + x.corrections[b];
            sum += dot as f32 * (w.scales[n * nb + b] * x.scales[b]);
        }
        *y.add(n) = sum;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{QuantizedRow, Q8Weights, BLOCK};
    use core::arch::x86_64::*;
    use core::ops::Range;

    /// Two blocks per `vpdpbusd`: lanes 0-7 sum block b, lanes 8-15 block b+1; the per-block scale vector
    /// [s_b x8, s_b+1 x8] multiplies the converted sums. An odd last block runs in the low half alone.
    /// Weight rows are read once, in order (one sequential stream: rows interleaved as several streams a row
    /// apart were followed worse by the prefetcher), and each is applied to every x row while in L1.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn vnni(w: &Q8Weights, xs: &[QuantizedRow], y: *mut f32, cols: Range<usize>) {
        let pairs = w.k / BLOCK / 2;
        // Per x row and block pair: the values, the scales and the -128 * sum(xq) term spread over 8 lanes each.
        let mut xv = Vec::with_capacity(xs.len() * pairs);
        let mut xsc = Vec::with_capacity(xs.len() * pairs);
        let mut xc = Vec::with_capacity(xs.len() * pairs);
        for x in xs {
            for p in 0..pairs {
                xv.push(_mm512_loadu_si512(x.values.as_ptr().add(p * 2 * BLOCK).cast()));
                let (s0, s1) = (_mm256_set1_ps(x.scales[2 * p]), _mm256_set1_ps(x.scales[2 * p + 1]));
                xsc.push(_mm512_insertf32x8::<1>(_mm512_castps256_ps512(s0), s1));
                let (c0, c1) = (_mm256_set1_epi32(x.corrections[2 * p] / 8), _mm256_set1_epi32(x.corrections[2 * p + 1] / 8));
                xc.push(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(c0), c1));
            }
        }
        let x = Prepared { v: xv, s: xsc, c: xc, pairs };
        // Two halves of the range in alternation: two streams of weight rows in flight instead of one.
        let half = cols.len().div_ceil(2);
        let order = (0..half).flat_map(|i| [cols.start + i, cols.start + half + i]).filter(|&r| r < cols.end);
        for row in order {
            let mut m0 = 0;
            while m0 < xs.len() {
                // x rows per pass over one weight row, their accumulators in registers.
                let rows = match xs.len() - m0 {
                    8.. => { row_tile::<8>(w, xs, &x, row, m0, y); 8 }
                    4.. => { row_tile::<4>(w, xs, &x, row, m0, y); 4 }
                    2.. => { row_tile::<2>(w, xs, &x, row, m0, y); 2 }
                    _ => { row_tile::<1>(w, xs, &x, row, m0, y); 1 }
                };
                m0 += rows;
            }
        }
    }

    /// The rows of x as `vnni` reads them, per row and block pair (index `m * pairs + p`): the values, the
    /// scales and the -128 * sum(xq) term, each block's spread over 8 lanes.
    struct Prepared {
        v: Vec<__m512i>,
        s: Vec<__m512>,
        c: Vec<__m512i>,
        pairs: usize,
    }

    /// Weight row `row` against rows m0..m0+MC of x. Two accumulators per row of x (even and odd pairs, the
    /// pair loop taken two at a time so both stay in registers) hide the multiply-add latency.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn row_tile<const MC: usize>(w: &Q8Weights, xs: &[QuantizedRow], x: &Prepared, row: usize, m0: usize, y: *mut f32) {
        let nb = w.k / BLOCK;
        let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
        let (codes, scales) = (w.codes.as_ptr(), w.scales.as_ptr());
        let step = |acc: &mut [__m512; MC], p: usize| {
            let c = _mm512_loadu_si512(codes.add((row * nb + 2 * p) * BLOCK).cast());
            let ws = _mm512_permutexvar_ps(halves, _mm512_castpd_ps(_mm512_set1_pd((scales.add(row * nb + 2 * p) as *const f64).read_unaligned())));
            for (mi, a) in acc.iter_mut().enumerate() {
                let i = (m0 + mi) * x.pairs + p;
                let dot = _mm512_dpbusd_epi32(*x.c.get_unchecked(i), c, *x.v.get_unchecked(i));
                *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, *x.s.get_unchecked(i)), *a);
            }
        };
        let (mut even, mut odd) = ([_mm512_setzero_ps(); MC], [_mm512_setzero_ps(); MC]);
        let mut p = 0;
        while p + 2 <= x.pairs {
            step(&mut even, p);
            step(&mut odd, p + 1);
            p += 2;
        }
        if p < x.pairs {
            step(&mut even, p);
        }
        for (mi, (e, o)) in even.into_iter().zip(odd).enumerate() {
            let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(e, o));
            if nb % 2 == 1 {
                sum += tail_block(w, &xs[m0 + mi], row, nb - 1);
            }
            *y.add((m0 + mi) * w.n + row) = sum;
        }
    }

    unsafe fn tail_block(w: &Q8Weights, x: &QuantizedRow, row: usize, b: usize) -> f32 {
        let nb = w.k / BLOCK;
        let codes = &w.codes[(row * nb + b) * BLOCK..(row * nb + b + 1) * BLOCK];
        let xq = &x.values[b * BLOCK..(b + 1) * BLOCK];
        let dot: i32 = codes.iter().zip(xq).map(|(&c, &q)| i32::from(c) * i32::from(q)).sum::<i32>() + x.corrections[b];
        dot as f32 * (w.scales[row * nb + b] * x.scales[b])
    }

    /// AVX2: codes and xq widened to 16 bits, `vpmaddwd` pairs them into 8 int32 lanes per block.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2(w: &Q8Weights, x: &QuantizedRow, y: *mut f32, cols: Range<usize>) {
        let nb = w.k / BLOCK;
        let mut xw = Vec::with_capacity(2 * nb);
        for b in 0..nb {
            let v = _mm256_loadu_si256(x.values.as_ptr().add(b * BLOCK).cast());
            xw.push(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
            xw.push(_mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(v)));
        }
        let codes = w.codes.as_ptr();
        for row in cols {
            let mut acc = _mm256_setzero_ps();
            for b in 0..nb {
                let c = _mm256_loadu_si256(codes.add((row * nb + b) * BLOCK).cast());
                let lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(c));
                let hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256::<1>(c));
                let dot = _mm256_add_epi32(_mm256_madd_epi16(lo, xw[2 * b]), _mm256_madd_epi16(hi, xw[2 * b + 1]));
                let dot = _mm256_add_epi32(dot, _mm256_set1_epi32(x.corrections[b] / 8));
                let s = _mm256_set1_ps(w.scales[row * nb + b] * x.scales[b]);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc);
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            *y.add(row) = _mm_cvtss_f32(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_isa_matches_the_integer_definition_and_is_close_to_fp32() {
        // Odd and even numbers of block pairs, a tail block, and rows of x in every tile size (8, 4, 2, 1).
        for &(n, k, m) in &[(37, 96, 2), (19, 576, 1), (23, 640, 11), (9, 160, 8), (5, 64, 15)] {
            let codes: Vec<u8> = (0..n * k).map(|i| ((i * 7919 + 13) % 251) as u8).collect();
            let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.001 + (i % 17) as f32 * 0.0003).collect();
            let w = Q8Weights::new(n, k, &codes, &scales).unwrap();
            let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 5) as f32)).collect();
            let mut want = vec![0f32; m * n];
            matmul(&w, &x, m, &mut want, Isa::Portable);
            for isa in Isa::available() {
                let mut got = vec![f32::NAN; m * n];
                matmul(&w, &x, m, &mut got, isa);
                for i in 0..m * n {
                    assert!((got[i] - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0), "{isa:?} n={n} k={k} m={m} {i}: {} vs {}", got[i], want[i]);
                }
            }
            // int8 activations: within a few percent of the fp32 product.
            for (mi, row) in x.chunks_exact(k).enumerate() {
                for nn in 0..n {
                    let exact: f32 = (0..k)
                        .map(|j| (f32::from(codes[nn * k + j]) - 128.0) * scales[nn * (k / BLOCK) + j / BLOCK] * row[j])
                        .sum();
                    let scale: f32 = (0..k).map(|j| (f32::from(codes[nn * k + j]) - 128.0).abs() * scales[nn * (k / BLOCK) + j / BLOCK] * row[j].abs()).sum();
                    assert!((want[mi * n + nn] - exact).abs() <= 0.02 * scale, "{mi} {nn}");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Q8Weights::new(2, 48, &[0; 96], &[0.0; 3]).is_err());
        assert!(Q8Weights::new(2, 64, &[0; 127], &[0.0; 4]).is_err());
    }
}

