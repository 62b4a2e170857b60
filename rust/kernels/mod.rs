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
                    (false, true) => $tile::<$r, $mc, true>(t),
                    (false, false) => $tile::<$r, $mc, false>(t),
                    (true, true) => $tile::<1, $mc, true>(t),
                    (true, false) => $tile::<1, $mc, false>(t),
                }
                done = $mc;
            }
        )+
        done
    }};
}


pub mod q4;
pub mod q8;
pub mod q8f;

/// A borrowed block-quantized weight matrix W [N, K]: codes, one scale per block of `block` weights along K
/// (32 unless a format says otherwise), and what the format adds (`format`). Each kernel module says how its
/// codes are laid out.
#[derive(Clone, Copy, Debug)]
pub struct BlockMatrix<'a, F> {
    n: usize,
    k: usize,
    block: usize,
    codes: &'a [u8],
    scales: &'a [f32],
    format: F,
}

impl<'a, F> BlockMatrix<'a, F> {
    /// Checks the sizes: K a positive multiple of 32, N positive, `code_bytes` per block, one scale per block.
    fn checked(n: usize, k: usize, codes: &'a [u8], scales: &'a [f32], code_bytes: usize, format: F) -> Result<Self, &'static str> {
        Self::checked_blocks(n, k, BLOCK, codes, scales, code_bytes, format)
    }

    /// `checked` for blocks of `block` weights (K a positive multiple of 32 all the same).
    fn checked_blocks(
        n: usize,
        k: usize,
        block: usize,
        codes: &'a [u8],
        scales: &'a [f32],
        code_bytes: usize,
        format: F,
    ) -> Result<Self, &'static str> {
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
struct Tile<'w, 'a, F> {
    w: &'w BlockMatrix<'a, F>,
    x: *const f32,
    y: *mut f32,
    n0: usize,
}
