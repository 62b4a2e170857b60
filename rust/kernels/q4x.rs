//! `y = x · Wᵀ` for a 4-bit block-quantized W [N, K] (GGUF's Q4_0 / Q4_1), multiplied in integer dot-product
//! instructions with x held as block integers that are exact to 2^-22 of each block's largest element.
//!
//! Why. The fp32 kernel (q4.rs) forms every weight as an fp32 value and multiply-adds it: on AVX-512 about
//! seven vector instructions per block of 32 weights and row, two of them `vpermps`, so a decode step of
//! SmolLM2 was bound by instruction throughput, not by the bytes it reads. Here the nibbles stay integers and
//! `vpdpbusd` multiplies 64 of them by bytes of x and sums them four to a lane in one instruction.
//!
//! Activations (`Terms`). Each block of 32 elements of a row of x, with `d = max|x_b| / 127`, is written as
//!
//! ```text
//!   x_j = d * (t1_j + t2_j / 128 + t3_j / 32768) + e_j      t1, t3 in -127..=127, t2 in -64..=64
//!   |e_j| <= d / 32768 = max|x_b| / 4,161,536               (about 2^-22 of the block's largest element)
//! ```
//!
//! three int8 terms per element (the rounding of x, then of what is left, twice), so `X_j = 32768 t1 + 256 t2 +
//! t3` is a 23-bit integer and x_b = d/32768 * X + e. Each element is kept to within about 2^-22 of its block's
//! largest one (an fp32 value keeps 2^-24 of itself): the products differ from fp32 activations' by about what
//! the fp32 kernel's own summation order moves them (K additions rounded at 2^-24 of the partial sum), and the
//! converted models' greedy answers are unchanged (tests/convert, tests/engine). llama.cpp's and ONNX Runtime's
//! fast paths round x to int8 (2^-8 of the block's largest element), which flips near-tie greedy tokens.
//!
//! Product. For row n and block b with scale s, offset o and zero point z (W = s (q - z) + o):
//!
//! ```text
//!   L = sum_j q_j X_j - z sum_j X_j                     exact in int32 (|L| < 2^31, see `Terms::new`)
//!   y = sum_b  s * (L * d/32768) + o * S_b              S_b = d/32768 * sum_j X_j, fp32 multiply-adds
//! ```
//!
//! so y is the exact product of W with the represented x up to one fp32 rounding per block term: the order of
//! the integer sums does not matter, and every instruction set here gives the same bits (tested). A row's result
//! depends only on that row of x, whatever the batch.
//!
//! Layout. Rows are taken in groups of ROWS (16); within a group, block b's codes are four 64-byte lines, line c
//! holding bytes 4c..4c+4 of each of the 16 rows' 16-byte GGUF block (byte i: element i in its low nibble,
//! element i + 16 in its high nibble):
//!
//! ```text
//!   codes[(((n / 16) * K/32 + b) * 4 + c) * 64 + (n % 16) * 4 + j] = GGUF byte 4c + j of block (n, b)
//!   scales / offsets [((n / 16) * K/32 + b) * 16 + n % 16]
//! ```
//!
//! so one `vpdpbusd` multiplies a line's low (or high) nibbles by four bytes of x broadcast to every lane, and
//! lane r sums row r's products: 16 rows' outputs land in one register with no horizontal sums, and a block's 16
//! scales are one load. AVX2 does the same with `vpmaddubsw` + `vpmaddwd` on half-lines.

use core::ops::Range;

pub use super::q4::Isa;
pub use super::{Scale, BLOCK};

/// Rows per group (lanes of an AVX-512 register).
pub const ROWS: usize = 16;
/// 64-byte lines per group and block (16 code bytes of each row, four at a time).
const LINES: usize = 4;
/// Bytes of a row's terms per block: t1, t2, t3, 32 each, in x's order.
const TERM_BYTES: usize = 3 * BLOCK;

/// A borrowed 4-bit matrix in the grouped layout (module docs); block scales and offsets stored as `S`.
#[derive(Clone, Copy, Debug)]
pub struct Q4Grouped<'a, S = f32> {
    n: usize,
    k: usize,
    codes: &'a [u8],
    scales: &'a [S],
    offsets: Option<&'a [S]>,
    zero_point: u8,
}

