//! Numeric kernels the model graph calls through ONNX Runtime custom operators (`ortops`).
//!
//! Plain Rust with runtime CPU-feature dispatch (AVX-512, AVX2+FMA, portable), unit-tested
//! against straightforward scalar arithmetic without ONNX Runtime.

#[cfg(target_arch = "x86_64")]
/// The x86 kernels' loop over output columns: in panels of PANEL weight rows; within a panel, the x rows in chunks of at most MC, and for
/// each chunk the panel's rows in groups of R (a single-row tile for the last N % R columns). A panel's
/// weights and a chunk of x both stay in cache while they meet (a 500-token prefill re-read all of x from
/// L2 for every pair of weight rows without the panels).
macro_rules! drive {
    ($w:expr, $x:expr, $m:expr, $y:expr, $cols:expr, $tile:ident, $r:literal, [$($mc:literal),+]) => {{
        let (w, x, m, y, cols) = ($w, $x, $m, $y, $cols);
        let mut panel = cols.start;
        while panel < cols.end {
            let panel_end = (panel + $crate::kernels::PANEL).min(cols.end);
            let mut mi = 0;
            while mi < m {
                let left = m - mi;
                let xp = x.add(mi * w.k);
                let yp = y.add(mi * w.n);
                let mut n = panel;
                let mut done = 0;
                while n < panel_end {
                    let one = n + $r > panel_end;
                    done = drive!(@pick w, xp, yp, n, one, left, $tile, $r, [$($mc),+]);
                    n += if one { 1 } else { $r };
                }
                mi += done;
            }
            panel = panel_end;
        }
    }};
    (@pick $w:expr, $xp:expr, $yp:expr, $n:expr, $one:expr, $left:expr, $tile:ident, $r:literal, [$($mc:literal),+]) => {{
        let mut done = 0;
        $(
            if done == 0 && $left >= $mc {
                let t = $crate::kernels::Tile { w: $w, x: $xp, y: $yp, n0: $n };
                match ($one, $w.format.offsets.is_some()) {
                    (false, true) => $tile::<S, $r, $mc, true>(t),
                    (false, false) => $tile::<S, $r, $mc, false>(t),
                    (true, true) => $tile::<S, 1, $mc, true>(t),
                    (true, false) => $tile::<S, 1, $mc, false>(t),
                }
                done = $mc;
            }
        )+
        done
    }};
}


/// `matmul` and `matmul_cols` for a fp32-activation kernel module whose weight type is `$w<'a, S>` (S the
/// stored type of its block scales) and whose `portable`, `x86::avx2` and `x86::avx512` compute columns of y.
macro_rules! fp32_linear_entry_points {
    ($w:ident) => {
        /// y[M, N] = x[M, K] · Wᵀ, single-threaded.
        pub fn matmul<S: Scale>(w: &$w<'_, S>, x: &[f32], m: usize, y: &mut [f32], isa: Isa) {
            assert_eq!(x.len(), m * w.k, "x must be [M, K]");
            assert_eq!(y.len(), m * w.n, "y must be [M, N]");
            // SAFETY: the slices have the asserted sizes and all columns 0..N are in range.
            unsafe { matmul_cols(w, x.as_ptr(), m, y.as_mut_ptr(), 0..w.n, isa) }
        }

        /// Columns `cols` of y[M, N] = x[M, K] · Wᵀ: threads split N into disjoint column ranges.
        ///
        /// # Safety
        /// `x` points to M*K readable floats, `y` to M*N writable floats, `cols` lies within 0..N, `isa` is
        /// supported by this CPU, and no other thread writes the same columns of y concurrently.
        pub unsafe fn matmul_cols<S: Scale>(w: &$w<'_, S>, x: *const f32, m: usize, y: *mut f32, cols: Range<usize>, isa: Isa) {
            debug_assert!(cols.end <= w.n);
            match isa {
                Isa::Portable => portable(w, x, m, y, cols),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => x86::avx2(w, x, m, y, cols),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => x86::avx512(w, x, m, y, cols),
            }
        }
    };
}

