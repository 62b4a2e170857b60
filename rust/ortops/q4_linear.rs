//! `cheapest.Q4Linear`: y[.., N] = x[.., K] · Wᵀ with W 4-bit block-quantized (kernels::q4 layout).
//!
//! Inputs:  X float [.., K] (or [.., 2K] with swiglu=1: X = gate | up, the product uses silu(gate) * up),
//!          codes uint8 [N, K/2] (any shape of that size), scales [N, K/32] and offsets [N, K/32] (optional),
//!          both float or both float16 (kernels::Scale); the last three must be constant initializers: the
//!          kernel reads them in place, so the session holds one copy of the weights (ONNX Runtime's own
//!          MatMulNBits keeps a prepacked second).
//! Attributes: K, N (int), zero_point (int, default 8), swiglu (int, default 0), row_group (int, default 1:
//!          blocks of that many rows interleaved, see kernels::q4).
//! Output:  Y float [.., N].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use half::f16;
use super::{attribute, block_weights, detect, BlockInputs, op, run_linear, Api, ByScale, Element, Kernel, ANY, FLOAT, UINT8};
use crate::kernels::q4::{matmul_cols, silu_mul, Isa, Q4Format, Q4Weights, Scale};

pub(super) static OP: OrtCustomOp = op::<Q4Linear>();

struct Q4Linear {
    api: Api,
    weights: ByScale<Q4Weights<'static, f32>, Q4Weights<'static, f16>>,
    swiglu: bool,
    isa: Isa,
}

unsafe fn weights<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, zero_point: u8, group: usize) -> Result<Q4Weights<'static, S>, OrtStatusPtr> {
    let BlockInputs { k, n, codes, scales, offsets } = block_weights::<S>(api, info, "Q4Linear")?;
    Q4Weights::new(n, k, codes, scales, Q4Format { offsets, zero_point, group })
        .map_err(|e| api.error(&format!("Q4Linear (K={k}, N={n}): {e}")))
}

impl Kernel for Q4Linear {
    const NAME: &'static CStr = c"Q4Linear";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, ANY, ANY];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let zero_point = attribute(api, info, c"zero_point", Some(8))?;
        let swiglu = attribute(api, info, c"swiglu", Some(0))? != 0;
        let (Ok(zero_point), Ok(group)) = (u8::try_from(zero_point), usize::try_from(attribute(api, info, c"row_group", Some(1))?))
        else {
            return Err(api.error("Q4Linear: zero_point must be 0..15 and row_group positive"));
        };
        let weights = ByScale::load(api, info, "Q4Linear", || weights(api, info, zero_point, group), || weights(api, info, zero_point, group))?;
        Ok(Q4Linear { api, weights, swiglu, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (api, isa, swiglu) = (self.api, self.isa, self.swiglu);
        by_scale!(&self.weights, |w| {
            let (k, n) = (w.k(), w.n());
            let (width, activate) = if swiglu { (2 * k, Some(silu_mul as fn(&[f32], usize, &mut [f32]))) } else { (k, None) };
            run_linear(api, context, "Q4Linear", (width, k, n), activate, move |x, m, y, cols| unsafe { matmul_cols(w, x, m, y, cols, isa) })
        })
    }
}
