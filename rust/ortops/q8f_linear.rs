//! `cheapest.Q8Linear`: y[.., N] = x[.., K] · Wᵀ with W 8-bit block-quantized (kernels::q8f layout: signed
//! codes, a scale and optionally an additive term per block) and fp32 x.
//!
//! Inputs:  X float [.., K], codes int8 [N, K] (any shape of that size), scales float [N, K/block], offsets
//!          float [N, K/block] (optional); the last three must be constant initializers, read in place.
//! Attributes: K, N (int), block (int, 16 or 32, default 32), row_group (int, default 1: blocks of that many
//!          rows interleaved).
//! Output:  Y float [.., N].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{attribute, block_weights, constant, detect, op, row_io, split_columns, Api, Kernel, FLOAT, INT8};
use crate::kernels::q8f::{matmul_cols, Isa, Q8FWeights, Q8Format};

pub(super) static OP: OrtCustomOp = op::<Q8Linear>();

struct Q8Linear {
    api: Api,
    weights: Q8FWeights<'static>,
    isa: Isa,
}

impl Kernel for Q8Linear {
    const NAME: &'static CStr = c"Q8Linear";
    const INPUTS: &'static [T] = &[FLOAT, INT8, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let (k, n, codes, scales) = block_weights(api, info, "Q8Linear")?;
        let (Ok(block), Ok(group)) = (
            usize::try_from(attribute(api, info, c"block", Some(32))?),
            usize::try_from(attribute(api, info, c"row_group", Some(1))?),
        ) else {
            return Err(api.error("Q8Linear: block and row_group must be positive"));
        };
        let offsets = constant::<f32>(api, info, 3, "Q8Linear")?;
        let weights = Q8FWeights::new(n, k, block, codes, scales, Q8Format { offsets, group })
            .map_err(|e| api.error(&format!("Q8Linear (K={k}, N={n}, block={block}): {e}")))?;
        Ok(Q8Linear { api, weights, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = (self.weights.k(), self.weights.n());
        let (x, m, y) = row_io(self.api, context, k, n, "Q8Linear")?;
        if m == 0 {
            return Ok(());
        }
        let (weights, isa) = (&self.weights, self.isa);
        // SAFETY: each task writes its own columns of y; x and y have the sizes row_io checked.
        split_columns(self.api, context, x, m, n, y, move |x, y, cols| unsafe { matmul_cols(weights, x, m, y, cols, isa) })
    }
}