/// `RowBlocks` for a format struct `$format<'a, S>` with `offsets: Option<&[S]>` and `group` fields.
macro_rules! row_blocks {
    ($format:ident) => {
        impl<S: Scale> super::RowBlocks for $format<'_, S> {
            type Scale = S;

            fn offsets(&self) -> Option<&[S]> {
                self.offsets
            }

            fn group(&self) -> usize {
                self.group
            }
        }
    };
}

/// The x86 entry points of a tiled kernel module over its `tile512` / `tile256` (weight type `$w`).
#[cfg(target_arch = "x86_64")]
macro_rules! x86_drivers {
    ($w:ident) => {
        pub(super) unsafe fn avx512<S: Scale>(w: &$w<'_, S>, x: *const f32, m: usize, y: *mut f32, cols: Range<usize>) {
            if m == 1 {
                drive!(w, x, m, y, cols, tile512, 8, [1]);
            } else {
                // Two weight rows against up to 8 x rows: 16 accumulators + 4 weight registers (12 rows spilled
                // registers: 1.7x slower prefill), so each dequantized block serves 8 sequences or prompt tokens.
                drive!(w, x, m, y, cols, tile512, 2, [8, 4, 2, 1]);
            }
        }

        pub(super) unsafe fn avx2<S: Scale>(w: &$w<'_, S>, x: *const f32, m: usize, y: *mut f32, cols: Range<usize>) {
            drive!(w, x, m, y, cols, tile256, 4, [2, 1]);
        }
    };
}

/// CPU features the kernels choose between, and the vector exponential (SwiGLU, attention) they share.
#[cfg(target_arch = "x86_64")]
mod cpu {
    use core::arch::x86_64::*;

    /// AVX-512 with byte operations and VNNI (`vpdpbusd`).
    pub(super) fn has_vnni() -> bool {
        is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }

    /// AVX2 with FMA and fp16 conversions.
    pub(super) fn has_avx2() -> bool {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }

