//! An 8-bit LM head stored as two 4-bit planes, scored in two passes: a coarse pass that reads only the high
//! plane, then an exact fp32 recompute of every row that could be the argmax (and of the best RESCORE rows).
//!
//! Layout. Row n of W [N, K] has K/32 blocks with one fp32 scale each; the unsigned 8-bit code u (zero point
//! 128, MatMulNBits' 8-bit layout) of weight j is split into its nibbles `H = u >> 4` and `L = u & 15`:
//!
//! ```text
//!   W[n, 32b + j] = scale[n, b] * c,   c = u - 128 = 16 * (H - 8) + L      (H - 8 = c >> 4, L = c & 15)
//! ```
//!
//! `hi` and `lo` hold N * K/2 bytes each (the same bytes as the 8-bit codes): in block b of row n, byte j
//! (0..16) carries element j in its low nibble and element j + 16 in its high nibble.
//!
//! Coarse pass. With L unknown, the centre of its range stands in for it: `w~ = scale * (16 * H - 120.5)`, and
//!
//! ```text
//!   |exact - coarse| <= 7.5 * sum_b scale[n, b] * ||x_b||_1          (||x_b||_1: the block's L1 norm)
//! ```
//!
//! for any x. The fp32 rounding of both sums (K products of |w| <= 128 * scale) is covered by a slack added to
//! the 7.5 (`bound_factor`). The pass writes the coarse logit and its upper bound `coarse + bound` per row.
//!
//! Exact pass. The RESCORE rows with the highest coarse logits are recomputed exactly (fp32 weights
//! `scale * c`, fp32 sums, as the graph's fp32 rescoring does); their best exact value L is a lower bound
//! on the exact maximum, so every other row whose upper bound reaches L is recomputed too. A row left coarse
//! has exact < L <= max, hence the argmax of the output is the argmax of the exact logits, for any input, and
//! the RESCORE best coarse rows (those top-k / top-p sampling reads) are exact as before.
//!
//! The coarse pass reads half the bytes of an 8-bit pass (plus the scales); AVX-512 and AVX2+FMA expand 16 or
//! 8 high nibbles per load to fp32 weights with one multiply-add each, and a portable loop covers the rest.

use core::ops::Range;

pub use super::q4::Isa;
pub use super::{Scale, BLOCK};

/// Exact rows recomputed whatever the bound says: the best coarse ones (what top-k / top-p sampling reads).
pub const RESCORE: usize = 64;

/// A borrowed two-plane 8-bit matrix W [N, K] (see the module docs for the layout), its block scales stored as
/// `S` (fp16: GGUF's Q8_0 block headers are fp16 themselves).
#[derive(Clone, Copy, Debug)]
pub struct Planes<'a, S = f32> {
    n: usize,
    k: usize,
    hi: &'a [u8],
    lo: &'a [u8],
    scales: &'a [S],
}

