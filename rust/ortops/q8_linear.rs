//! `cheapest.Q8LinearInt8`: y[.., N] ≈ x[.., K] · Wᵀ with W 8-bit block-quantized (MatMulNBits' layout, zero
//! point 128) and x rounded to int8 per block of 32 (kernels::q8): what MatMulNBits computes at
//! accuracy_level 4, for an LM head's scoring pass over the whole vocabulary.
//!
//! Inputs:  X float [.., K], codes uint8 [N, K/32, 32], scales float [N, K/32] (constant initializers, read
//!          in place: a tied embedding shares its codes with the gather that reads them).
//! Attributes: K, N (int).
//! Output:  Y float [.., N].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{block_weights, BlockInputs, column_chunks, FLOAT, UINT8, detect, op, parallel, row_io, Api, Kernel, SharedOut};
use crate::kernels::q4::Isa;
use crate::kernels::q8::{matmul_cols, QuantizedRow, Q8Weights};

pub(super) static OP: OrtCustomOp = op::<Q8LinearInt8>();

/// Parallel tasks per call, at most: the vocabulary is wide, so a few dozen chunks balance two cores.
const MAX_TASKS: usize = 32;

struct Q8LinearInt8 {
    api: Api,
    weights: Q8Weights<'static>,
    isa: Isa,
}

impl Kernel for Q8LinearInt8 {
    const NAME: &'static CStr = c"Q8LinearInt8";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let BlockInputs { k, n, codes, scales, .. } = block_weights::<f32>(api, info, "Q8LinearInt8")?;
        let weights = Q8Weights::new(n, k, codes, scales)
            .map_err(|e| api.error(&format!("Q8LinearInt8 (K={k}, N={n}): {e}")))?;
        Ok(Q8LinearInt8 { api, weights, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = (self.weights.k(), self.weights.n());
        let (x, m, y) = row_io(self.api, context, k, n, "Q8LinearInt8")?;
        if m == 0 {
            return Ok(());
        }
        let rows: Vec<QuantizedRow> = core::slice::from_raw_parts(x, m * k).chunks_exact(k).map(QuantizedRow::new).collect();
        let (chunk, tasks) = column_chunks(n, 64, MAX_TASKS);
        let (rows, y, weights, isa) = (&rows, SharedOut(y), &self.weights, self.isa);
        parallel(self.api, context, tasks, move |task| {
            let cols = task * chunk..((task + 1) * chunk).min(n);
            // SAFETY: each task writes its own columns of y, which row_io sized [M, N].
            unsafe { matmul_cols(weights, rows, y.ptr(), cols, isa) }
        })
    }
}