impl<'a, S: Scale> Q4Grouped<'a, S> {
    /// `codes`: N * K/2 bytes; `scales` and `offsets`: N * K/32 values; N a multiple of 16, K of 32.
    pub fn new(n: usize, k: usize, codes: &'a [u8], scales: &'a [S], offsets: Option<&'a [S]>, zero_point: u8) -> Result<Self, &'static str> {
        if n == 0 || k == 0 || n % ROWS != 0 || k % BLOCK != 0 {
            return Err("N must be a positive multiple of 16 and K of 32");
        }
        if zero_point > 15 {
            return Err("the zero point of a 4-bit code is at most 15");
        }
        let blocks = n * (k / BLOCK);
        if codes.len() != blocks * BLOCK / 2 || scales.len() != blocks || offsets.is_some_and(|o| o.len() != blocks) {
            return Err("codes must hold N * K/2 bytes, scales and offsets one value per block of 32");
        }
        Ok(Self { n, k, codes, scales, offsets, zero_point })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn zero_point(&self) -> u8 {
        self.zero_point
    }

    /// Index of block (n, b)'s scale and offset.
    fn block(&self, n: usize, b: usize) -> usize {
        ((n / ROWS) * (self.k / BLOCK) + b) * ROWS + n % ROWS
    }

    /// The 4-bit code of W[n, j].
    pub fn code(&self, n: usize, j: usize) -> u8 {
        let (b, i) = (j / BLOCK, j % BLOCK % 16);
        let line = ((n / ROWS) * (self.k / BLOCK) + b) * LINES + i / 4;
        let byte = self.codes[line * 64 + (n % ROWS) * 4 + i % 4];
        if j % BLOCK < 16 { byte & 0x0F } else { byte >> 4 }
    }

    /// The fp32 weight W[n, j] = scale * (q - zero_point) + offset (for tests).
    pub fn weight(&self, n: usize, j: usize) -> f32 {
        let i = self.block(n, j / BLOCK);
        let offset = self.offsets.map_or(0.0, |o| o[i].to_f32());
        (f32::from(self.code(n, j)) - f32::from(self.zero_point)).mul_add(self.scales[i].to_f32(), offset)
    }
}

/// Rows of x as block integers (module docs), with what the product needs per row and block: `unit` = d/32768,
/// `sum` = S_b = unit * sum_j X_j, and `shift` = z * sum_j X_j (the zero point's share of L, an exact integer).
pub struct Terms {
    k: usize,
    terms: Vec<i8>,
    unit: Vec<f32>,
    sum: Vec<f32>,
    shift: Vec<i32>,
}

impl Terms {
    /// `x` [M, K] for a matrix with this zero point. |L| < 2^31: |q - z| <= 15 and |X| <= 32768 * 127 + 256 * 64 +
    /// 127 = 4,177,919, so a block's 32 products stay within 32 * 15 * 4,177,919 = 2,005,401,120; the int32
    /// lane sums before the zero point's share (q alone, 0..15) have the same bound.
    pub fn new(x: &[f32], k: usize, zero_point: u8) -> Terms {
        assert!(k > 0 && k % BLOCK == 0 && x.len() % k == 0, "x must be [M, K] with K a multiple of 32");
        let blocks = x.len() / BLOCK;
        let mut t = Terms { k, terms: vec![0; blocks * TERM_BYTES], unit: vec![0.0; blocks], sum: vec![0.0; blocks], shift: vec![0; blocks] };
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if x86::has_vnni() {
            // SAFETY: the features were just detected; `t` holds `blocks` blocks of every array.
            unsafe { x86::split512(x, &mut t, i32::from(zero_point)) };
            done = blocks;
        } else if x86::has_avx2() {
            // SAFETY: as above.
            unsafe { x86::split256(x, &mut t, i32::from(zero_point)) };
            done = blocks;
        }
        for b in done..blocks {
            split_block(&x[b * BLOCK..][..BLOCK], &mut t, b, i32::from(zero_point));
        }
        t
    }

    pub fn rows(&self) -> usize {
        self.unit.len() / (self.k / BLOCK)
    }

    /// The represented value of element j of row m (for tests): unit * X_j.
    pub fn value(&self, m: usize, j: usize) -> f64 {
        let b = m * (self.k / BLOCK) + j / BLOCK;
        let t = &self.terms[b * TERM_BYTES..][..TERM_BYTES];
        let i = j % BLOCK;
        let big = 32768 * i64::from(t[i]) + 256 * i64::from(t[BLOCK + i]) + i64::from(t[2 * BLOCK + i]);
        f64::from(self.unit[b]) * big as f64
    }
}

/// One block of x into its terms, in the operations (fp32, fused, round to nearest even) `x86::split512` uses.
fn split_block(x: &[f32], t: &mut Terms, b: usize, zero_point: i32) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = max / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let (d2, inv2, inv3) = (d * (1.0 / 128.0), inv * 128.0, inv * 32768.0);
    let terms = &mut t.terms[b * TERM_BYTES..][..TERM_BYTES];
    let mut total = 0i32;
    for (j, &v) in x.iter().enumerate() {
        let t1 = (v * inv).round_ties_even().clamp(-127.0, 127.0);
        let r1 = (-d).mul_add(t1, v);
        let t2 = (r1 * inv2).round_ties_even().clamp(-64.0, 64.0);
        let r2 = (-d2).mul_add(t2, r1);
        let t3 = (r2 * inv3).round_ties_even().clamp(-127.0, 127.0);
        (terms[j], terms[BLOCK + j], terms[2 * BLOCK + j]) = (t1 as i8, t2 as i8, t3 as i8);
        total += 32768 * t1 as i32 + 256 * t2 as i32 + t3 as i32;
    }
    let unit = d * (1.0 / 32768.0);
    (t.unit[b], t.sum[b], t.shift[b]) = (unit, unit * total as f32, zero_point * total);
}

/// y[M, N] = x · Wᵀ, single-threaded (x given as its `Terms`).
pub fn matmul<S: Scale>(w: &Q4Grouped<'_, S>, x: &Terms, y: &mut [f32], isa: Isa) {
    assert_eq!(x.k, w.k, "x must be [M, K]");
    assert_eq!(y.len(), x.rows() * w.n, "y must be [M, N]");
    // SAFETY: y has M * N elements and all columns 0..N are in range.
    unsafe { matmul_cols(w, x, y.as_mut_ptr(), 0..w.n, isa) }
}

/// Columns `cols` of y[M, N] = x · Wᵀ: threads split N into disjoint column ranges, multiples of 16.
///
/// # Safety
/// `y` points to M*N writable floats, `cols` lies within 0..N with both ends multiples of 16, `isa` is supported
/// by this CPU, and no other thread writes the same columns of y concurrently.
pub unsafe fn matmul_cols<S: Scale>(w: &Q4Grouped<'_, S>, x: &Terms, y: *mut f32, cols: Range<usize>, isa: Isa) {
    debug_assert!(cols.end <= w.n && cols.start % ROWS == 0 && cols.end % ROWS == 0 && x.k == w.k);
    let groups = cols.start / ROWS..cols.end / ROWS;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if x86::has_vnni() => x86::vnni(w, x, y, groups),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 if x86::has_avx2() => x86::avx2(w, x, y, groups),
        _ => portable(w, x, y, cols),
    }
}

