//! `cheapest.Q4Linear`: y[.., N] = x[.., K] · Wᵀ with W 4-bit block-quantized (kernels::q4 layout).
//!
//! Inputs:  X float [.., K] (or [.., 2K] with swiglu=1: X = gate | up, the product uses silu(gate) * up),
//!          codes uint8 [N, K/2] (any shape of that size), scales float [N, K/32], offsets float [N, K/32]
//!          (optional); the last three must be constant initializers: the kernel reads them in place, so the
//!          session holds one copy of the weights (ONNX Runtime's own MatMulNBits keeps a prepacked second).
//! Attributes: K, N (int), zero_point (int, default 8), swiglu (int, default 0), row_group (int, default 1:
//!          blocks of that many rows interleaved, see kernels::q4).
//! Output:  Y float [.., N].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{attribute, block_weights, constant, detect, op, row_io, split_columns, Api, Kernel, FLOAT, UINT8};
use crate::kernels::q4::{matmul_cols, silu_mul, Isa, Q4Format, Q4Weights};

pub(super) static OP: OrtCustomOp = op::<Q4Linear>();

struct Q4Linear {
    api: Api,
    weights: Q4Weights<'static>,
    swiglu: bool,
    isa: Isa,
}

impl Kernel for Q4Linear {
    const NAME: &'static CStr = c"Q4Linear";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let (k, n, codes, scales) = block_weights(api, info, "Q4Linear")?;
        let zero_point = attribute(api, info, c"zero_point", Some(8))?;
        let swiglu = attribute(api, info, c"swiglu", Some(0))? != 0;
        let (Ok(zero_point), Ok(group)) = (u8::try_from(zero_point), usize::try_from(attribute(api, info, c"row_group", Some(1))?))
        else {
            return Err(api.error("Q4Linear: zero_point must be 0..15 and row_group positive"));
        };
        let offsets = constant::<f32>(api, info, 3, "Q4Linear")?;
        let weights = Q4Weights::new(n, k, codes, scales, Q4Format { offsets, zero_point, group })
            .map_err(|e| api.error(&format!("Q4Linear (K={k}, N={n}): {e}")))?;
        Ok(Q4Linear { api, weights, swiglu, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = (self.weights.k(), self.weights.n());
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
        let (weights, isa) = (&self.weights, self.isa);
        // SAFETY: each task writes its own columns of y; x and y have the sizes row_io checked.
        split_columns(self.api, context, x, m, n, y, move |x, y, cols| unsafe { matmul_cols(weights, x, m, y, cols, isa) })
    }
}
