//! Numeric kernels the model graph calls through ONNX Runtime custom operators (`ortops`).
//!
//! Plain Rust with runtime CPU-feature dispatch (AVX-512, AVX2+FMA, portable), unit-tested
//! against straightforward scalar arithmetic without ONNX Runtime.

pub mod q4;
pub mod q8;

/// A borrowed block-quantized weight matrix W [N, K]: codes, one scale per block of 32 weights along K, and
/// what the format adds (`format`). Each kernel module says how its codes are laid out.
#[derive(Clone, Copy, Debug)]
pub struct BlockMatrix<'a, F> {
    n: usize,
    k: usize,
    codes: &'a [u8],
    scales: &'a [f32],
    format: F,
}

impl<'a, F> BlockMatrix<'a, F> {
    /// Checks the sizes: K a positive multiple of 32, N positive, `code_bytes` per block, one scale per block.
    fn checked(n: usize, k: usize, codes: &'a [u8], scales: &'a [f32], code_bytes: usize, format: F) -> Result<Self, &'static str> {
        if n == 0 || k == 0 || k % BLOCK != 0 {
            return Err("K must be a positive multiple of 32 and N positive");
        }
        let blocks = n * (k / BLOCK);
        if codes.len() != blocks * code_bytes || scales.len() != blocks {
            return Err("codes must hold N * K/32 blocks and scales one value per block");
        }
        Ok(Self { n, k, codes, scales, format })
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