    /// e^x, eight at a time: Cephes' single-precision polynomial (range reduction by ln 2 in two parts, degree-5
    /// polynomial, 2^n by exponent bits), within 2 ulp; inputs are clamped to [-87.3, 88.4].
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp256(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.336_55)), _mm256_set1_ps(88.376_26));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        let scale = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }

    /// The sums of a tile's MC x R accumulators (R * MC <= 16), (mi, r) at index mi * R + r: `sum16`'s bits,
    /// those of reducing each accumulator on its own.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn tile_sums<const R: usize, const MC: usize>(acc: &[[__m512; R]; MC]) -> [f32; 16] {
        const { assert!(R * MC <= 16) };
        let mut v = [_mm512_setzero_ps(); 16];
        for (mi, row) in acc.iter().enumerate() {
            v[mi * R..(mi + 1) * R].copy_from_slice(row);
        }
        let mut sums = [0f32; 16];
        _mm512_storeu_ps(sums.as_mut_ptr(), sum16(v));
        sums
    }

    /// Lane j = the sum of v[j]'s 16 lanes, for all 16 at once: added in `_mm512_reduce_add_ps`'s order (lane
    /// i + lane i+8, then + i+4, + i+2, + i+1), so each sum has the same bits as reducing that vector alone
    /// (tested), in 46 instructions where sixteen reductions took ~130.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) unsafe fn sum16(v: [__m512; 16]) -> __m512 {
        // Each step adds the halves it pairs up, two vectors at a time, so that every vector's partial sums
        // keep to their own lanes: 16 vectors -> 8 (a 256-bit half each) -> 4 (a 128-bit quarter each) -> 2
        // (two lanes) -> 1.
        let s: [__m512; 8] = core::array::from_fn(|p| {
            let (a, b) = (v[2 * p], v[2 * p + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b01_00_01_00>(a, b), _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b))
        });
        let u: [__m512; 4] = core::array::from_fn(|t| {
            let (a, b) = (s[2 * t], s[2 * t + 1]);
            _mm512_add_ps(_mm512_shuffle_f32x4::<0b10_00_10_00>(a, b), _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b))
        });
        // u[t], quarter k: the four partial sums of v[4t + k].
        let w: [__m512; 2] = core::array::from_fn(|h| {
            let (a, b) = (u[2 * h], u[2 * h + 1]);
            _mm512_add_ps(_mm512_shuffle_ps::<0b01_00_01_00>(a, b), _mm512_shuffle_ps::<0b11_10_11_10>(a, b))
        });
        // w[h], quarter k: two partial sums of v[8h + k], then two of v[8h + 4 + k].
        let z = _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(w[0], w[1]), _mm512_shuffle_ps::<0b11_01_11_01>(w[0], w[1]));
        // z, quarter k: v[k], v[4 + k], v[8 + k], v[12 + k]; lane 4k + j -> lane 4j + k.
        _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), z)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    #[test]
    fn sum16_adds_each_vector_as_reduce_add_does() {
        use core::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for seed in 0..50usize {
            // Magnitudes spread over many binades, so a different association would show in the bits.
            let lanes: Vec<f32> = (0..256usize).map(|i| (((i * 2654435761 + seed * 40503) % 100_003) as f32 / 50_001.5 - 1.0) * 2f32.powi((i * 7 + seed) as i32 % 40 - 20)).collect();
            // SAFETY: AVX-512F was detected; each load reads 16 of the 256 values.
            let (got, want) = unsafe {
                let v: [__m512; 16] = core::array::from_fn(|j| _mm512_loadu_ps(lanes.as_ptr().add(16 * j)));
                let mut got = [0f32; 16];
                _mm512_storeu_ps(got.as_mut_ptr(), super::cpu::sum16(v));
                (got, v.map(|v| _mm512_reduce_add_ps(v)))
            };
            assert_eq!(got.map(f32::to_bits), want.map(f32::to_bits), "seed {seed}");
        }
    }
}

pub mod attention;
pub mod q4;
pub mod q4x;
pub mod q8;
pub mod q8g;
pub mod q8planes;
pub mod q8f;

/// How a block's scale (and additive term) is stored: fp32, or fp16 where every value of a tensor is exactly
/// an fp16 - GGUF's Q4_0 / Q4_1 / Q5_0 / Q8_0 block headers are fp16 themselves, so their scales and minimums
/// lose nothing and a decode step reads 2 bytes less per block and value (SmolLM2's Q4_1 projections: 20 bytes
/// a block instead of 24). The tiled kernels widen a tile's scales to fp32 once (`Widened`); every product stays
/// fp32, bit for bit what the same values stored in fp32 give.
pub trait Scale: Copy + Send + Sync + core::fmt::Debug + 'static {
    /// Stored as IEEE binary16 (else binary32).
    const HALF: bool;
    fn to_f32(self) -> f32;
}

impl Scale for f32 {
    const HALF: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Scale for half::f16 {
    const HALF: bool = true;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

/// fp16 block values a tile can widen at once: K/block * row_group of them (`BlockMatrix::checked_rows` refuses
/// more; the converter keeps such a matrix's scales in fp32, graph_passes.WIDE_VALUES).
pub const WIDE_VALUES: usize = 4096;

/// A tile's scales or offsets as fp32, indexed by block number like the stored ones (`at(block)`).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Widened {
    values: *const f32,
    first: usize,
}

#[cfg(target_arch = "x86_64")]
impl Widened {
    #[inline(always)]
    unsafe fn at(self, block: usize) -> *const f32 {
        self.values.add(block - self.first)
    }

