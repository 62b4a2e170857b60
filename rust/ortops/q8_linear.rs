//! `cheapest.Q8LinearInt8`: y[.., N] ≈ x[.., K] · Wᵀ with W 8-bit block-quantized (zero point 128) and x rounded
//! to int8 per block of 32: what MatMulNBits computes at accuracy_level 4, for an LM head's scoring pass over the
//! whole vocabulary. `layout` 0: MatMulNBits' row-major codes (kernels::q8); 1: rows in groups of 16, one lane
//! each (kernels::q8g), the layout the converter writes for a tied head whose N is a multiple of 16, with its
//! gathers (the embedding lookup, the rescored rows) reading the same bytes through `cheapest.Q8GatherGrouped`.
//!
//! Inputs:  X float [.., K], codes uint8 (N * K bytes), scales float (N * K/32 values), constant initializers read
//!          in place.
//! Attributes: K, N (int), layout (int, 0 or 1; absent: 0).
//! Output:  Y float [.., N].
//!
//! `cheapest.Q8GatherGrouped`: rows of such a grouped W, dequantized (`(code - 128) * scale`, as
//! GatherBlockQuantized gives them). Inputs: ids int64 (any shape), codes, scales as above; attributes K, N;
//! output float [ids.., K].

use core::ffi::CStr;

use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{attribute, block_weights, column_chunks, detect, gather_rows, op, parallel, row_io, Api, BlockInputs, Kernel, SharedOut, FLOAT, INT64, UINT8};
use crate::kernels::q4::Isa;
use crate::kernels::q8::{self, Q8Weights, QuantizedRow};
use crate::kernels::q8g::{self, Q8Grouped};

pub(super) static OP: OrtCustomOp = op::<Q8LinearInt8>();
pub(super) static GATHER: OrtCustomOp = op::<Q8GatherGrouped>();

/// Parallel tasks per call, at most: the vocabulary is wide, so a few dozen chunks balance two cores.
const MAX_TASKS: usize = 32;

enum Weights {
    Rows(Q8Weights<'static>),
    Grouped(Q8Grouped<'static>),
}

struct Q8LinearInt8 {
    api: Api,
    weights: Weights,
    isa: Isa,
}

unsafe fn grouped(api: Api, info: *const OrtKernelInfo, op: &str) -> Result<Q8Grouped<'static>, OrtStatusPtr> {
    let BlockInputs { k, n, codes, scales, .. } = block_weights::<f32>(api, info, op)?;
    Q8Grouped::new(n, k, codes, scales).map_err(|e| api.error(&format!("{op} (K={k}, N={n}): {e}")))
}

impl Kernel for Q8LinearInt8 {
    const NAME: &'static CStr = c"Q8LinearInt8";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let weights = match attribute(api, info, c"layout", Some(0))? {
            0 => {
                let BlockInputs { k, n, codes, scales, .. } = block_weights::<f32>(api, info, "Q8LinearInt8")?;
                Weights::Rows(Q8Weights::new(n, k, codes, scales).map_err(|e| api.error(&format!("Q8LinearInt8 (K={k}, N={n}): {e}")))?)
            }
            1 => Weights::Grouped(grouped(api, info, "Q8LinearInt8")?),
            _ => return Err(api.error("Q8LinearInt8: layout must be 0 (rows) or 1 (groups of 16 rows)")),
        };
        Ok(Q8LinearInt8 { api, weights, isa: detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (k, n) = match &self.weights {
            Weights::Rows(w) => (w.k(), w.n()),
            Weights::Grouped(w) => (w.k(), w.n()),
        };
        let (x, m, y) = row_io(self.api, context, k, n, "Q8LinearInt8")?;
        if m == 0 {
            return Ok(());
        }
        let rows: Vec<QuantizedRow> = core::slice::from_raw_parts(x, m * k).chunks_exact(k).map(QuantizedRow::new).collect();
        // Chunks are multiples of 16 columns: whole groups for the grouped layout.
        let (chunk, tasks) = column_chunks(n, 64, MAX_TASKS);
        let (rows, y, weights, isa) = (&rows, SharedOut(y), &self.weights, self.isa);
        parallel(self.api, context, tasks, move |task| {
            let cols = task * chunk..((task + 1) * chunk).min(n);
            // SAFETY: each task writes its own columns of y, which row_io sized [M, N]; N is a multiple of 16 for
            // the grouped layout (Q8Grouped::new), so every range is whole groups.
            unsafe {
                match weights {
                    Weights::Rows(w) => q8::matmul_cols(w, rows, y.ptr(), cols, isa),
                    Weights::Grouped(w) => q8g::matmul_cols(w, rows, y.ptr(), cols, isa),
                }
            }
        })
    }
}

struct Q8GatherGrouped {
    api: Api,
    weights: Q8Grouped<'static>,
}

impl Kernel for Q8GatherGrouped {
    // No sparse inputs: its codes are the head's, which reads them whole every step, and the rows it rescores
    // (hundreds a step, SmolLM2) soon touch every page; reading the head's huge-page copy keeps one copy resident.
    const NAME: &'static CStr = c"Q8GatherGrouped";
    const INPUTS: &'static [T] = &[INT64, UINT8, FLOAT];
    const REQUIRED_INPUTS: usize = 3;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        Ok(Q8GatherGrouped { api, weights: grouped(api, info, "Q8GatherGrouped")? })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let w = &self.weights;
        gather_rows(self.api, context, "Q8GatherGrouped", (w.n(), w.k()), |id, row| w.row(id, row))
    }
}