impl<'a, S: Scale> Planes<'a, S> {
    pub fn new(n: usize, k: usize, hi: &'a [u8], lo: &'a [u8], scales: &'a [S]) -> Result<Self, &'static str> {
        if n == 0 || k == 0 || k % BLOCK != 0 {
            return Err("K must be a positive multiple of 32 and N positive");
        }
        if hi.len() != n * k / 2 || lo.len() != n * k / 2 || scales.len() != n * (k / BLOCK) {
            return Err("each plane must hold N * K/2 bytes and scales one value per block of 32");
        }
        Ok(Self { n, k, hi, lo, scales })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// The signed code c of W[n, j].
    pub fn code(&self, n: usize, j: usize) -> i32 {
        let byte = n * self.k / 2 + (j / BLOCK) * 16 + j % 16;
        let shift = if j % BLOCK < 16 { 0 } else { 4 };
        i32::from((self.hi[byte] >> shift) & 15) * 16 + i32::from((self.lo[byte] >> shift) & 15) - 128
    }

    /// The fp32 weight W[n, j] = scale * c (the embedding's row values).
    pub fn weight(&self, n: usize, j: usize) -> f32 {
        self.scales[n * (self.k / BLOCK) + j / BLOCK].to_f32() * self.code(n, j) as f32
    }

    /// Row n of W in fp32 (an embedding lookup).
    pub fn row(&self, n: usize, out: &mut [f32]) {
        let nb = self.k / BLOCK;
        for b in 0..nb {
            let s = self.scales[n * nb + b].to_f32();
            let (hi, lo) = (&self.hi[(n * nb + b) * 16..][..16], &self.lo[(n * nb + b) * 16..][..16]);
            let block = &mut out[b * BLOCK..(b + 1) * BLOCK];
            for j in 0..16 {
                block[j] = s * (i32::from(hi[j] & 15) * 16 + i32::from(lo[j] & 15) - 128) as f32;
                block[j + 16] = s * (i32::from(hi[j] >> 4) * 16 + i32::from(lo[j] >> 4) - 128) as f32;
            }
        }
    }

    /// The exact logit of row n for one row of x: fp32 weights `scale * c`, fp32 sums (the same values for
    /// every instruction set).
    pub fn exact(&self, n: usize, x: &[f32]) -> f32 {
        let nb = self.k / BLOCK;
        let mut acc = [0f32; 16];
        for b in 0..nb {
            let s = self.scales[n * nb + b].to_f32();
            let (hi, lo) = (&self.hi[(n * nb + b) * 16..][..16], &self.lo[(n * nb + b) * 16..][..16]);
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            for j in 0..16 {
                let c0 = i32::from(hi[j] & 15) * 16 + i32::from(lo[j] & 15) - 128;
                let c1 = i32::from(hi[j] >> 4) * 16 + i32::from(lo[j] >> 4) - 128;
                acc[j] += s * c0 as f32 * xb[j];
                acc[j] += s * c1 as f32 * xb[j + 16];
            }
        }
        acc.iter().sum()
    }

    /// Hints the CPU to fetch row n's planes and scales into cache.
    pub fn prefetch(&self, n: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let half = self.k / 2;
            let blocks = self.k / BLOCK;
            let lines = |p: *const i8, bytes: usize| {
                for off in (0..bytes).step_by(64) {
                    // SAFETY: prefetching is a hint and never faults; the addresses lie within row n.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off)) }
                }
            };
            lines(self.hi[n * half..].as_ptr().cast(), half);
            lines(self.lo[n * half..].as_ptr().cast(), half);
            lines(self.scales[n * blocks..].as_ptr().cast(), blocks * core::mem::size_of::<S>());
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = n;
    }

    /// `exact` on the instruction set `isa` (AVX-512: 16 weights per step; the same fp32 weights, summed in
    /// another order, so within fp32 rounding of `exact`).
    pub fn exact_on(&self, n: usize, x: &[f32], isa: Isa) -> f32 {
        assert!(n < self.n && x.len() == self.k);
        match isa {
            // SAFETY: row n and x [K] are in range; the caller's isa is supported by this CPU.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { x86::exact512(self, n, x.as_ptr()) },
            _ => self.exact(n, x),
        }
    }
}

/// What one row of x brings to the coarse pass: its block L1 norms.
pub fn block_norms(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(BLOCK).map(|b| b.iter().map(|v| v.abs()).sum()).collect()
}

/// The bound's multiplier of `sum_b scale * ||x_b||_1`: the lost nibble's half range, 7.5, plus the fp32
/// rounding of the coarse and exact sums (each within (K + 32) * 2^-23 of sum |w x|, |w| <= 128.5 * scale),
/// doubled for the bound's own sum and the upper bound's addition.
pub fn bound_factor(k: usize) -> f32 {
    7.5 + 4.0 * 128.5 * (k + BLOCK) as f32 * f32::EPSILON
}

/// Coarse logits and upper bounds for columns `cols` of M rows of x: `y[m, n]` = coarse, `upper[m, n]` =
/// coarse + bound. `norms` holds M * K/32 block L1 norms (`block_norms` per row).
///
/// # Safety
/// `x` points to M*K floats, `y` and `upper` to M*N writable floats, `cols` lies within 0..N, `isa` is
/// supported by this CPU, and no other thread writes the same columns concurrently.
pub unsafe fn coarse_cols<S: Scale>(w: &Planes<S>, x: *const f32, norms: &[f32], m: usize, y: *mut f32, upper: *mut f32, cols: Range<usize>, isa: Isa) {
    debug_assert!(cols.end <= w.n && norms.len() == m * (w.k / BLOCK));
    let out = Out { y, upper, factor: bound_factor(w.k) };
    match isa {
        Isa::Portable => portable(w, x, norms, m, out, cols),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => x86::avx2(w, x, norms, m, out, cols),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => x86::avx512(w, x, norms, m, out, cols),
    }
}

#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    upper: *mut f32,
    factor: f32,
}

impl Out {
    /// Stores row n's coarse logit and upper bound for x row mi (`norm_dot` = sum_b scale * ||x_b||_1).
    unsafe fn put(self, n_total: usize, mi: usize, n: usize, coarse: f32, norm_dot: f32) {
        *self.y.add(mi * n_total + n) = coarse;
        *self.upper.add(mi * n_total + n) = coarse + self.factor * norm_dot;
    }
}

unsafe fn portable<S: Scale>(w: &Planes<S>, x: *const f32, norms: &[f32], m: usize, out: Out, cols: Range<usize>) {
    let nb = w.k / BLOCK;
    let xs = core::slice::from_raw_parts(x, m * w.k);
    let mut row = vec![0f32; w.k];
    for n in cols {
        for b in 0..nb {
            let s = w.scales[n * nb + b].to_f32();
            let (s16, off) = (16.0 * s, -120.5 * s);
            let hi = &w.hi[(n * nb + b) * 16..][..16];
            for j in 0..16 {
                row[b * BLOCK + j] = f32::from(hi[j] & 15) * s16 + off;
                row[b * BLOCK + j + 16] = f32::from(hi[j] >> 4) * s16 + off;
            }
        }
        for mi in 0..m {
            let xr = &xs[mi * w.k..(mi + 1) * w.k];
            let coarse = row.iter().zip(xr).fold(0f32, |acc, (wv, xv)| acc + wv * xv);
            let norm_dot = (0..nb).fold(0f32, |acc, b| acc + w.scales[n * nb + b].to_f32() * norms[mi * nb + b]);
            out.put(w.n, mi, n, coarse, norm_dot);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Out, Planes, Scale, BLOCK};
    use core::arch::x86_64::*;
    use core::ops::Range;

    /// `*p` widened to fp32 in every lane. (One block per row and step here: the tile reads each scale once.)
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn splat512<S: Scale>(p: *const S) -> __m512 {
        if S::HALF {
            _mm512_cvtph_ps(_mm256_set1_epi16(p.cast::<i16>().read()))
        } else {
            _mm512_set1_ps(p.cast::<f32>().read())
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn splat256<S: Scale>(p: *const S) -> __m256 {
        if S::HALF {
            _mm256_cvtph_ps(_mm_set1_epi16(p.cast::<i16>().read()))
        } else {
            _mm256_set1_ps(p.cast::<f32>().read())
        }
    }

    /// R weight rows against MC rows of x per tile: R * MC independent accumulator chains.
    macro_rules! tiles {
        ($w:expr, $x:expr, $norms:expr, $m:expr, $out:expr, $cols:expr, $tile:ident, $r:literal, [$($mc:literal),+]) => {{
            let mut n = $cols.start;
            while n < $cols.end {
                let one = n + $r > $cols.end;
                let mut mi = 0;
                while mi < $m {
                    let left = $m - mi;
                    $(
                        if left >= $mc {
                            if one { $tile::<S, 1, $mc>($w, $x, $norms, mi, $out, n) } else { $tile::<S, $r, $mc>($w, $x, $norms, mi, $out, n) }
                            mi += $mc;
                            continue;
                        }
                    )+
                }
                n += if one { 1 } else { $r };
            }
        }};
    }

    pub(super) unsafe fn avx512<S: Scale>(w: &Planes<S>, x: *const f32, norms: &[f32], m: usize, out: Out, cols: Range<usize>) {
        tiles!(w, x, norms, m, out, cols, tile512, 4, [4, 2, 1]);
    }

    pub(super) unsafe fn avx2<S: Scale>(w: &Planes<S>, x: *const f32, norms: &[f32], m: usize, out: Out, cols: Range<usize>) {
        tiles!(w, x, norms, m, out, cols, tile256, 4, [2, 1]);
    }

    /// Rows n0..n0+R against x rows m0..m0+MC: 16 high nibbles per load become 32 fp32 weights (elements
    /// 0-15 from the low nibbles, 16-31 from the high ones), each one multiply-add from its scale.
    #[target_feature(enable = "avx512f")]
    unsafe fn tile512<S: Scale, const R: usize, const MC: usize>(w: &Planes<S>, x: *const f32, norms: &[f32], m0: usize, out: Out, n0: usize) {
        let nb = w.k / BLOCK;
        let (hi, scales) = (w.hi.as_ptr(), w.scales.as_ptr());
        let mask = _mm512_set1_epi32(15);
        let mut acc = [[_mm512_setzero_ps(); MC]; R];
        let mut nd = [[0f32; MC]; R];
        for b in 0..nb {
            for r in 0..R {
                let i = (n0 + r) * nb + b;
                let sv = splat512(scales.add(i));
                let s = _mm512_cvtss_f32(sv);
                let (s16, off) = (_mm512_mul_ps(sv, _mm512_set1_ps(16.0)), _mm512_mul_ps(sv, _mm512_set1_ps(-120.5)));
                let h = _mm512_cvtepu8_epi32(_mm_loadu_si128(hi.add(i * 16).cast()));
                let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(h, mask)), s16, off);
                let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(h)), s16, off);
                for mi in 0..MC {
                    let xb = x.add((m0 + mi) * w.k + b * BLOCK);
                    acc[r][mi] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[r][mi]);
                    acc[r][mi] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb.add(16)), acc[r][mi]);
                    nd[r][mi] += s * norms[(m0 + mi) * nb + b];
                }
            }
        }
        for r in 0..R {
            for mi in 0..MC {
                out.put(w.n, m0 + mi, n0 + r, _mm512_reduce_add_ps(acc[r][mi]), nd[r][mi]);
            }
        }
    }

    /// The exact logit of row n: codes `16 * H + L - 128` rebuilt 16 at a time from both planes, times the scale.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exact512<S: Scale>(w: &Planes<S>, n: usize, x: *const f32) -> f32 {
        let nb = w.k / BLOCK;
        let (hi, lo) = (w.hi.as_ptr(), w.lo.as_ptr());
        let (low, high, bias) = (_mm512_set1_epi32(15), _mm512_set1_epi32(0xF0), _mm512_set1_epi32(128));
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..nb {
            let i = n * nb + b;
            let s = splat512(w.scales.as_ptr().add(i));
            let h = _mm512_cvtepu8_epi32(_mm_loadu_si128(hi.add(i * 16).cast()));
            let l = _mm512_cvtepu8_epi32(_mm_loadu_si128(lo.add(i * 16).cast()));
            let c0 = _mm512_add_epi32(_mm512_slli_epi32::<4>(_mm512_and_si512(h, low)), _mm512_and_si512(l, low));
            let c1 = _mm512_add_epi32(_mm512_and_si512(h, high), _mm512_srli_epi32::<4>(l));
            let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c0, bias)), s);
            let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(c1, bias)), s);
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x.add(b * BLOCK)), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x.add(b * BLOCK + 16)), a1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
    }

    /// As tile512, 8 nibble bytes (16 weights) per load.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<S: Scale, const R: usize, const MC: usize>(w: &Planes<S>, x: *const f32, norms: &[f32], m0: usize, out: Out, n0: usize) {
        let nb = w.k / BLOCK;
        let (hi, scales) = (w.hi.as_ptr(), w.scales.as_ptr());
        let mask = _mm256_set1_epi32(15);
        let mut acc = [[_mm256_setzero_ps(); MC]; R];
        let mut nd = [[0f32; MC]; R];
        for b in 0..nb {
            for r in 0..R {
                let i = (n0 + r) * nb + b;
                let sv = splat256(scales.add(i));
                let s = _mm256_cvtss_f32(sv);
                let (s16, off) = (_mm256_mul_ps(sv, _mm256_set1_ps(16.0)), _mm256_mul_ps(sv, _mm256_set1_ps(-120.5)));
                for half in 0..2 {
                    let h = _mm256_cvtepu8_epi32(_mm_loadl_epi64(hi.add(i * 16 + 8 * half).cast()));
                    let w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(h, mask)), s16, off);
                    let w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(h)), s16, off);
                    for mi in 0..MC {
                        let xb = x.add((m0 + mi) * w.k + b * BLOCK + 8 * half);
                        acc[r][mi] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xb), acc[r][mi]);
                        acc[r][mi] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xb.add(16)), acc[r][mi]);
                    }
                }
                for mi in 0..MC {
                    nd[r][mi] += s * norms[(m0 + mi) * nb + b];
                }
            }
        }
        for r in 0..R {
            for mi in 0..MC {
                let v = acc[r][mi];
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                out.put(w.n, m0 + mi, n0 + r, _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s))), nd[r][mi]);
            }
        }
    }
}

