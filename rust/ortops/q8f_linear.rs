//! `cheapest.Q8Linear`: y[.., N] = x[.., K] · Wᵀ with W 8-bit block-quantized (kernels::q8f layout: signed
//! codes, a scale and optionally an additive term per block) and fp32 x.
//!
//! Inputs:  X float [.., K], codes int8 [N, K] (any shape of that size), scales [N, K/block] and offsets
//!          [N, K/block] (optional), both float or both float16 (kernels::Scale); the last three must be
//!          constant initializers, read in place.
//! Attributes: K, N (int), block (int, 16 or 32, default 32), row_group (int, default 1: blocks of that many
//!          rows interleaved).
//!          With `epsilon` (float): skip (input 4) and gamma (input 5), a SkipSimplifiedLayerNormalization folded
//!          in before the product, as in Q4Linear (rust/ortops/q4_linear.rs); output 1 (optional) the residual sum.
//! Output:  Y float [.., N]; with `epsilon`, optionally the residual sum float [.., K].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use half::f16;
use super::{attribute, block_weights, detect, BlockInputs, op, run_linear, Api, ByScale, Element, Activate, Kernel, SkipNorm, ANY, FLOAT, INT8};
use crate::kernels::q8f::{matmul_cols, Isa, Q8FWeights, Q8Format, Scale};

pub(super) static OP: OrtCustomOp = op::<Q8Linear>();

struct Q8Linear {
    api: Api,
    weights: ByScale<Q8FWeights<'static, f32>, Q8FWeights<'static, f16>>,
    /// Set: a SkipSimplifiedLayerNormalization with this epsilon is folded in.
    epsilon: Option<f32>,
    isa: Isa,
}

unsafe fn weights<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, block: usize, group: usize) -> Result<Q8FWeights<'static, S>, OrtStatusPtr> {
    let BlockInputs { k, n, codes, scales, offsets } = block_weights::<S>(api, info, "Q8Linear")?;
    Q8FWeights::new(n, k, block, codes, scales, Q8Format { offsets, group })
        .map_err(|e| api.error(&format!("Q8Linear (K={k}, N={n}, block={block}): {e}")))
}

impl Kernel for Q8Linear {
    const NAME: &'static CStr = c"Q8Linear";
    const INPUTS: &'static [T] = &[FLOAT, INT8, ANY, ANY, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 3;
    const OUTPUTS: usize = 2;
    const REQUIRED_OUTPUTS: usize = 1;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let (Ok(block), Ok(group)) = (
            usize::try_from(attribute(api, info, c"block", Some(32))?),
            usize::try_from(attribute(api, info, c"row_group", Some(1))?),
        ) else {
            return Err(api.error("Q8Linear: block and row_group must be positive"));
        };
        let weights = ByScale::load(api, info, "Q8Linear", || weights(api, info, block, group), || weights(api, info, block, group))?;
        Ok(Q8Linear { api, weights, epsilon: SkipNorm::epsilon(api, info), isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (api, isa) = (self.api, self.isa);
        by_scale!(&self.weights, |w| {
            let (k, n) = (w.k(), w.n());
            let norm = SkipNorm::of_call(api, context, "Q8Linear", k, self.epsilon)?;
            let fold = norm.as_ref().map(SkipNorm::activation);
            let activate = fold.as_ref().map(|f| f as Activate);
            run_linear(api, context, "Q8Linear", (k, k, n), activate, move |x, m, y, cols| unsafe { matmul_cols(w, x, m, y, cols, isa) })
        })
    }
}