/// L for row n and block b of row m (module docs), in i64 (the kernels' int32 sums, which cannot overflow).
fn block_dot<S: Scale>(w: &Q4Grouped<S>, x: &Terms, m: usize, n: usize, b: usize) -> i32 {
    let i = m * (w.k / BLOCK) + b;
    let t = &x.terms[i * TERM_BYTES..][..TERM_BYTES];
    let dot: i64 = (0..BLOCK)
        .map(|j| {
            let big = 32768 * i64::from(t[j]) + 256 * i64::from(t[BLOCK + j]) + i64::from(t[2 * BLOCK + j]);
            i64::from(w.code(n, b * BLOCK + j)) * big
        })
        .sum();
    i32::try_from(dot - i64::from(x.shift[i])).expect("|L| < 2^31 (Terms::new)")
}

unsafe fn portable<S: Scale>(w: &Q4Grouped<S>, x: &Terms, y: *mut f32, cols: Range<usize>) {
    let nb = w.k / BLOCK;
    for m in 0..x.rows() {
        for n in cols.clone() {
            let mut acc = 0f32;
            for b in 0..nb {
                let (i, xi) = (w.block(n, b), m * nb + b);
                let v = block_dot(w, x, m, n, b) as f32 * x.unit[xi];
                acc = w.scales[i].to_f32().mul_add(v, acc);
                if let Some(o) = w.offsets {
                    acc = o[i].to_f32().mul_add(x.sum[xi], acc);
                }
            }
            *y.add(m * w.n + n) = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Q4Grouped, Scale, Terms, BLOCK, LINES, ROWS, TERM_BYTES};
    pub(super) use super::super::cpu::{has_avx2, has_vnni};
    use core::arch::x86_64::*;
    use core::ops::Range;

    /// Every block of x into `t` (`split_block`'s operations, 16 elements a register).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn split512(x: &[f32], t: &mut Terms, zero_point: i32) {
        let magnitude = _mm512_set1_epi32(0x7fff_ffff);
        let clamp = |v: __m512, limit: f32| _mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-limit)), _mm512_set1_ps(limit));
        for b in 0..x.len() / BLOCK {
            let p = x.as_ptr().add(b * BLOCK);
            let v = [_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16))];
            let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), magnitude));
            let max = _mm512_reduce_max_ps(_mm512_max_ps(abs(v[0]), abs(v[1])));
            let d = max / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let (nd, nd2) = (_mm512_set1_ps(-d), _mm512_set1_ps(-(d * (1.0 / 128.0))));
            let (inv1, inv2, inv3) = (_mm512_set1_ps(inv), _mm512_set1_ps(inv * 128.0), _mm512_set1_ps(inv * 32768.0));
            let out = t.terms.as_mut_ptr().add(b * TERM_BYTES);
            let mut total = _mm512_setzero_si512();
            for (h, v) in v.into_iter().enumerate() {
                const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
                let t1 = clamp(_mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(v, inv1)), 127.0);
                let r1 = _mm512_fmadd_ps(nd, t1, v);
                let t2 = clamp(_mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(r1, inv2)), 64.0);
                let r2 = _mm512_fmadd_ps(nd2, t2, r1);
                let t3 = clamp(_mm512_roundscale_ps::<NEAREST>(_mm512_mul_ps(r2, inv3)), 127.0);
                let [i1, i2, i3] = [t1, t2, t3].map(|v| _mm512_cvtps_epi32(v));
                for (k, i) in [i1, i2, i3].into_iter().enumerate() {
                    _mm_storeu_si128(out.add(k * BLOCK + 16 * h).cast(), _mm512_cvtepi32_epi8(i));
                }
                let big = _mm512_add_epi32(_mm512_slli_epi32::<8>(_mm512_add_epi32(_mm512_slli_epi32::<7>(i1), i2)), i3);
                total = _mm512_add_epi32(total, big);
            }
            let total = _mm512_reduce_add_epi32(total);
            let unit = d * (1.0 / 32768.0);
            (t.unit[b], t.sum[b], t.shift[b]) = (unit, unit * total as f32, zero_point * total);
        }
    }

    /// Bytes of codes asked for ahead of the line being read (and the matching share of scales and offsets).
    const AHEAD: usize = 8192;

    /// `split512` on AVX2 (hosts without AVX-512 VNNI run the AVX2 kernel): the same operations, 8 at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn split256(x: &[f32], t: &mut Terms, zero_point: i32) {
        let magnitude = _mm256_set1_epi32(0x7fff_ffff);
        let clamp = |v: __m256, limit: f32| _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-limit)), _mm256_set1_ps(limit));
        let abs = |v: __m256| _mm256_castsi256_ps(_mm256_and_si256(_mm256_castps_si256(v), magnitude));
        const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        for b in 0..x.len() / BLOCK {
            let p = x.as_ptr().add(b * BLOCK);
            let v: [__m256; 4] = core::array::from_fn(|i| _mm256_loadu_ps(p.add(8 * i)));
            let m = _mm256_max_ps(_mm256_max_ps(abs(v[0]), abs(v[1])), _mm256_max_ps(abs(v[2]), abs(v[3])));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let max = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)));
            let d = max / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            let (nd, nd2) = (_mm256_set1_ps(-d), _mm256_set1_ps(-(d * (1.0 / 128.0))));
            let (inv1, inv2, inv3) = (_mm256_set1_ps(inv), _mm256_set1_ps(inv * 128.0), _mm256_set1_ps(inv * 32768.0));
            let out = t.terms.as_mut_ptr().add(b * TERM_BYTES);
            let mut total = _mm256_setzero_si256();
            for (h, v) in v.into_iter().enumerate() {
                let t1 = clamp(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(v, inv1)), 127.0);
                let r1 = _mm256_fmadd_ps(nd, t1, v);
                let t2 = clamp(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(r1, inv2)), 64.0);
                let r2 = _mm256_fmadd_ps(nd2, t2, r1);
                let t3 = clamp(_mm256_round_ps::<NEAREST>(_mm256_mul_ps(r2, inv3)), 127.0);
                let [i1, i2, i3] = [t1, t2, t3].map(|v| _mm256_cvtps_epi32(v));
                for (k, i) in [i1, i2, i3].into_iter().enumerate() {
                    // Eight int32 in -127..=127 to eight bytes: saturating packs, then the two halves' low words.
                    let w = _mm256_packs_epi32(i, i);
                    let bytes = _mm256_packs_epi16(w, w);
                    let lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(bytes));
                    let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256::<1>(bytes));
                    out.add(k * BLOCK + 8 * h).cast::<[i32; 2]>().write_unaligned([lo, hi]);
                }
                let big = _mm256_add_epi32(_mm256_slli_epi32::<8>(_mm256_add_epi32(_mm256_slli_epi32::<7>(i1), i2)), i3);
                total = _mm256_add_epi32(total, big);
            }
            let s = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256::<1>(total));
            let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
            let total = _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s)));
            let unit = d * (1.0 / 32768.0);
            (t.unit[b], t.sum[b], t.shift[b]) = (unit, unit * total as f32, zero_point * total);
        }
    }

    /// A group's 16 block values (scales or offsets) from index i, as fp32.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16<S: Scale>(p: *const S) -> __m512 {
        if S::HALF {
            _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
        } else {
            _mm512_loadu_ps(p.cast())
        }
    }

    /// Groups of 16 rows against rows of x: two groups at once for one row of x (decode), one group against up to
    /// eight rows otherwise, in column panels of four groups (a panel's codes stay in cache while a prompt's rows
    /// stream past).
    pub(super) unsafe fn vnni<S: Scale>(w: &Q4Grouped<S>, x: &Terms, y: *mut f32, groups: Range<usize>) {
        const PANEL: usize = 4;
        let (m, off) = (x.rows(), w.offsets.is_some());
        // The range's first bytes, which the loop's own prefetches (AHEAD of each line) never ask for.
        let first = w.codes.as_ptr().wrapping_add(groups.start * (w.k / BLOCK) * LINES * 64);
        for at in (0..AHEAD.min(groups.len() * (w.k / BLOCK) * LINES * 64)).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(first.wrapping_add(at).cast());
        }
        let mut panel = groups.start;
        while panel < groups.end {
            let end = (panel + PANEL).min(groups.end);
            let mut mi = 0;
            while mi < m {
                let rows = [8, 4, 2, 1].into_iter().find(|&r| r <= m - mi).unwrap_or(1);
                let mut g = panel;
                while g < end {
                    let pair = rows == 1 && g + 2 <= end;
                    match (rows, pair, off) {
                        (1, true, true) => tile512::<S, 2, true>(w, x, mi, y, g),
                        (1, true, false) => tile512::<S, 2, false>(w, x, mi, y, g),
                        (1, false, true) => tile512::<S, 1, true>(w, x, mi, y, g),
                        (1, false, false) => tile512::<S, 1, false>(w, x, mi, y, g),
                        (2, _, true) => rows512::<S, 2, true>(w, x, mi, y, g),
                        (2, _, false) => rows512::<S, 2, false>(w, x, mi, y, g),
                        (4, _, true) => rows512::<S, 4, true>(w, x, mi, y, g),
                        (4, _, false) => rows512::<S, 4, false>(w, x, mi, y, g),
                        (_, _, true) => rows512::<S, 8, true>(w, x, mi, y, g),
                        (_, _, false) => rows512::<S, 8, false>(w, x, mi, y, g),
                    }
                    g += if pair { 2 } else { 1 };
                }
                mi += rows;
            }
            panel = end;
        }
    }

    /// Four bytes of row m's terms, broadcast: term k of block b, elements 4c..4c+4 (+16 for the high nibbles).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn term4(x: &Terms, row_block: usize, k: usize, at: usize) -> __m512i {
        _mm512_set1_epi32(x.terms.as_ptr().add(row_block * TERM_BYTES + k * BLOCK + at).cast::<i32>().read_unaligned())
    }

    /// y += one block's integer sums `l` (16 rows' lanes) for row block `xi` of x: fp32 steps shared by every tile.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn finish<const OFF: bool>(x: &Terms, xi: usize, l: __m512i, s: __m512, o: __m512, acc: __m512) -> __m512 {
        let l = _mm512_sub_epi32(l, _mm512_set1_epi32(*x.shift.get_unchecked(xi)));
        let acc = _mm512_fmadd_ps(s, _mm512_mul_ps(_mm512_cvtepi32_ps(l), _mm512_set1_ps(*x.unit.get_unchecked(xi))), acc);
        if OFF { _mm512_fmadd_ps(o, _mm512_set1_ps(*x.sum.get_unchecked(xi)), acc) } else { acc }
    }

    /// Groups g0..g0+G against row m of x (decode). Per block: each of the four lines gives its low and high
    /// nibbles (two `vpand`, one shift), six `vpdpbusd` multiply them by the three terms (four bytes broadcast,
    /// shared by the G groups) into three independent sums, then L = (P1 << 15) + (P2 << 8) + P3 - shift and two
    /// or three multiply-adds in fp32.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn tile512<S: Scale, const G: usize, const OFF: bool>(w: &Q4Grouped<S>, x: &Terms, m: usize, y: *mut f32, g0: usize) {
        let nb = w.k / BLOCK;
        let nibble = _mm512_set1_epi8(15);
        let codes = w.codes.as_ptr();
        let offsets = w.offsets.map_or(core::ptr::null(), <[S]>::as_ptr);
        let mut acc = [_mm512_setzero_ps(); G];
        for b in 0..nb {
            let xi = m * nb + b;
            let mut dot = [[_mm512_setzero_si512(); 3]; G];
            for c in 0..LINES {
                let xs = [0, 1, 2].map(|k| (term4(x, xi, k, 4 * c), term4(x, xi, k, 16 + 4 * c)));
                for (g, dot) in dot.iter_mut().enumerate() {
                    let line = codes.add((((g0 + g) * nb + b) * LINES + c) * 64);
                    _mm_prefetch::<_MM_HINT_T0>(line.wrapping_add(AHEAD).cast());
                    let v = _mm512_loadu_si512(line.cast());
                    let lo = _mm512_and_si512(v, nibble);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                    for (d, (xl, xh)) in dot.iter_mut().zip(xs) {
                        *d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*d, lo, xl), hi, xh);
                    }
                }
            }
            for (g, [p1, p2, p3]) in dot.into_iter().enumerate() {
                let i = ((g0 + g) * nb + b) * ROWS;
                _mm_prefetch::<_MM_HINT_T0>(w.scales.as_ptr().wrapping_add(i + AHEAD / 8).cast());
                let o = if OFF {
                    _mm_prefetch::<_MM_HINT_T0>(offsets.wrapping_add(i + AHEAD / 8).cast());
                    load16(offsets.add(i))
                } else {
                    _mm512_setzero_ps()
                };
                let l = _mm512_add_epi32(_mm512_slli_epi32::<8>(_mm512_add_epi32(_mm512_slli_epi32::<7>(p1), p2)), p3);
                acc[g] = finish::<OFF>(x, xi, l, load16(w.scales.as_ptr().add(i)), o, acc[g]);
            }
        }
        for (g, v) in acc.into_iter().enumerate() {
            _mm512_storeu_ps(y.add(m * w.n + (g0 + g) * ROWS), v);
        }
    }

    /// Group g against rows m0..m0+MC of x (batched decode, prompts). A block's eight nibble registers are
    /// unpacked once and each row of x keeps one integer sum, P1 then shifted left 7 and P2 added, then shifted
    /// 8 and P3 added: the same L as tile512, with MC independent chains and registers to spare.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn rows512<S: Scale, const MC: usize, const OFF: bool>(w: &Q4Grouped<S>, x: &Terms, m0: usize, y: *mut f32, g: usize) {
        let nb = w.k / BLOCK;
        let nibble = _mm512_set1_epi8(15);
        let offsets = w.offsets.map_or(core::ptr::null(), <[S]>::as_ptr);
        let mut acc = [_mm512_setzero_ps(); MC];
        for b in 0..nb {
            let first = w.codes.as_ptr().add((g * nb + b) * LINES * 64);
            let nibbles: [(__m512i, __m512i); LINES] = core::array::from_fn(|c| {
                let v = _mm512_loadu_si512(first.add(c * 64).cast());
                (_mm512_and_si512(v, nibble), _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble))
            });
            let mut dot = [_mm512_setzero_si512(); MC];
            for k in 0..3 {
                for d in dot.iter_mut() {
                    *d = match k {
                        0 => *d,
                        1 => _mm512_slli_epi32::<7>(*d),
                        _ => _mm512_slli_epi32::<8>(*d),
                    };
                }
                for (c, (lo, hi)) in nibbles.into_iter().enumerate() {
                    for (mi, d) in dot.iter_mut().enumerate() {
                        let xi = (m0 + mi) * nb + b;
                        *d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(*d, lo, term4(x, xi, k, 4 * c)), hi, term4(x, xi, k, 16 + 4 * c));
                    }
                }
            }
            let i = (g * nb + b) * ROWS;
            let (s, o) = (load16(w.scales.as_ptr().add(i)), if OFF { load16(offsets.add(i)) } else { _mm512_setzero_ps() });
            for (mi, (a, l)) in acc.iter_mut().zip(dot).enumerate() {
                *a = finish::<OFF>(x, (m0 + mi) * nb + b, l, s, o, *a);
            }
        }
        for (mi, v) in acc.into_iter().enumerate() {
            _mm512_storeu_ps(y.add((m0 + mi) * w.n + g * ROWS), v);
        }
    }

    /// AVX2: each half-line (eight rows) through `vpmaddubsw` (pairs of nibble x byte, at most 2 * 15 * 127, no
    /// saturation) and `vpmaddwd` by ones, one row of x at a time; the same integer sums and fp32 steps as tile512.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn avx2<S: Scale>(w: &Q4Grouped<S>, x: &Terms, y: *mut f32, groups: Range<usize>) {
        let nb = w.k / BLOCK;
        let (nibble, ones) = (_mm256_set1_epi8(15), _mm256_set1_epi16(1));
        let codes = w.codes.as_ptr();
        let load8 = |p: *const S| if S::HALF { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) } else { _mm256_loadu_ps(p.cast()) };
        for m in 0..x.rows() {
            for g in groups.clone() {
                let mut acc = [_mm256_setzero_ps(); 2];
                for b in 0..nb {
                    let mut dot = [[_mm256_setzero_si256(); 3]; 2];
                    let t = x.terms.as_ptr().add((m * nb + b) * TERM_BYTES);
                    for c in 0..LINES {
                        for (h, dot) in dot.iter_mut().enumerate() {
                            let v = _mm256_loadu_si256(codes.add(((g * nb + b) * LINES + c) * 64 + 32 * h).cast());
                            let lo = _mm256_and_si256(v, nibble);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
                            for (k, d) in dot.iter_mut().enumerate() {
                                let xl = _mm256_set1_epi32(t.add(k * BLOCK + 4 * c).cast::<i32>().read_unaligned());
                                let xh = _mm256_set1_epi32(t.add(k * BLOCK + 16 + 4 * c).cast::<i32>().read_unaligned());
                                let pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
                                *d = _mm256_add_epi32(*d, _mm256_madd_epi16(pairs, ones));
                            }
                        }
                    }
                    let xi = m * nb + b;
                    let i = (g * nb + b) * ROWS;
                    for (h, [p1, p2, p3]) in dot.into_iter().enumerate() {
                        let l = _mm256_add_epi32(_mm256_slli_epi32::<8>(_mm256_add_epi32(_mm256_slli_epi32::<7>(p1), p2)), p3);
                        let l = _mm256_sub_epi32(l, _mm256_set1_epi32(x.shift[xi]));
                        let v = _mm256_mul_ps(_mm256_cvtepi32_ps(l), _mm256_set1_ps(x.unit[xi]));
                        acc[h] = _mm256_fmadd_ps(load8(w.scales.as_ptr().add(i + 8 * h)), v, acc[h]);
                        if let Some(o) = w.offsets {
                            acc[h] = _mm256_fmadd_ps(load8(o.as_ptr().add(i + 8 * h)), _mm256_set1_ps(x.sum[xi]), acc[h]);
                        }
                    }
                }
                for (h, v) in acc.into_iter().enumerate() {
                    _mm256_storeu_ps(y.add(m * w.n + g * ROWS + 8 * h), v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Lcg;
    use super::*;
    use half::f16;

    /// Rows of x with the shapes activations take: mostly small values, a few large ones per block, zeros,
    /// a block of all zeros and values at exact halves of the term steps.
    fn activations(m: usize, k: usize, seed: u64) -> Vec<f32> {
        let mut rng = Lcg(seed);
        let mut x: Vec<f32> = (0..m * k).map(|i| if i % 97 == 5 { 40.0 * rng.float() } else if i % 13 == 0 { 0.0 } else { rng.float() * 0.3 }).collect();
        if x.len() >= 3 * BLOCK {
            x[BLOCK..2 * BLOCK].fill(0.0);
            x[2 * BLOCK..2 * BLOCK + 4].copy_from_slice(&[127.0, 0.5, 1.0 / 256.0, -1.0 / 65536.0]);
        }
        x
    }

    fn grouped(n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>, Vec<f32>) {
        let mut rng = Lcg(seed);
        let blocks = n * k / BLOCK;
        ((0..blocks * 16).map(|_| rng.next() as u8).collect(), (0..blocks).map(|_| rng.float() * 0.05).collect(), (0..blocks).map(|_| rng.float() * 0.2).collect())
    }

    #[test]
    fn terms_are_within_one_step_of_x() {
        let (m, k) = (3, 576);
        let x = activations(m, k, 5);
        let t = Terms::new(&x, k, 8);
        for mi in 0..m {
            for b in 0..k / BLOCK {
                let xb = &x[mi * k + b * BLOCK..][..BLOCK];
                let step = f64::from(xb.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0 / 32768.0;
                for j in 0..BLOCK {
                    let err = (t.value(mi, b * BLOCK + j) - f64::from(xb[j])).abs();
                    assert!(err <= step * 1.0001, "row {mi} block {b} element {j}: {err:e} > {step:e}");
                }
            }
        }
        // The portable split gives the same terms as the vector ones.
        let mut scalar = Terms { k, terms: vec![0; t.terms.len()], unit: vec![0.0; t.unit.len()], sum: vec![0.0; t.unit.len()], shift: vec![0; t.unit.len()] };
        for b in 0..m * k / BLOCK {
            split_block(&x[b * BLOCK..][..BLOCK], &mut scalar, b, 8);
        }
        assert_eq!(scalar.terms, t.terms);
        assert_eq!(scalar.unit.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), t.unit.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(scalar.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), t.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(scalar.shift, t.shift);
        #[cfg(target_arch = "x86_64")]
        if x86::has_avx2() {
            let mut v = Terms { k, terms: vec![0; t.terms.len()], unit: vec![0.0; t.unit.len()], sum: vec![0.0; t.unit.len()], shift: vec![0; t.unit.len()] };
            // SAFETY: AVX2 was just detected; `v` holds every block of x.
            unsafe { x86::split256(&x, &mut v, 8) };
            assert_eq!(v.terms, scalar.terms);
            assert_eq!(v.unit.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), scalar.unit.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(v.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), scalar.sum.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            assert_eq!(v.shift, scalar.shift);
        }
    }

    #[test]
    fn every_isa_gives_the_same_bits_within_the_bound() {
        for &(n, k, m) in &[(16, 32, 1), (32, 576, 1), (48, 576, 1), (64, 1536, 1), (16, 64, 3), (48, 576, 5), (32, 96, 8), (64, 576, 9)] {
            let (codes, scales, offsets) = grouped(n, k, (n * k + m) as u64);
            let x = activations(m, k, 11 + m as u64);
            for (zp, with_offsets) in [(8u8, false), (0, true), (3, true)] {
                let w = Q4Grouped::new(n, k, &codes, &scales, with_offsets.then_some(&offsets[..]), zp).unwrap();
                let t = Terms::new(&x, k, zp);
                let mut first: Option<Vec<u32>> = None;
                for isa in Isa::available() {
                    let mut y = vec![f32::NAN; m * n];
                    matmul(&w, &t, &mut y, isa);
                    for mi in 0..m {
                        for ni in 0..n {
                            // The definition in f64, and what x's representation and fp32 rounding may move it by.
                            let (mut want, mut mag, mut rep) = (0f64, 0f64, 0f64);
                            for b in 0..k / BLOCK {
                                let xb = &x[mi * k + b * BLOCK..][..BLOCK];
                                let step = f64::from(xb.iter().fold(0f32, |a, v| a.max(v.abs()))) / 127.0 / 32768.0;
                                for j in 0..BLOCK {
                                    let wv = f64::from(w.weight(ni, b * BLOCK + j));
                                    want += wv * f64::from(xb[j]);
                                    mag += (wv * f64::from(xb[j])).abs();
                                    rep += wv.abs() * step;
                                }
                            }
                            let got = f64::from(y[mi * n + ni]);
                            assert!((got - want).abs() <= 1.0001 * rep + 1e-6 * mag + 1e-12, "{isa:?} n={n} k={k} m={m} zp={zp} [{mi},{ni}]: {got} vs {want}");
                        }
                    }
                    let bits: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
                    match &first {
                        None => first = Some(bits),
                        Some(f) => assert_eq!(f, &bits, "{isa:?} differs from the portable result"),
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_is_the_same_whatever_the_batch() {
        let (n, k) = (64, 576);
        let (codes, scales, offsets) = grouped(n, k, 3);
        let w = Q4Grouped::new(n, k, &codes, &scales, Some(&offsets), 0).unwrap();
        let x = activations(7, k, 9);
        let mut batch = vec![0f32; 7 * n];
        matmul(&w, &Terms::new(&x, k, 0), &mut batch, Isa::detect());
        for mi in 0..7 {
            let mut one = vec![0f32; n];
            matmul(&w, &Terms::new(&x[mi * k..][..k], k, 0), &mut one, Isa::detect());
            assert_eq!(one, batch[mi * n..][..n], "row {mi}");
        }
    }

    #[test]
    fn half_scales_compute_what_their_fp32_values_do() {
        let (n, k, m) = (32, 576, 2);
        let (codes, scales, offsets) = grouped(n, k, 17);
        let halves = |v: &[f32]| v.iter().map(|&s| f16::from_f32(s)).collect::<Vec<_>>();
        let (s16, o16) = (halves(&scales), halves(&offsets));
        let (s32, o32): (Vec<f32>, Vec<f32>) = (s16.iter().map(|v| v.to_f32()).collect(), o16.iter().map(|v| v.to_f32()).collect());
        let t = Terms::new(&activations(m, k, 2), k, 0);
        for isa in Isa::available() {
            let (mut a, mut b) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(&Q4Grouped::new(n, k, &codes, &s16, Some(&o16), 0).unwrap(), &t, &mut a, isa);
            matmul(&Q4Grouped::new(n, k, &codes, &s32, Some(&o32), 0).unwrap(), &t, &mut b, isa);
            assert_eq!(a, b, "{isa:?}");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let (codes, scales, offsets) = grouped(32, 64, 1);
        assert!(Q4Grouped::new(32, 64, &codes, &scales, None, 8).is_ok());
        assert!(Q4Grouped::new(24, 64, &codes[..24 * 32], &scales[..48], None, 8).is_err());
        assert!(Q4Grouped::new(32, 48, &codes, &scales, None, 8).is_err());
        assert!(Q4Grouped::new(32, 64, &codes[1..], &scales, None, 8).is_err());
        assert!(Q4Grouped::new(32, 64, &codes, &scales, Some(&offsets[1..]), 8).is_err());
        assert!(Q4Grouped::new(32, 64, &codes, &scales, None, 16).is_err());
    }
}