/// The `RESCORE` (or N) rows with the highest coarse logits in `y` (one row of logits), in no order.
pub fn best_coarse(y: &[f32]) -> Vec<usize> {
    let keep = RESCORE.min(y.len());
    let mut best: Vec<usize> = (0..keep).collect();
    let lowest = |best: &[usize]| (0..best.len()).fold(0, |l, i| if y[best[i]] < y[best[l]] { i } else { l });
    let mut low = lowest(&best);
    for (n, &v) in y.iter().enumerate().skip(keep) {
        if v > y[best[low]] {
            best[low] = n;
            low = lowest(&best);
        }
    }
    best
}

/// The exact pass for one row of x over its coarse logits `y` and upper bounds `upper` (both N values):
/// recomputes the `RESCORE` best coarse rows, then (via `rest`) every row whose upper bound reaches their
/// best exact value, in place. `rest(floor)` must recompute into y every row with `upper >= floor` and return
/// how many it did; `best` marks the rows already exact by setting their upper bound to -inf first.
/// Returns the number of rows recomputed.
pub fn exact_pass<S: Scale>(w: &Planes<S>, x: &[f32], y: &mut [f32], upper: &mut [f32], isa: Isa, rest: impl FnOnce(&mut [f32], &[f32], f32) -> usize) -> usize {
    let best = best_coarse(y);
    let mut floor = f32::NEG_INFINITY;
    for &n in &best {
        y[n] = w.exact_on(n, x, isa);
        upper[n] = f32::NEG_INFINITY;
        floor = floor.max(y[n]);
    }
    best.len() + rest(y, upper, floor)
}

