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
//! Coarse pass. With L unknown, the centre of its range stands in for it, `c~ = 16 * H - 120.5`, and x is
//! rounded to int8 per block (`CoarseRow`), so the pass is integer dot products of nibbles and bytes:
//!
//! ```text
//!   coarse = sum_b scale[n, b] * d_b * sum_j c~_j * q_j,      x = d * q + e
//!   |exact - coarse| <= sum_b |scale[n, b]| * (7.5 * ||x_b||_1 + 120.5 * ||e_b||_1)
//! ```
//!
//! for any x (||.||_1: a block's L1 norm; e, the rounding of x, is measured). The fp32 rounding of the sums is
//! covered by a slack on both multipliers. The pass writes the coarse logit and its upper bound
//! `coarse + bound` per row.
//!
//! Exact pass. The RESCORE rows with the highest coarse logits are recomputed exactly (fp32 weights
//! `scale * c`, fp32 sums, as the graph's fp32 rescoring does); their best exact value L is a lower bound
//! on the exact maximum, so every other row whose upper bound reaches L is recomputed too. A row left coarse
//! has exact < L <= max, hence the argmax of the output is the argmax of the exact logits, for any input, and
//! the RESCORE best coarse rows (those top-k / top-p sampling reads) are exact as before.
//!
//! The coarse pass reads half the bytes of an 8-bit pass (plus the scales). AVX-512 VNNI multiplies 128
//! nibbles by int8 x in two `vpdpbusd` (four blocks of a row per 64-byte load), AVX2 in two `vpmaddubsw` and
//! a `vpmaddwd` (two blocks), and a portable loop covers the rest: about 3.5 vector operations per block
//! of a row where expanding the nibbles to fp32 weights took about 14.

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

/// Blocks per coarse group: one 64-byte load of the high plane holds four blocks of a row.
const GROUP: usize = 4;

/// One row of x as the coarse pass reads it: each block of 32 as two int8 terms, `x = d * q + (d / 256) * r +
/// e` (`d = max|x| / 127`, `q = round(x / d)`, r the rounded remainder), laid out as the high plane is, and
/// per-lane constants that turn a block's integer sum into its share of the coarse logit and of the bound.
///
/// The coarse logit of row n is `sum_b s_b * (d_b / 256) * sum_j (16 * H_j - 120.5) * (256 * q_j + r_j)`
/// (the integer sums are exact). It differs from the exact logit `sum_b s_b * sum_j c_j * x_j` by
///
/// ```text
///   sum_b s_b * (sum_j (L_j - 7.5) * x_j + sum_j (16 * H_j - 120.5) * e_j)
///   |.| <= sum_b |s_b| * (7.5 * ||x_b||_1 + 120.5 * ||e_b||_1) = sum_b |s_b| * t_b
/// ```
///
/// for any weights and any x (|L - 7.5| <= 7.5, |16 * H - 120.5| <= 120.5); `||e_b||_1` is measured, not
/// assumed, and with two terms it is ~1/256 of one int8 term's, so the bound is the lost nibble's almost
/// alone (one term tripled the rows the exact pass recomputes). Both multipliers carry a slack of
/// `4 * 128.5 * (K + 32) * 2^-23` for fp32 rounding: the exact pass's is within `(K + 32) * 2^-23 * 128.5 *
/// sum_b |s_b| * ||x_b||_1` (K products of |w| <= 128.5 * |s|); the coarse sum's within `(K/128 + 6) *
/// 2^-23 * 360.5 * sum_b |s_b| * (||x_b||_1 + ||e_b||_1)` (its lanes add up to at most `240 * |d * q + d/256 *
/// r|` and `120.5 * |sum(d * q + d/256 * r)|` a block); the bound's own sum and the upper bound's addition
/// within `(K/128 + 23) * 2^-23` of the bound. Each is below one share.
pub struct CoarseRow {
    /// Per group of four blocks, 256 bytes: q of elements 0-15 of each block (64 bytes), q of elements
    /// 16-31, then r of the same, as a 64-byte load of the high plane holds the elements in its low and high
    /// nibbles. Zero past the last block.
    q: Vec<i8>,
    /// Per group, 16 lanes (lane i belongs to block i / 4, as a dot product of 4 bytes per lane leaves the
    /// sums): `16 * d / 256`, `-120.5 * (d / 256) * sum(256 * q + r) / 4` and `t / 4`. Zero past the last
    /// block.
    scale: Vec<f32>,
    offset: Vec<f32>,
    bound: Vec<f32>,
}

