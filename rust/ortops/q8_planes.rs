//! `cheapest.Q8HeadPlanes` and `cheapest.Q8GatherPlanes`: a tied 8-bit embedding / LM head held as two 4-bit
//! planes (kernels::q8planes), read by the head's scoring pass and by the embedding lookup.
//!
//! Q8HeadPlanes: logits[.., N] for x[.., K]: every row scored from the high plane with a per-row error bound,
//!   the 64 best and every row whose upper bound reaches their best exact value recomputed exactly in fp32,
//!   so the argmax is the exact argmax and the best coarse rows are exact.
//! Q8GatherPlanes: rows[.., K] = W[ids, :] in fp32 (scale * code, the values GatherBlockQuantized gives).
//!
//! Inputs:  X float [.., K] (head) or ids int64 [..] (gather), hi uint8 [N * K/2], lo uint8 [N * K/2],
//!          scales float or float16 [N, K/32] (the last three constant initializers, read in place and shared
//!          by both).
//! Attributes: K, N (int).
//! Output:  float [.., N] (head) or [.., K] (gather).

use core::ffi::CStr;
use core::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use half::f16;
use ort_sys::{ONNXTensorElementDataType as T, OrtCustomOp, OrtKernelContext, OrtKernelInfo, OrtStatusPtr};

use super::{column_chunks, constant, dims, detect, gather_rows, op, parallel, row_io, Api, ByScale, Element, Kernel, SharedIn, SharedOut, ANY, FLOAT, INT64, UINT8};
use crate::kernels::q8planes::{coarse_cols, CoarseRow, exact_cols, exact_pass, Isa, Planes, Scale};

pub(super) static HEAD: OrtCustomOp = op::<Q8HeadPlanes>();
pub(super) static GATHER: OrtCustomOp = op::<Q8GatherPlanes>();

/// Parallel tasks per pass, at most: the vocabulary is wide, so a few dozen chunks balance two cores.
const MAX_TASKS: usize = 32;

/// x rows whose upper bounds the head keeps between calls (Gemma 3: 1 MiB a row): a decode batch of up to this
/// many reuses its buffer; a larger one allocates its own each call.
const KEEP_ROWS: usize = 8;

/// The planes with their scales as stored (input 3: fp32 or fp16).
type Weights = ByScale<Planes<'static, f32>, Planes<'static, f16>>;

unsafe fn load(api: Api, info: *const OrtKernelInfo, op: &str) -> Result<Weights, OrtStatusPtr> {
    ByScale::load_at(api, info, 3, op, || planes(api, info, op), || planes(api, info, op))
}

/// The K and N attributes and the two planes and scales (inputs 1-3), checked.
unsafe fn planes<S: Scale + Element>(api: Api, info: *const OrtKernelInfo, op: &str) -> Result<Planes<'static, S>, OrtStatusPtr> {
    let (k, n) = dims(api, info, op)?;
    let missing = || api.error(&format!("{op}: planes and scales must be constant initializers"));
    let hi = constant::<u8>(api, info, 1, op)?.ok_or_else(missing)?;
    let lo = constant::<u8>(api, info, 2, op)?.ok_or_else(missing)?;
    let scales = constant::<S>(api, info, 3, op)?.ok_or_else(missing)?;
    Planes::new(n, k, hi, lo, scales).map_err(|e| api.error(&format!("{op} (K={k}, N={n}): {e}")))
}

struct Q8HeadPlanes {
    api: Api,
    weights: Weights,
    isa: Isa,
    /// The upper bounds of the last call (up to KEEP_ROWS rows), kept so a decode step does not fault in a
    /// fresh vocabulary-sized buffer (a call that finds it taken allocates its own).
    upper: Mutex<Vec<f32>>,
}