    /// fp32 values are used where they are stored; fp16 ones (`span` of them from block `first`: every block the
    /// tile reads) are widened into `buf` once per tile, eight per conversion, so the tile loop broadcasts each
    /// scale from memory as it does fp32 ones. (Widening per block instead cost ~1 instruction per row and
    /// block: SmolLM2's decode step at one thread went 11.1 -> 12.3 ms, slower than reading fp32.)
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn new<S: Scale>(p: *const S, first: usize, span: usize, buf: &mut core::mem::MaybeUninit<[f32; WIDE_VALUES]>) -> Widened {
        use core::arch::x86_64::*;
        if !S::HALF || p.is_null() {
            return Widened { values: p.cast(), first: 0 };
        }
        debug_assert!(span <= WIDE_VALUES);
        let (src, dst) = (p.add(first).cast::<u16>(), buf.as_mut_ptr().cast::<f32>());
        let mut i = 0;
        while i + 8 <= span {
            _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(_mm_loadu_si128(src.add(i).cast())));
            i += 8;
        }
        while i < span {
            *dst.add(i) = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(*src.add(i)))));
            i += 1;
        }
        Widened { values: dst, first }
    }
}

/// A borrowed block-quantized weight matrix W [N, K]: codes, one scale per block of `block` weights along K
/// (32 unless a format says otherwise) stored as `S`, and what the format adds (`format`). Each kernel module
/// says how its codes are laid out.
#[derive(Clone, Copy, Debug)]
pub struct BlockMatrix<'a, F, S = f32> {
    n: usize,
    k: usize,
    block: usize,
    codes: &'a [u8],
    scales: &'a [S],
    format: F,
}

impl<'a, F, S: Scale> BlockMatrix<'a, F, S> {
    /// Checks the sizes: K a positive multiple of 32, N positive, blocks of `block` weights (a divisor of 32) of
    /// `code_bytes` each, one scale per block.
    fn checked(n: usize, k: usize, block: usize, codes: &'a [u8], scales: &'a [S], code_bytes: usize, format: F) -> Result<Self, &'static str> {
        if n == 0 || k == 0 || k % BLOCK != 0 || block == 0 || BLOCK % block != 0 {
            return Err("K must be a positive multiple of 32, N positive and the block a divisor of 32");
        }
        let blocks = n * (k / block);
        if codes.len() != blocks * code_bytes || scales.len() != blocks {
            return Err("codes must hold N * K/block blocks and scales one value per block");
        }
        Ok(Self { n, k, block, codes, scales, format })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }
}

/// Weights per block along K, for every format here (GGUF's Q4_0, Q4_1 and Q8_0 blocking).
pub const BLOCK: usize = 32;

/// Weight rows per column panel of the x86 tile loops (`drive!`).
#[cfg(target_arch = "x86_64")]
const PANEL: usize = 64;

/// A tile kernel's operands: R weight rows from `n0` times MC rows of x (row stride K) into y (row stride N).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Tile<'w, 'a, F, S> {
    w: &'w BlockMatrix<'a, F, S>,
    x: *const f32,
    y: *mut f32,
    n0: usize,
}

/// What the tiled kernels read of a format: its per-block additive terms and how many rows' blocks interleave.
pub trait RowBlocks {
    /// How the offsets are stored (as the scales are).
    type Scale;
    fn offsets(&self) -> Option<&[Self::Scale]>;
    fn group(&self) -> usize;
}

impl<'a, S: Scale, F: RowBlocks<Scale = S>> BlockMatrix<'a, F, S> {
    /// `checked`, and the format's row group divides N and its offsets (if any) are one per block.
    fn checked_rows(n: usize, k: usize, block: usize, codes: &'a [u8], scales: &'a [S], code_bytes: usize, format: F) -> Result<Self, &'static str> {
        if format.group() == 0 || n % format.group() != 0 {
            return Err("N must be a multiple of the row group");
        }
        if format.offsets().is_some_and(|o| o.len() != scales.len()) {
            return Err("offsets must hold one value per block, as scales do");
        }
        if S::HALF && block > 0 && (k / block) * format.group() > WIDE_VALUES {
            return Err("fp16 scales need K/block * row_group <= 4096 (wider matrices keep fp32 scales)");
        }
        Self::checked(n, k, block, codes, scales, code_bytes, format)
    }

    /// Index of block (n, 0); block (n, b) is at `first_block(n) + b * group` (G rows' blocks interleaved:
    /// `((n / G) * K/block + b) * G + n % G`).
    fn first_block(&self, n: usize) -> usize {
        let g = self.format.group();
        (n - n % g) * (self.k / self.block) + n % g
    }
}