/// Bytes of `CoarseRow::q` per group of four blocks.
const GROUP_BYTES: usize = 4 * 64;

impl CoarseRow {
    pub fn new(x: &[f32]) -> CoarseRow {
        assert!(x.len() % BLOCK == 0, "x must hold whole blocks of 32");
        let blocks = x.len() / BLOCK;
        let groups = blocks.div_ceil(GROUP);
        let slack = 4.0 * 128.5 * (x.len() + BLOCK) as f64 * f64::from(f32::EPSILON);
        let lanes = || vec![0f32; groups * 16];
        let mut row = CoarseRow { q: vec![0; groups * GROUP_BYTES], scale: lanes(), offset: lanes(), bound: lanes() };
        for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
            let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
            let fine = d / 256.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let (g, p) = (b / GROUP, b % GROUP);
            let (mut sum, mut l1, mut err) = (0i32, 0f64, 0f64);
            for (j, &v) in xb.iter().enumerate() {
                let q = (v * inv).round().clamp(-127.0, 127.0);
                let r = ((v - d * q) * inv * 256.0).round().clamp(-127.0, 127.0);
                let at = g * GROUP_BYTES + (j / 16) * 64 + p * 16 + j % 16;
                (row.q[at], row.q[at + 128]) = (q as i8, r as i8);
                sum += 256 * q as i32 + r as i32;
                l1 += f64::from(v).abs();
                // d * q + fine * r is exact in f64 (24 + 16 bits), so the difference is rounded once.
                err += (f64::from(v) - f64::from(d) * f64::from(q) - f64::from(fine) * f64::from(r)).abs();
            }
            let t = (7.5 + slack) * l1 + (120.5 + slack) * err;
            for lane in g * 16 + 4 * p..g * 16 + 4 * p + 4 {
                row.scale[lane] = 16.0 * fine;
                row.offset[lane] = -120.5 * fine * sum as f32 / 4.0;
                row.bound[lane] = (t / 4.0 * (1.0 + 1e-6)) as f32; // rounded up, whatever f32 rounding does
            }
        }
        row
    }

    /// K, padded to whole groups.
    fn k(&self) -> usize {
        self.q.len() / GROUP_BYTES * GROUP * BLOCK
    }
}

/// Coarse logits and upper bounds for columns `cols` of the rows `xs` (M of them, see `CoarseRow`):
/// `y[m, n]` = coarse, `upper[m, n]` = coarse + bound.
///
/// # Safety
/// `y` and `upper` point to M*N writable floats, `cols` lies within 0..N, each row of `xs` was made from K
/// values, `isa` is supported by this CPU, and no other thread writes the same columns concurrently.
pub unsafe fn coarse_cols<S: Scale>(w: &Planes<S>, xs: &[CoarseRow], y: *mut f32, upper: *mut f32, cols: Range<usize>, isa: Isa) {
    debug_assert!(cols.end <= w.n && xs.iter().all(|x| x.k() == w.k.div_ceil(GROUP * BLOCK) * GROUP * BLOCK));
    let out = Out { y, upper };
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x86::has_vnni() => x86::vnni(w, xs, out, cols),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 | Isa::Avx2 if x86::has_avx2() => x86::avx2(w, xs, out, cols),
        _ => portable(w, xs, out, cols),
    }
}

#[derive(Clone, Copy)]
struct Out {
    y: *mut f32,
    upper: *mut f32,
}

impl Out {
    /// Stores row n's coarse logit and upper bound for x row mi.
    unsafe fn put(self, n_total: usize, mi: usize, n: usize, coarse: f32, bound: f32) {
        *self.y.add(mi * n_total + n) = coarse;
        *self.upper.add(mi * n_total + n) = coarse + bound;
    }
}

