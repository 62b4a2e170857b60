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
use super::{attribute, block_weights, constant, detect, half_scales, op, row_io, split_columns, Api, Element, Kernel, ANY, FLOAT, UINT8};
use crate::kernels::q4::{matmul_cols, silu_mul, Isa, Q4Format, Q4Weights, Scale};

pub(super) static OP: OrtCustomOp = op::<Q4Linear>();

/// The weights with their scales as stored.
enum Weights {
    F32(Q4Weights<'static, f32>),
    F16(Q4Weights<'static, f16>),
}

struct Q4Linear {
    api: Api,
    weights: Weights,
    swiglu: bool,
    isa: Isa,
}

unsafe fn weights<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, zero_point: u8, group: usize) -> Result<Q4Weights<'static, S>, OrtStatusPtr> {
    let (k, n, codes, scales) = block_weights::<S>(api, info, "Q4Linear")?;
    let offsets = constant::<S>(api, info, 3, "Q4Linear")?;
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
        let weights = if half_scales(api, info, "Q4Linear")? {
            Weights::F16(weights(api, info, zero_point, group)?)
        } else {
            Weights::F32(weights(api, info, zero_point, group)?)
        };
        Ok(Q4Linear { api, weights, swiglu, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        match &self.weights {
            Weights::F32(w) => self.run(w, context),
            Weights::F16(w) => self.run(w, context),
        }
    }
}

impl Q4Linear {
    unsafe fn run<S: Scale>(&self, weights: &Q4Weights<'static, S>, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = (weights.k(), weights.n());
        let width = if self.swiglu { 2 * k } else { k };
        let (x, m, y) = row_io(self.api, context, width, n, "Q4Linear")?;
        if m == 0 {
            return Ok(());
        }
        let activated: Vec<f32>;
        let x = if self.swiglu {
            let mut out = vec![0.0f32; m * k];
            silu_mul(core::slice::from_raw_parts(x, m * width), k, &mut out);
            activated = out;
            activated.as_ptr()
        } else {
            x
        };
        let isa = self.isa;
        // SAFETY: each task writes its own columns of y; x and y have the sizes row_io checked.
        split_columns(self.api, context, x, m, n, y, move |x, y, cols| unsafe { matmul_cols(weights, x, m, y, cols, isa) })
    }
}