impl Kernel for Q8HeadPlanes {
    /// The low plane: read only for the rows the exact pass recomputes (~64 a step).
    const SPARSE_INPUTS: &'static [usize] = &[2];
    const NAME: &'static CStr = c"Q8HeadPlanes";
    const INPUTS: &'static [T] = &[FLOAT, UINT8, UINT8, ANY];
    const REQUIRED_INPUTS: usize = 4;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        let weights = load(api, info, "Q8HeadPlanes")?;
        Ok(Q8HeadPlanes { api, weights, isa: detect(), upper: Mutex::new(Vec::new()) })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        by_scale!(&self.weights, |w| self.run(w, context))
    }
}

impl Q8HeadPlanes {
    unsafe fn run<S: Scale>(&self, w: &Planes<'static, S>, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let (api, isa) = (self.api, self.isa);
        let (k, n) = (w.k(), w.n());
        let (x, m, y) = row_io(api, context, k, n, "Q8HeadPlanes")?;
        if m == 0 {
            return Ok(());
        }
        let xs = core::slice::from_raw_parts(x, m * k);
        let rows: Vec<CoarseRow> = xs.chunks_exact(k).map(CoarseRow::new).collect();
        let mut kept = self.upper.try_lock().ok();
        let mut own = Vec::new();
        let upper = kept.as_deref_mut().unwrap_or(&mut own);
        upper.resize(m * n, 0.0);
        let (chunk, tasks) = column_chunks(n, 64, MAX_TASKS);
        let (yp, up) = (SharedOut(y), SharedOut(upper.as_mut_ptr()));
        let rows = &rows;
        parallel(api, context, tasks, move |task| {
            let cols = task * chunk..((task + 1) * chunk).min(n);
            // SAFETY: each task writes its own columns of y and upper, both [M, N]; `rows` were made from K values.
            unsafe { coarse_cols(w, rows, yp.ptr(), up.ptr(), cols, isa) }
        })?;
        let y = core::slice::from_raw_parts_mut(y, m * n);
        for ((xr, yr), ur) in xs.chunks_exact(k).zip(y.chunks_exact_mut(n)).zip(upper.chunks_exact_mut(n)) {
            let mut failed = None;
            exact_pass(w, xr, yr, ur, isa, |yr, ur, floor| {
                let (count, yp, up) = (AtomicUsize::new(0), SharedOut(yr.as_mut_ptr()), SharedIn(ur.as_ptr()));
                let count_ref = &count;
                let done = parallel(api, context, tasks, move |task| {
                    let cols = task * chunk..((task + 1) * chunk).min(n);
                    // SAFETY: each task reads and writes its own columns of one row of y and upper.
                    let c = unsafe { exact_cols(w, xr, yp.ptr(), up.ptr(), floor, cols, isa) };
                    count_ref.fetch_add(c, Ordering::Relaxed);
                });
                failed = done.err();
                count.load(Ordering::Relaxed)
            });
            if let Some(status) = failed {
                return Err(status);
            }
        }
        if upper.capacity() > KEEP_ROWS * n {
            *upper = Vec::new(); // a large batch's bounds are not held for the worker's life
        }
        Ok(())
    }
}

struct Q8GatherPlanes {
    api: Api,
    weights: Weights,
}

impl Kernel for Q8GatherPlanes {
    const SPARSE_INPUTS: &'static [usize] = &[1, 2, 3];
    const NAME: &'static CStr = c"Q8GatherPlanes";
    const INPUTS: &'static [T] = &[INT64, UINT8, UINT8, ANY];
    const REQUIRED_INPUTS: usize = 4;

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr> {
        Ok(Q8GatherPlanes { api, weights: load(api, info, "Q8GatherPlanes")? })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        by_scale!(&self.weights, |w| self.run(w, context))
    }
}

impl Q8GatherPlanes {
    unsafe fn run<S: Scale>(&self, w: &Planes<'static, S>, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        gather_rows(self.api, context, "Q8GatherPlanes", (w.n(), w.k()), |id, row| w.row(id, row))
    }
}
