//! `cheapest.Q4Linear`: y[.., N] = x[.., K] · Wᵀ with W 4-bit block-quantized (kernels::q4 layout).
//!
//! Inputs:  X float [.., K] (or [.., 2K] with swiglu=1: X = gate | up, the product uses silu(gate) * up),
//!          codes uint8 [N, K/2] (any shape of that size), scales [N, K/32] and offsets [N, K/32] (optional),
//!          both float or both float16 (kernels::Scale); the last three must be constant initializers: the
//!          kernel reads them in place, so the session holds one copy of the weights (ONNX Runtime's own
//!          MatMulNBits keeps a prepacked second).
//! Attributes: K, N (int), zero_point (int, default 8), swiglu (int, default 0), row_group (int, default 1:
//!          blocks of that many rows interleaved, see kernels::q4), layout (int, default 0: kernels::q4's rows
//!          with fp32 multiply-adds; 1: kernels::q4x's groups of 16 rows, x as block integers and integer dot
//!          products, N a multiple of 16; row_group is then ignored).
//!          With `epsilon` (float) the node also takes skip float [.., K] (input 4, the input's shape) and
//!          gamma float [K] (input 5) and is ONNX Runtime's SkipSimplifiedLayerNormalization folded in before the
//!          product: s = X + skip, X' = s / sqrt(sum(s * s) / K + epsilon) * gamma, Y = X' · Wᵀ, with the sum of
//!          squares taken in ONNX Runtime's order (one element at a time, each square rounded before it is
//!          added), so X' has its bits (tested). Output 1 (optional) is s, the residual stream.
//! Output:  Y float [.., N]; with `epsilon`, optionally s float [.., K].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use half::f16;
use super::{attribute, block_weights, detect, linear_io, op, run_linear, split_columns, Api, BlockInputs, ByScale, Element, Activate, Kernel, SkipNorm, ANY, FLOAT, UINT8};
use crate::kernels::q4::{matmul_cols, silu_mul, Isa, Q4Format, Q4Weights, Scale};
use crate::kernels::q4x::{self, Q4Grouped, Terms};

pub(super) static OP: OrtCustomOp = op::<Q4Linear>();

struct Q4Linear {
    api: Api,
    weights: Layout,
    swiglu: bool,
    /// Set: a SkipSimplifiedLayerNormalization with this epsilon is folded in (module docs).
    epsilon: Option<f32>,
    isa: Isa,
}

/// The weights in the layout the node's `layout` attribute names.
enum Layout {
    Rows(ByScale<Q4Weights<'static, f32>, Q4Weights<'static, f16>>),
    Grouped(ByScale<Q4Grouped<'static, f32>, Q4Grouped<'static, f16>>),
}

unsafe fn weights<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, zero_point: u8, group: usize) -> Result<Q4Weights<'static, S>, OrtStatusPtr> {
    let BlockInputs { k, n, codes, scales, offsets } = block_weights::<S>(api, info, "Q4Linear")?;
    Q4Weights::new(n, k, codes, scales, Q4Format { offsets, zero_point, group })
        .map_err(|e| api.error(&format!("Q4Linear (K={k}, N={n}): {e}")))
}

unsafe fn grouped<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, zero_point: u8) -> Result<Q4Grouped<'static, S>, OrtStatusPtr> {
    let BlockInputs { k, n, codes, scales, offsets } = block_weights::<S>(api, info, "Q4Linear")?;
    Q4Grouped::new(n, k, codes, scales, offsets, zero_point).map_err(|e| api.error(&format!("Q4Linear (K={k}, N={n}, layout=1): {e}")))
}

impl Kernel for Q4Linear {
    const NAME: &'static CStr = c"Q4Linear";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, ANY, ANY, FLOAT, FLOAT];
    const REQUIRED_INPUTS: usize = 3;
    const OUTPUTS: usize = 2;
    const REQUIRED_OUTPUTS: usize = 1;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let zero_point = attribute(api, info, c"zero_point", Some(8))?;
        let swiglu = attribute(api, info, c"swiglu", Some(0))? != 0;
        let (Ok(zero_point), Ok(group)) = (u8::try_from(zero_point), usize::try_from(attribute(api, info, c"row_group", Some(1))?))
        else {
            return Err(api.error("Q4Linear: zero_point must be 0..15 and row_group positive"));
        };
        let weights = match attribute(api, info, c"layout", Some(0))? {
            0 => Layout::Rows(ByScale::load(api, info, "Q4Linear", || weights(api, info, zero_point, group), || weights(api, info, zero_point, group))?),
            1 => Layout::Grouped(ByScale::load(api, info, "Q4Linear", || grouped(api, info, zero_point), || grouped(api, info, zero_point))?),
            _ => return Err(api.error("Q4Linear: layout must be 0 or 1")),
        };
        let epsilon = SkipNorm::epsilon(api, info);
        if swiglu && epsilon.is_some() {
            return Err(api.error("Q4Linear: swiglu and a folded norm (epsilon) cannot be combined"));
        }
        Ok(Q4Linear { api, weights, swiglu, epsilon, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (api, isa, swiglu) = (self.api, self.isa, self.swiglu);
        let k = match &self.weights {
            Layout::Rows(w) => by_scale!(w, |w| w.k()),
            Layout::Grouped(w) => by_scale!(w, |w| w.k()),
        };
        let norm = SkipNorm::of_call(api, context, "Q4Linear", k, self.epsilon)?;
        let fold = norm.as_ref().map(SkipNorm::activation);
        let activate = |k: usize| -> (usize, Option<Activate>) {
            if swiglu {
                (2 * k, Some(&silu_mul))
            } else {
                (k, fold.as_ref().map(|f| f as Activate))
            }
        };
        match &self.weights {
            Layout::Rows(weights) => by_scale!(weights, |w| {
                let (k, n) = (w.k(), w.n());
                let (width, activate) = activate(k);
                run_linear(api, context, "Q4Linear", (width, k, n), activate, move |x, m, y, cols| unsafe { matmul_cols(w, x, m, y, cols, isa) })
            }),
            Layout::Grouped(weights) => by_scale!(weights, |w| {
                let (k, n) = (w.k(), w.n());
                let (width, activate) = activate(k);
                let Some((x, m, y)) = linear_io(api, context, "Q4Linear", (width, k, n), activate)? else {
                    return Ok(());
                };
                // x as block integers once, before the columns are split between threads.
                let terms = Terms::new(core::slice::from_raw_parts(x.ptr(), m * k), k, w.zero_point());
                let terms = &terms;
                // Four ranges at most: the kernel streams each range's weights from memory with prefetches that run
                // ahead of its reads, so a range's first bytes wait (32-column tasks: ~18 GB/s on two threads, 128
                // or more: 22-25 GB/s); four still let one core take three when the other is busy.
                // SAFETY: column chunks are multiples of 16 (N is one too) and each task writes its own columns.
                split_columns(api, context, (x.ptr(), m, n, y), 4, move |_, y, cols| unsafe { q4x::matmul_cols(w, terms, y, cols, isa) })
            }),
        }
    }
}