/// Recomputes exactly the rows of `cols` whose upper bound reaches `floor` (the tail of `exact_pass`).
///
/// # Safety
/// `y` and `upper` point to N floats (one row of x), and no other thread touches the columns `cols`.
pub unsafe fn exact_cols<S: Scale>(w: &Planes<S>, x: &[f32], y: *mut f32, upper: *const f32, floor: f32, cols: Range<usize>, isa: Isa) -> usize {
    let rows: Vec<usize> = cols.filter(|&n| *upper.add(n) >= floor).collect();
    for (i, &n) in rows.iter().enumerate() {
        // Candidates lie anywhere in a matrix far larger than the caches: fetch a few rows ahead, so the row
        // reads overlap instead of each waiting out a memory latency (4x faster on 4096 scattered rows).
        if let Some(&ahead) = rows.get(i + PREFETCH_ROWS) {
            w.prefetch(ahead);
        }
        *y.add(n) = w.exact_on(n, x, isa);
    }
    rows.len()
}

/// Candidate rows fetched ahead of the one being recomputed.
const PREFETCH_ROWS: usize = 8;

/// The whole head on one thread: logits y [M, N] for x [M, K]; returns the rows recomputed per x row.
pub fn logits<S: Scale>(w: &Planes<S>, x: &[f32], m: usize, y: &mut [f32], isa: Isa) -> Vec<usize> {
    assert_eq!(x.len(), m * w.k, "x must be [M, K]");
    assert_eq!(y.len(), m * w.n, "y must be [M, N]");
    let norms: Vec<f32> = x.chunks_exact(w.k).flat_map(block_norms).collect();
    let mut upper = vec![0f32; m * w.n];
    // SAFETY: the slices have the asserted sizes, and all columns 0..N are in range.
    unsafe { coarse_cols(w, x.as_ptr(), &norms, m, y.as_mut_ptr(), upper.as_mut_ptr(), 0..w.n, isa) };
    let mut counts = Vec::with_capacity(m);
    for ((xr, yr), ur) in x.chunks_exact(w.k).zip(y.chunks_exact_mut(w.n)).zip(upper.chunks_exact_mut(w.n)) {
        // SAFETY: one row of y and upper, N values each.
        counts.push(exact_pass(w, xr, yr, ur, isa, |y, u, floor| unsafe { exact_cols(w, xr, y.as_mut_ptr(), u.as_ptr(), floor, 0..w.n, isa) }));
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1) without an extra crate.
    fn noise(seed: usize, i: usize) -> f32 {
        (((i * 2654435761 + seed * 40503) % 100_003) as f32 / 50_001.5) - 1.0
    }

    /// 8-bit codes [N, K] (zero point 128) -> the two planes, as the converter lays them out.
    fn split(codes: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let plane = |f: fn(u8) -> u8| -> Vec<u8> {
            codes.chunks_exact(BLOCK).flat_map(|b| (0..16).map(move |j| f(b[j]) | (f(b[j + 16]) << 4))).collect()
        };
        (plane(|u| u >> 4), plane(|u| u & 15))
    }

    struct Case {
        n: usize,
        k: usize,
        codes: Vec<u8>,
        scales: Vec<f32>,
        hi: Vec<u8>,
        lo: Vec<u8>,
    }

    impl Case {
        fn new(n: usize, k: usize, seed: usize) -> Case {
            let codes: Vec<u8> = (0..n * k).map(|i| ((noise(seed, i) + 1.0) * 127.99) as u8).collect();
            let scales: Vec<f32> = (0..n * k / BLOCK).map(|i| 0.002 + 0.01 * (noise(seed + 1, i) + 1.0)).collect();
            let (hi, lo) = split(&codes);
            Case { n, k, codes, scales, hi, lo }
        }

        fn planes(&self) -> Planes<'_> {
            Planes::new(self.n, self.k, &self.hi, &self.lo, &self.scales).unwrap()
        }

        /// The definition in f64: exact logit, coarse logit (the centre 7.5 for the low nibble), bound.
        fn reference(&self, x: &[f32], n: usize) -> (f64, f64, f64) {
            let (mut exact, mut coarse, mut bound) = (0.0, 0.0, 0.0);
            for j in 0..self.k {
                let s = f64::from(self.scales[n * self.k / BLOCK + j / BLOCK]);
                let c = f64::from(self.codes[n * self.k + j]) - 128.0;
                let hi = f64::from(self.codes[n * self.k + j] >> 4) - 8.0;
                let xv = f64::from(x[j]);
                exact += s * c * xv;
                coarse += s * (16.0 * hi + 7.5) * xv;
                bound += 7.5 * s * xv.abs();
            }
            (exact, coarse, bound)
        }
    }

    #[test]
    fn planes_hold_the_codes() {
        let case = Case::new(5, 64, 1);
        let w = case.planes();
        for n in 0..case.n {
            let mut row = vec![0f32; case.k];
            w.row(n, &mut row);
            for j in 0..case.k {
                let c = i32::from(case.codes[n * case.k + j]) - 128;
                assert_eq!(w.code(n, j), c);
                assert_eq!(row[j], case.scales[n * 2 + j / BLOCK] * c as f32);
                assert_eq!(w.weight(n, j), row[j]);
            }
        }
    }

    #[test]
    fn every_isa_scores_the_coarse_definition_and_the_bound_holds() {
        for &(n, k, m) in &[(8, 32, 1), (13, 64, 1), (37, 640, 5), (24, 576, 3), (9, 96, 9), (40, 64, 2)] {
            let case = Case::new(n, k, n + k);
            let w = case.planes();
            let x: Vec<f32> = (0..m * k).map(|i| noise(7 + m, i) * if i % 17 == 0 { 8.0 } else { 1.0 }).collect();
            let norms: Vec<f32> = x.chunks_exact(k).flat_map(block_norms).collect();
            for isa in Isa::available() {
                let (mut y, mut upper) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                // SAFETY: x is [M, K], y and upper [M, N], all columns in range.
                unsafe { coarse_cols(&w, x.as_ptr(), &norms, m, y.as_mut_ptr(), upper.as_mut_ptr(), 0..n, isa) };
                for mi in 0..m {
                    let xr = &x[mi * k..(mi + 1) * k];
                    for nn in 0..n {
                        let (exact, coarse, bound) = case.reference(xr, nn);
                        let mag = 128.5 * bound / 7.5;
                        let (got, up) = (f64::from(y[mi * n + nn]), f64::from(upper[mi * n + nn]));
                        assert!((got - coarse).abs() <= 1e-6 * mag, "{isa:?} n={n} k={k} m={m}: {got} vs {coarse}");
                        let slack = bound * f64::from(bound_factor(k)) / 7.5; // 7.5 plus the rounding slack
                        assert!((up - got - slack).abs() <= 1e-5 * slack + 1e-6 * mag, "{isa:?}: bound {} vs {slack}", up - got);
                        // The bound holds for the fp32 exact value and the fp32 coarse one.
                        let exact32 = f64::from(w.exact(nn, xr));
                        assert!((exact32 - exact).abs() <= 1e-6 * mag);
                        assert!((f64::from(w.exact_on(nn, xr, isa)) - exact).abs() <= 1e-6 * mag, "{isa:?}: exact");
                        assert!(exact32 <= up && exact32 >= got - (up - got), "{isa:?}: {exact32} outside {got} +- {}", up - got);
                    }
                }
            }
        }
    }

    #[test]
    fn column_ranges_compose() {
        let case = Case::new(24, 64, 3);
        let w = case.planes();
        let x: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let norms: Vec<f32> = x.chunks_exact(64).flat_map(block_norms).collect();
        let (mut whole, mut up) = (vec![0f32; 48], vec![0f32; 48]);
        let (mut parts, mut up_parts) = (vec![0f32; 48], vec![0f32; 48]);
        // SAFETY: x is [2, 64]; y and upper are [2, 24]; each call writes its own columns.
        unsafe {
            coarse_cols(&w, x.as_ptr(), &norms, 2, whole.as_mut_ptr(), up.as_mut_ptr(), 0..24, Isa::detect());
            for cols in [0..5, 5..16, 16..24] {
                coarse_cols(&w, x.as_ptr(), &norms, 2, parts.as_mut_ptr(), up_parts.as_mut_ptr(), cols, Isa::detect());
            }
        }
        assert_eq!((whole, up), (parts, up_parts));
    }

    /// argmax of the exact fp32 logits (first index on ties), over every row.
    fn exact_argmax(w: &Planes, x: &[f32], isa: Isa) -> usize {
        let exact: Vec<f32> = (0..w.n()).map(|n| w.exact_on(n, x, isa)).collect();
        (0..exact.len()).fold(0, |best, n| if exact[n] > exact[best] { n } else { best })
    }

    fn first_argmax(y: &[f32]) -> usize {
        (0..y.len()).fold(0, |best, n| if y[n] > y[best] { n } else { best })
    }

    #[test]
    fn argmax_is_exact_on_adversarial_near_ties() {
        // Rows sharing their high nibbles with the best row but differing in the low ones: identical coarse
        // logits, exact ones apart by a single code step in one weight, placed far from the RESCORE best.
        let (n, k) = (700, 96);
        let mut case = Case::new(n, k, 5);
        let x: Vec<f32> = (0..2 * k).map(|i| noise(9, i)).collect();
        for (mi, target, twin, class) in [(0usize, 613usize, 650usize, 3usize), (1, 420, 690, 5)] {
            let xr = &x[mi * k..(mi + 1) * k];
            // The target row: codes aligned with x (a clear winner), the twin equal but one low nibble higher
            // where x is positive, so the twin wins by 0.01 * x_j; a hundred decoys share their high nibbles
            // and scales (the same coarse logit) with the lowest exact value.
            for j in 0..k {
                let u = if xr[j] > 0.0 { 0xF0 } else { 0x0F };
                case.codes[target * k + j] = u;
                case.codes[twin * k + j] = u;
                for decoy in (0..n).filter(|d| d % 7 == class && *d != target && *d != twin) {
                    case.codes[decoy * k + j] = (u & 0xF0) | if xr[j] > 0.0 { 0 } else { 15 };
                    case.scales[decoy * (k / BLOCK) + j / BLOCK] = 0.01;
                }
                case.scales[target * (k / BLOCK) + j / BLOCK] = 0.01;
                case.scales[twin * (k / BLOCK) + j / BLOCK] = 0.01;
            }
            let j = (0..k).find(|&j| xr[j] > 0.1).unwrap();
            case.codes[twin * k + j] += 1;
        }
        let (hi, lo) = split(&case.codes);
        case.hi = hi;
        case.lo = lo;
        let w = case.planes();
        for isa in Isa::available() {
            let mut y = vec![0f32; 2 * n];
            let counts = logits(&w, &x, 2, &mut y, isa);
            for mi in 0..2 {
                let xr = &x[mi * k..(mi + 1) * k];
                let row = &y[mi * n..(mi + 1) * n];
                assert_eq!(first_argmax(row), exact_argmax(&w, xr, isa), "{isa:?} row {mi}");
                assert!(counts[mi] >= RESCORE && counts[mi] <= n);
                // The RESCORE best coarse rows and every row that could win are exact.
                for nn in 0..n {
                    let e = w.exact_on(nn, xr, isa);
                    assert!(row[nn] == e || row[nn] < row[first_argmax(row)], "{isa:?}: row {nn}");
                }
            }
        }
    }

    #[test]
    fn argmax_is_exact_on_random_heads() {
        for seed in 0..20 {
            let (n, k) = (500, 64);
            let case = Case::new(n, k, 100 + seed);
            let w = case.planes();
            let x: Vec<f32> = (0..3 * k).map(|i| noise(200 + seed, i) * (1.0 + (i % 9) as f32)).collect();
            for isa in Isa::available() {
                let mut y = vec![0f32; 3 * n];
                let counts = logits(&w, &x, 3, &mut y, isa);
                for mi in 0..3 {
                    let xr = &x[mi * k..(mi + 1) * k];
                    let row = &y[mi * n..(mi + 1) * n];
                    let best = first_argmax(row);
                    assert_eq!(best, exact_argmax(&w, xr, isa), "{isa:?} seed {seed} row {mi}");
                    assert_eq!(row[best], w.exact_on(best, xr, isa));
                    assert!(counts[mi] >= RESCORE);
                }
            }
        }
    }

    #[test]
    fn fp16_scales_give_the_fp32_results() {
        let mut case = Case::new(37, 640, 11);
        for s in case.scales.iter_mut() {
            *s = half::f16::from_f32(*s).to_f32();
        }
        let halves: Vec<half::f16> = case.scales.iter().map(|&s| half::f16::from_f32(s)).collect();
        let narrow = Planes::new(case.n, case.k, &case.hi, &case.lo, &halves).unwrap();
        let x: Vec<f32> = (0..3 * case.k).map(|i| noise(12, i)).collect();
        for isa in Isa::available() {
            let (mut wide_y, mut narrow_y) = (vec![0f32; 3 * case.n], vec![0f32; 3 * case.n]);
            let counts = logits(&case.planes(), &x, 3, &mut wide_y, isa);
            assert_eq!(logits(&narrow, &x, 3, &mut narrow_y, isa), counts);
            assert_eq!(wide_y, narrow_y, "{isa:?}");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        assert!(Planes::<f32>::new(2, 64, &[0; 64], &[0; 64], &[0.0; 4]).is_ok());
        assert!(Planes::<f32>::new(2, 48, &[0; 48], &[0; 48], &[0.0; 3]).is_err());
        assert!(Planes::<f32>::new(2, 64, &[0; 63], &[0; 64], &[0.0; 4]).is_err());
        assert!(Planes::<f32>::new(2, 64, &[0; 64], &[0; 64], &[0.0; 3]).is_err());
    }
}
