//! `cheapest.Q8Linear`: y[.., N] = x[.., K] · Wᵀ with W 8-bit block-quantized (kernels::q8f layout: signed
//! codes, a scale and optionally an additive term per block) and fp32 x.
//!
//! Inputs:  X float [.., K], codes int8 [N, K] (any shape of that size), scales [N, K/block] and offsets
//!          [N, K/block] (optional), both float or both float16 (kernels::Scale); the last three must be
//!          constant initializers, read in place.
//! Attributes: K, N (int), block (int, 16 or 32, default 32), row_group (int, default 1: blocks of that many
//!          rows interleaved).
//! Output:  Y float [.., N].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use half::f16;
use super::{attribute, block_weights, constant, detect, half_scales, op, row_io, split_columns, Api, Element, Kernel, ANY, FLOAT, INT8};
use crate::kernels::q8f::{matmul_cols, Isa, Q8FWeights, Q8Format, Scale};

pub(super) static OP: OrtCustomOp = op::<Q8Linear>();

/// The weights with their scales as stored.
enum Weights {
    F32(Q8FWeights<'static, f32>),
    F16(Q8FWeights<'static, f16>),
}

struct Q8Linear {
    api: Api,
    weights: Weights,
    isa: Isa,
}

unsafe fn weights<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, block: usize, group: usize) -> Result<Q8FWeights<'static, S>, OrtStatusPtr> {
    let (k, n, codes, scales) = block_weights::<S>(api, info, "Q8Linear")?;
    let offsets = constant::<S>(api, info, 3, "Q8Linear")?;
    Q8FWeights::new(n, k, block, codes, scales, Q8Format { offsets, group })
        .map_err(|e| api.error(&format!("Q8Linear (K={k}, N={n}, block={block}): {e}")))
}

impl Kernel for Q8Linear {
    const NAME: &'static CStr = c"Q8Linear";
    const INPUTS: &'static [T] = &[FLOAT, INT8, ANY, ANY];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let (Ok(block), Ok(group)) = (
            usize::try_from(attribute(api, info, c"block", Some(32))?),
            usize::try_from(attribute(api, info, c"row_group", Some(1))?),
        ) else {
            return Err(api.error("Q8Linear: block and row_group must be positive"));
        };
        let weights = if half_scales(api, info, "Q8Linear")? {
            Weights::F16(weights(api, info, block, group)?)
        } else {
            Weights::F32(weights(api, info, block, group)?)
        };
        Ok(Q8Linear { api, weights, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        match &self.weights {
            Weights::F32(w) => self.run(w, context),
            Weights::F16(w) => self.run(w, context),
        }
    }
}

impl Q8Linear {
    unsafe fn run<S: Scale>(&self, weights: &Q8FWeights<'static, S>, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = (weights.k(), weights.n());
        let (x, m, y) = row_io(self.api, context, k, n, "Q8Linear")?;
        if m == 0 {
            return Ok(());
        }
        let isa = self.isa;
        // SAFETY: each task writes its own columns of y; x and y have the sizes row_io checked.
        split_columns(self.api, context, x, m, n, y, move |x, y, cols| unsafe { matmul_cols(weights, x, m, y, cols, isa) })
    }
}