unsafe fn portable<S: Scale>(w: &Planes<S>, xs: &[CoarseRow], out: Out, cols: Range<usize>) {
    let nb = w.k / BLOCK;
    for n in cols {
        for (mi, x) in xs.iter().enumerate() {
            let (mut coarse, mut bound) = (0f32, 0f32);
            for b in 0..nb {
                let (g, p) = (b / GROUP, b % GROUP);
                let hi = &w.hi[(n * nb + b) * 16..][..16];
                let q = &x.q[g * GROUP_BYTES + p * 16..];
                let term = |at: usize| -> i32 { (0..16).map(|j| i32::from(hi[j] & 15) * i32::from(q[at + j]) + i32::from(hi[j] >> 4) * i32::from(q[at + 64 + j])).sum() };
                let dot = 256 * term(0) + term(128);
                let (s, lane) = (w.scales[n * nb + b].to_f32(), g * 16 + 4 * p);
                coarse += s * (dot as f32 * x.scale[lane] + 4.0 * x.offset[lane]);
                bound += s.abs() * (4.0 * x.bound[lane]);
            }
            out.put(w.n, mi, n, coarse, bound);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{CoarseRow, Out, Planes, Scale, BLOCK, GROUP, GROUP_BYTES};
    pub(super) use super::super::cpu::{has_avx2, has_vnni};
    use super::super::cpu::sum16;
    use core::arch::x86_64::*;
    use core::ops::Range;

    /// `*p` widened to fp32 in every lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn splat512<S: Scale>(p: *const S) -> __m512 {
        if S::HALF {
            _mm512_cvtph_ps(_mm256_set1_epi16(p.cast::<i16>().read()))
        } else {
            _mm512_set1_ps(p.cast::<f32>().read())
        }
    }

    /// R weight rows against MC rows of x per tile.
    macro_rules! tiles {
        ($w:expr, $xs:expr, $out:expr, $cols:expr, $tile:ident, $r:literal, [$($mc:literal),+]) => {{
            let m = $xs.len();
            let mut n = $cols.start;
            while n < $cols.end {
                let one = n + $r > $cols.end;
                let mut mi = 0;
                while mi < m {
                    let left = m - mi;
                    $(
                        if left >= $mc {
                            if one { $tile::<S, 1, $mc>($w, $xs, mi, $out, n) } else { $tile::<S, $r, $mc>($w, $xs, mi, $out, n) }
                            mi += $mc;
                            continue;
                        }
                    )+
                }
                n += if one { 1 } else { $r };
            }
        }};
    }

    pub(super) unsafe fn vnni<S: Scale>(w: &Planes<S>, xs: &[CoarseRow], out: Out, cols: Range<usize>) {
        tiles!(w, xs, out, cols, tile512, 4, [2, 1]);
    }

    pub(super) unsafe fn avx2<S: Scale>(w: &Planes<S>, xs: &[CoarseRow], out: Out, cols: Range<usize>) {
        tiles!(w, xs, out, cols, tile256, 4, [2, 1]);
    }

    /// Bytes of the high plane asked for ahead of the row being scored.
    const AHEAD: usize = 4096;

    /// Rows n0..n0+R against x rows m0..m0+MC, four blocks per step: one 64-byte load of the high plane
    /// gives the nibbles of elements 0-15 (low) and 16-31 (high) of each block, four `vpdpbusd` multiply them
    /// by x's two int8 terms and sum four products per lane (lanes 4b..4b+3 hold block b), and two
    /// multiply-adds turn the lanes into the coarse logit, one more into the bound.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile512<S: Scale, const R: usize, const MC: usize>(w: &Planes<S>, xs: &[CoarseRow], m0: usize, out: Out, n0: usize) {
        let nb = w.k / BLOCK;
        let (hi, scales) = (w.hi.as_ptr(), w.scales.as_ptr());
        let nibble = _mm512_set1_epi8(15);
        let spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        let mut coarse = [[_mm512_setzero_ps(); MC]; R];
        let mut bound = [[_mm512_setzero_ps(); MC]; R];
        for g in 0..nb.div_ceil(GROUP) {
            let blocks = (nb - g * GROUP).min(GROUP);
            let bytes: __mmask64 = if blocks == GROUP { !0 } else { (1u64 << (16 * blocks)) - 1 };
            let lanes: __mmask16 = (1u16 << blocks) - 1;
            for r in 0..R {
                let first = (n0 + r) * nb + g * GROUP;
                // The plane is read once per call, far larger than the caches: ask for it ahead (on its own
                // the hardware prefetcher kept one thread at ~10 GB/s; ~12% faster with the hint).
                _mm_prefetch::<_MM_HINT_T0>(hi.wrapping_add(first * 16 + AHEAD).cast());
                if r == 0 {
                    _mm_prefetch::<_MM_HINT_T0>(scales.wrapping_add(first + AHEAD / 8).cast());
                }
                let h = _mm512_maskz_loadu_epi8(bytes, hi.add(first * 16).cast());
                let (h0, h1) = (_mm512_and_si512(h, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(h), nibble));
                let s4 = if S::HALF {
                    _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(u32::from(lanes), scales.add(first).cast())))
                } else {
                    _mm512_maskz_loadu_ps(lanes, scales.add(first).cast())
                };
                let s = _mm512_permutexvar_ps(spread, s4);
                let sabs = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(s), magnitude));
                for mi in 0..MC {
                    let x = &xs[m0 + mi];
                    let (q, c) = (x.q.as_ptr().add(g * GROUP_BYTES), g * 16);
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), h0, _mm512_loadu_si512(q.cast()));
                    let dot = _mm512_slli_epi32::<8>(_mm512_dpbusd_epi32(dot, h1, _mm512_loadu_si512(q.add(64).cast())));
                    let dot = _mm512_dpbusd_epi32(dot, h0, _mm512_loadu_si512(q.add(128).cast()));
                    let dot = _mm512_dpbusd_epi32(dot, h1, _mm512_loadu_si512(q.add(192).cast()));
                    let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_loadu_ps(x.scale.as_ptr().add(c)), _mm512_loadu_ps(x.offset.as_ptr().add(c)));
                    coarse[r][mi] = _mm512_fmadd_ps(v, s, coarse[r][mi]);
                    bound[r][mi] = _mm512_fmadd_ps(sabs, _mm512_loadu_ps(x.bound.as_ptr().add(c)), bound[r][mi]);
                }
            }
        }
        // The 2 * R * MC sums in one tree (`sum16`): coarse (mi, r) in lane mi * R + r, its bound 8 lanes on.
        let mut acc = [_mm512_setzero_ps(); 16];
        for r in 0..R {
            for mi in 0..MC {
                (acc[mi * R + r], acc[8 + mi * R + r]) = (coarse[r][mi], bound[r][mi]);
            }
        }
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), sum16(acc));
        for r in 0..R {
            for mi in 0..MC {
                out.put(w.n, m0 + mi, n0 + r, sums[mi * R + r], sums[8 + mi * R + r]);
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

    /// As tile512, two blocks per step: `vpmaddubsw` and `vpmaddwd` stand in for `vpdpbusd` (pairs of
    /// products <= 2 * 15 * 127, far from saturating 16 bits).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile256<S: Scale, const R: usize, const MC: usize>(w: &Planes<S>, xs: &[CoarseRow], m0: usize, out: Out, n0: usize) {
        let nb = w.k / BLOCK;
        let (hi, scales) = (w.hi.as_ptr(), w.scales.as_ptr());
        let (nibble, ones, coarse_weight) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1), _mm256_set1_epi16(256));
        let spread = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        let mut coarse = [[_mm256_setzero_ps(); MC]; R];
        let mut bound = [[_mm256_setzero_ps(); MC]; R];
        for pair in 0..nb.div_ceil(2) {
            let both = 2 * pair + 1 < nb;
            // Where the pair is in x's layout: its group, and which half of the group's 64-byte runs.
            let (q_at, c_at) = ((pair / 2) * GROUP_BYTES + (pair % 2) * 32, (pair / 2) * 16 + (pair % 2) * 8);
            for r in 0..R {
                let first = (n0 + r) * nb + 2 * pair;
                let h = if both {
                    _mm256_loadu_si256(hi.add(first * 16).cast())
                } else {
                    _mm256_zextsi128_si256(_mm_loadu_si128(hi.add(first * 16).cast()))
                };
                let (h0, h1) = (_mm256_and_si256(h, nibble), _mm256_and_si256(_mm256_srli_epi16::<4>(h), nibble));
                let s2 = match (S::HALF, both) {
                    (true, true) => _mm_cvtph_ps(_mm_cvtsi32_si128(scales.add(first).cast::<i32>().read_unaligned())),
                    (true, false) => _mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(scales.add(first).cast::<u16>().read()))),
                    (false, true) => _mm_castsi128_ps(_mm_loadl_epi64(scales.add(first).cast())),
                    (false, false) => _mm_load_ss(scales.add(first).cast()),
                };
                let s = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(s2), spread);
                let sabs = _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(s), magnitude));
                for mi in 0..MC {
                    let x = &xs[m0 + mi];
                    let q = x.q.as_ptr().add(q_at);
                    let term = |at: usize| {
                        _mm256_add_epi16(
                            _mm256_maddubs_epi16(h0, _mm256_loadu_si256(q.add(at).cast())),
                            _mm256_maddubs_epi16(h1, _mm256_loadu_si256(q.add(at + 64).cast())),
                        )
                    };
                    let dot = _mm256_add_epi32(_mm256_madd_epi16(term(0), coarse_weight), _mm256_madd_epi16(term(128), ones));
                    let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_loadu_ps(x.scale.as_ptr().add(c_at)), _mm256_loadu_ps(x.offset.as_ptr().add(c_at)));
                    coarse[r][mi] = _mm256_fmadd_ps(v, s, coarse[r][mi]);
                    bound[r][mi] = _mm256_fmadd_ps(sabs, _mm256_loadu_ps(x.bound.as_ptr().add(c_at)), bound[r][mi]);
                }
            }
        }
        let sum = |v: __m256| {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        };
        for r in 0..R {
            for mi in 0..MC {
                out.put(w.n, m0 + mi, n0 + r, sum(coarse[r][mi]), sum(bound[r][mi]));
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
    // Element by element, a row enters when it beats the lowest kept one. That floor only rises, so a chunk with no
    // element above the floor at its start changes nothing and is skipped after one vectorizable comparison
    // (the rows of a step rarely enter past the first few thousand).
    let mut start = keep;
    for chunk in y[keep..].chunks(SCAN_CHUNK) {
        let floor = y[best[low]];
        if chunk.iter().fold(false, |any, &v| any | (v > floor)) {
            for (i, &v) in chunk.iter().enumerate() {
                if v > y[best[low]] {
                    best[low] = start + i;
                    low = lowest(&best);
                }
            }
        }
        start += chunk.len();
    }
    best
}

/// Coarse logits `best_coarse` compares with its floor at once.
const SCAN_CHUNK: usize = 32;

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
    let rows: Vec<CoarseRow> = x.chunks_exact(w.k).map(CoarseRow::new).collect();
    let mut upper = vec![0f32; m * w.n];
    // SAFETY: the slices have the asserted sizes, and all columns 0..N are in range.
    unsafe { coarse_cols(w, &rows, y.as_mut_ptr(), upper.as_mut_ptr(), 0..w.n, isa) };
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

        /// The definition in f64: exact logit, coarse logit (the centre 7.5 for the low nibble, x rounded to
        /// int8 per block as `CoarseRow` does), the bound without its rounding slack, and the magnitude that
        /// slack is relative to.
        fn reference(&self, x: &[f32], n: usize) -> (f64, f64, f64, f64) {
            let (mut exact, mut coarse, mut bound, mut mag) = (0.0, 0.0, 0.0, 0.0);
            for (b, xb) in x.chunks_exact(BLOCK).enumerate() {
                let s = f64::from(self.scales[n * self.k / BLOCK + b]);
                let d = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
                let (mut l1, mut err) = (0.0, 0.0);
                for (j, &xv) in xb.iter().enumerate() {
                    let u = self.codes[n * self.k + b * BLOCK + j];
                    let q = (xv * inv).round().clamp(-127.0, 127.0);
                    let r = ((xv - d * q) * inv * 256.0).round().clamp(-127.0, 127.0);
                    let xq = f64::from(d) * f64::from(q) + f64::from(d) / 256.0 * f64::from(r);
                    exact += s * (f64::from(u) - 128.0) * f64::from(xv);
                    coarse += s * (16.0 * f64::from(u >> 4) - 120.5) * xq;
                    l1 += f64::from(xv).abs();
                    err += (f64::from(xv) - xq).abs();
                }
                bound += s.abs() * (7.5 * l1 + 120.5 * err);
                mag += s.abs() * 360.5 * (l1 + err);
            }
            (exact, coarse, bound, mag)
        }
    }

    #[test]
    fn best_coarse_keeps_what_the_element_by_element_scan_keeps() {
        fn plain(y: &[f32]) -> Vec<usize> {
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
        for (len, seed) in [(10, 1), (64, 2), (65, 3), (1000, 4), (4099, 5), (262_144, 6)] {
            // Coarse steps of 1/8 make ties common; a rising tail makes late rows enter.
            let y: Vec<f32> = (0..len).map(|i| (noise(seed, i) * 40.0).round() / 8.0 + if i % 997 == 0 { i as f32 * 1e-3 } else { 0.0 }).collect();
            assert_eq!(best_coarse(&y), plain(&y), "len {len}");
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
        for &(n, k, m) in &[(8, 32, 1), (13, 64, 1), (37, 640, 5), (24, 576, 3), (9, 96, 9), (40, 64, 2), (11, 160, 2)] {
            let mut case = Case::new(n, k, n + k);
            case.scales[3] = -case.scales[3]; // a negative scale: the bound takes |scale|
            let w = case.planes();
            let x: Vec<f32> = (0..m * k).map(|i| noise(7 + m, i) * if i % 17 == 0 { 8.0 } else { 1.0 }).collect();
            let rows: Vec<CoarseRow> = x.chunks_exact(k).map(CoarseRow::new).collect();
            for isa in Isa::available() {
                let (mut y, mut upper) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                // SAFETY: y and upper are [M, N], all columns in range, rows made from K values each.
                unsafe { coarse_cols(&w, &rows, y.as_mut_ptr(), upper.as_mut_ptr(), 0..n, isa) };
                for mi in 0..m {
                    let xr = &x[mi * k..(mi + 1) * k];
                    for nn in 0..n {
                        let (exact, coarse, bound, mag) = case.reference(xr, nn);
                        let (got, up) = (f64::from(y[mi * n + nn]), f64::from(upper[mi * n + nn]));
                        assert!((got - coarse).abs() <= 1e-6 * mag, "{isa:?} n={n} k={k} m={m}: {got} vs {coarse}");
                        // The stored bound is the definition plus its rounding slack (<1% here), no looser.
                        let width = up - got;
                        assert!(width >= bound && width <= 1.01 * bound + 1e-6 * mag, "{isa:?}: bound {width} vs {bound}");
                        // The bound holds for the fp32 exact value and the fp32 coarse one.
                        let exact32 = f64::from(w.exact(nn, xr));
                        assert!((exact32 - exact).abs() <= 1e-6 * mag);
                        assert!((f64::from(w.exact_on(nn, xr, isa)) - exact).abs() <= 1e-6 * mag, "{isa:?}: exact");
                        assert!(exact32 <= up && exact32 >= got - width, "{isa:?}: {exact32} outside {got} +- {width}");
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
        let rows: Vec<CoarseRow> = x.chunks_exact(64).map(CoarseRow::new).collect();
        let (mut whole, mut up) = (vec![0f32; 48], vec![0f32; 48]);
        let (mut parts, mut up_parts) = (vec![0f32; 48], vec![0f32; 48]);
        // SAFETY: rows made from [2, 64]; y and upper are [2, 24]; each call writes its own columns.
        unsafe {
            coarse_cols(&w, &rows, whole.as_mut_ptr(), up.as_mut_ptr(), 0..24, Isa::detect());
            for cols in [0..5, 5..16, 16..24] {
                coarse_cols(&w, &rows, parts.as_mut_ptr(), up_parts.as_mut_ptr(), cols, Isa::detect());
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