#[cfg(target_arch = "x86_64")]
impl<S: Scale, F: RowBlocks<Scale = S>> Tile<'_, '_, F, S> {
    /// Codes, scales and offsets as fp32 (offsets null without them; fp16 ones widened into `bufs`) and the
    /// first block of each of the R rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn arrays<const R: usize>(&self, bufs: &mut [core::mem::MaybeUninit<[f32; WIDE_VALUES]>; 2]) -> (*const u8, Widened, Widened, [usize; R]) {
        let w = self.w;
        let base: [usize; R] = core::array::from_fn(|r| w.first_block(self.n0 + r));
        // Every block the tile reads lies between its first row's first block and its last row's last one.
        let span = (w.k / w.block - 1) * w.format.group() + base[R - 1] - base[0] + 1;
        let offsets = w.format.offsets().map_or(core::ptr::null(), <[S]>::as_ptr);
        let [sbuf, obuf] = bufs;
        let scales = Widened::new(w.scales.as_ptr(), base[0], span, sbuf);
        (w.codes.as_ptr(), scales, Widened::new(offsets, base[0], span, obuf), base)
    }
}

/// Checks the fp32-activation kernels' tests share.
#[cfg(test)]
mod testing {
    use super::q4::Isa;
    use core::ops::Range;

    /// A small deterministic generator, so the tests need no extra crate.
    pub(super) struct Lcg(pub(super) u64);

    impl Lcg {
        pub(super) fn next(&mut self) -> u32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) as u32
        }

        /// Uniform in [-1, 1).
        pub(super) fn float(&mut self) -> f32 {
            self.next() as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        }
    }

    /// `product(isa, y)` on every instruction set this CPU has, against `want` within a few fp32 ulps of the
    /// magnitude sum `mag` (fp32 summation of K products in another order).
    pub(super) fn assert_every_isa(want: &[f64], mag: &[f64], case: &str, product: impl Fn(Isa, &mut [f32])) {
        for isa in Isa::available() {
            let mut y = vec![f32::NAN; want.len()];
            product(isa, &mut y);
            for (i, (got, want)) in y.iter().zip(want).enumerate() {
                let err = (f64::from(*got) - want).abs();
                assert!(err <= 1e-6 * mag[i] + 1e-12, "{isa:?} {case} i={i}: {got} vs {want}");
            }
        }
    }

    /// `half(isa, y)` and `full(isa, y)` give the same bits on every instruction set (fp16 scales against their
    /// exact fp32 values: widening is exact, so nothing downstream may differ).
    pub(super) fn assert_same_every_isa(len: usize, half: impl Fn(Isa, &mut [f32]), full: impl Fn(Isa, &mut [f32])) {
        for isa in Isa::available() {
            let (mut a, mut b) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            half(isa, &mut a);
            full(isa, &mut b);
            assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{isa:?}");
        }
    }

    /// Columns computed in three ranges (`cols(range, y)`, N = 24) equal the whole product (`whole`).
    pub(super) fn assert_columns_compose(whole: &[f32], cols: impl Fn(Range<usize>, *mut f32)) {
        let mut parts = vec![0.0; whole.len()];
        for range in [0..5, 5..16, 16..24] {
            cols(range, parts.as_mut_ptr());
        }
        assert_eq!(whole, parts);
    }
}
