//! `cheapest.Q4Linear`: y[.., N] = x[.., K] · Wᵀ with W 4-bit block-quantized (kernels::q4 layout).
//!
//! Inputs:  X float [.., K] (or [.., 2K] with swiglu=1: X = gate | up, the product uses silu(gate) * up),
//!          codes uint8 [N, K/2] (any shape of that size), scales float [N, K/32], offsets float [N, K/32]
//!          (optional); the last three must be constant initializers: the kernel reads them in place, so the
//!          session holds one copy of the weights (ONNX Runtime's own MatMulNBits keeps a prepacked second).
//! Attributes: K, N (int), zero_point (int, default 8), swiglu (int, default 0).
//! Output:  Y float [.., N].
//!
//! Work is split into column chunks run by `KernelContext_ParallelFor`, i.e. on the session's intra-op
//! pool with the calling thread taking part: no second pool competes for the same cores.

use core::ffi::{c_char, c_int, c_void, CStr};
use core::ptr;

use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtCustomOp, OrtCustomOpInputOutputCharacteristic, OrtKernelContext,
    OrtKernelInfo, OrtMemType, OrtStatusPtr, OrtValue,
};

use super::{Api, API_VERSION};
use crate::kernels::q4::{matmul_cols, silu_mul, Isa, Q4Weights, BLOCK};

pub(super) static OPS: [&OrtCustomOp; 1] = [&Q4_LINEAR];

/// Output columns per parallel task: small enough to balance two busy cores, large enough that the
/// per-task cost (an atomic claim and a call) stays negligible.
const CHUNK_COLUMNS: usize = 32;

static Q4_LINEAR: OrtCustomOp = OrtCustomOp {
    version: API_VERSION,
    CreateKernel: None,
    GetName: Some(name),
    GetExecutionProviderType: Some(provider),
    GetInputType: Some(input_type),
    GetInputTypeCount: Some(input_count),
    GetOutputType: Some(output_type),
    GetOutputTypeCount: Some(output_count),
    KernelCompute: None,
    KernelDestroy: Some(destroy),
    GetInputCharacteristic: Some(input_characteristic),
    GetOutputCharacteristic: Some(output_characteristic),
    GetInputMemoryType: Some(input_memory),
    GetVariadicInputMinArity: Some(one),
    GetVariadicInputHomogeneity: Some(one),
    GetVariadicOutputMinArity: Some(one),
    GetVariadicOutputHomogeneity: Some(one),
    CreateKernelV2: Some(create),
    KernelComputeV2: Some(compute),
    InferOutputShapeFn: None,
    GetStartVersion: Some(start_version),
    GetEndVersion: Some(end_version),
};

unsafe extern "system" fn name(_: *const OrtCustomOp) -> *const c_char {
    c"Q4Linear".as_ptr()
}

unsafe extern "system" fn provider(_: *const OrtCustomOp) -> *const c_char {
    c"CPUExecutionProvider".as_ptr()
}

unsafe extern "system" fn input_type(_: *const OrtCustomOp, index: usize) -> ONNXTensorElementDataType {
    if index == 1 {
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8
    } else {
        ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
    }
}

unsafe extern "system" fn input_count(_: *const OrtCustomOp) -> usize {
    4
}

unsafe extern "system" fn output_type(_: *const OrtCustomOp, _: usize) -> ONNXTensorElementDataType {
    ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
}

unsafe extern "system" fn output_count(_: *const OrtCustomOp) -> usize {
    1
}

unsafe extern "system" fn input_characteristic(_: *const OrtCustomOp, index: usize) -> OrtCustomOpInputOutputCharacteristic {
    if index == 3 {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
}

unsafe extern "system" fn output_characteristic(_: *const OrtCustomOp, _: usize) -> OrtCustomOpInputOutputCharacteristic {
    OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
}

unsafe extern "system" fn input_memory(_: *const OrtCustomOp, _: usize) -> OrtMemType {
    OrtMemType::OrtMemTypeDefault
}

unsafe extern "system" fn one(_: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn start_version(_: *const OrtCustomOp) -> c_int {
    1
}

unsafe extern "system" fn end_version(_: *const OrtCustomOp) -> c_int {
    c_int::MAX
}

struct Kernel {
    api: Api,
    weights: Q4Weights<'static>,
    swiglu: bool,
    isa: Isa,
}

unsafe extern "system" fn create(
    _: *const OrtCustomOp,
    api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    let api = Api(&*api);
    match Kernel::new(api, info) {
        Ok(k) => {
            *kernel = Box::into_raw(Box::new(k)).cast();
            OrtStatusPtr(ptr::null_mut())
        }
        Err(status) => status,
    }
}

unsafe extern "system" fn destroy(kernel: *mut c_void) {
    if !kernel.is_null() {
        drop(Box::from_raw(kernel.cast::<Kernel>()));
    }
}

unsafe extern "system" fn compute(kernel: *mut c_void, context: *mut OrtKernelContext) -> OrtStatusPtr {
    let kernel = &*kernel.cast::<Kernel>();
    match kernel.compute(context) {
        Ok(()) => OrtStatusPtr(ptr::null_mut()),
        Err(status) => status,
    }
}

unsafe fn attribute(api: Api, info: *const OrtKernelInfo, name: &CStr, default: Option<i64>) -> Result<i64, OrtStatusPtr> {
    let mut value = 0i64;
    let status = (api.get().KernelInfoGetAttribute_int64)(info, name.as_ptr(), &mut value);
    match (status.0.is_null(), default) {
        (true, _) => Ok(value),
        (false, Some(d)) => {
            (api.get().ReleaseStatus)(status.0);
            Ok(d)
        }
        (false, None) => Err(status),
    }
}

/// A constant initializer input: its data and element count.
unsafe fn constant<T>(api: Api, info: *const OrtKernelInfo, index: usize) -> Result<Option<(&'static [T], usize)>, OrtStatusPtr> {
    let mut count = 0usize;
    api.check((api.get().KernelInfo_GetInputCount)(info, &mut count))?;
    if index >= count {
        return Ok(None);
    }
    let mut is_constant: c_int = 0;
    let mut value: *const OrtValue = ptr::null();
    let status = (api.get().KernelInfoGetConstantInput_tensor)(info, index, &mut is_constant, &mut value);
    if !status.0.is_null() {
        // An omitted optional input reads as "not constant" or as an error, depending on the runtime.
        (api.get().ReleaseStatus)(status.0);
        return Ok(None);
    }
    if value.is_null() {
        return Ok(None);
    }
    if is_constant == 0 {
        return Err(api.error("Q4Linear: codes, scales and offsets must be constant initializers"));
    }
    let elements = element_count(api, value)?;
    let mut data: *mut c_void = ptr::null_mut();
    api.check((api.get().GetTensorMutableData)(value.cast_mut(), &mut data))?;
    // SAFETY: the session owns the initializer for at least the kernel's life.
    Ok(Some((core::slice::from_raw_parts(data.cast::<T>(), elements), elements)))
}

unsafe fn element_count(api: Api, value: *const OrtValue) -> Result<usize, OrtStatusPtr> {
    Ok(shape(api, value)?.iter().map(|&d| d.max(0) as usize).product())
}

unsafe fn shape(api: Api, value: *const OrtValue) -> Result<Vec<i64>, OrtStatusPtr> {
    let mut info = ptr::null_mut();
    api.check((api.get().GetTensorTypeAndShape)(value, &mut info))?;
    let mut rank = 0usize;
    let mut dims = Vec::new();
    let mut status = (api.get().GetDimensionsCount)(info, &mut rank);
    if status.0.is_null() {
        dims.resize(rank, 0i64);
        status = (api.get().GetDimensions)(info, dims.as_mut_ptr(), rank);
    }
    (api.get().ReleaseTensorTypeAndShapeInfo)(info);
    api.check(status)?;
    Ok(dims)
}

impl Kernel {
    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Kernel, OrtStatusPtr> {
        let k = attribute(api, info, c"K", None)?;
        let n = attribute(api, info, c"N", None)?;
        let zero_point = attribute(api, info, c"zero_point", Some(8))?;
        let swiglu = attribute(api, info, c"swiglu", Some(0))? != 0;
        let (Ok(k), Ok(n), Ok(zero_point)) = (usize::try_from(k), usize::try_from(n), u8::try_from(zero_point)) else {
            return Err(api.error("Q4Linear: K, N and zero_point must be non-negative"));
        };
        let missing = || api.error("Q4Linear: codes and scales must be constant initializers");
        let (codes, _) = constant::<u8>(api, info, 1)?.ok_or_else(missing)?;
        let (scales, _) = constant::<f32>(api, info, 2)?.ok_or_else(missing)?;
        let offsets = constant::<f32>(api, info, 3)?.map(|(o, _)| o);
        let weights = Q4Weights::new(n, k, codes, scales, offsets, zero_point)
            .map_err(|e| api.error(&format!("Q4Linear (K={k}, N={n}): {e}")))?;
        Ok(Kernel { api, weights, swiglu, isa: Isa::detect() })
    }

    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr> {
        let api = self.api;
        let (k, n) = (self.weights.k(), self.weights.n());
        let mut x: *const OrtValue = ptr::null();
        api.check((api.get().KernelContext_GetInput)(context, 0, &mut x))?;
        let mut dims = shape(api, x)?;
        let width = if self.swiglu { 2 * k } else { k };
        if dims.last().copied() != Some(width as i64) {
            return Err(api.error(&format!("Q4Linear: the input's last dimension must be {width}")));
        }
        let m: usize = dims[..dims.len() - 1].iter().map(|&d| d.max(0) as usize).product();
        *dims.last_mut().expect("rank >= 1") = n as i64;
        let mut y: *mut OrtValue = ptr::null_mut();
        api.check((api.get().KernelContext_GetOutput)(context, 0, dims.as_ptr(), dims.len(), &mut y))?;
        if m == 0 {
            return Ok(());
        }
        let mut x_data: *mut c_void = ptr::null_mut();
        api.check((api.get().GetTensorMutableData)(x.cast_mut(), &mut x_data))?;
        let mut y_data: *mut c_void = ptr::null_mut();
        api.check((api.get().GetTensorMutableData)(y, &mut y_data))?;
        let activated: Vec<f32>;
        let x_ptr = if self.swiglu {
            let gate_up = core::slice::from_raw_parts(x_data.cast::<f32>(), m * width);
            let mut out = vec![0.0f32; m * k];
            silu_mul(gate_up, k, &mut out);
            activated = out;
            activated.as_ptr()
        } else {
            x_data.cast::<f32>().cast_const()
        };
        let job = Job { weights: &self.weights, x: x_ptr, m, y: y_data.cast::<f32>(), isa: self.isa };
        let tasks = n.div_ceil(CHUNK_COLUMNS);
        if tasks == 1 {
            run_task((&job as *const Job).cast_mut().cast(), 0);
            return Ok(());
        }
        api.check((api.get().KernelContext_ParallelFor)(context, run_task, tasks, 0, (&job as *const Job).cast_mut().cast()))
    }
}

struct Job<'a> {
    weights: &'a Q4Weights<'static>,
    x: *const f32,
    m: usize,
    y: *mut f32,
    isa: Isa,
}

unsafe extern "C" fn run_task(job: *mut c_void, task: usize) {
    let job = &*job.cast::<Job>();
    let n = job.weights.n();
    let start = task * CHUNK_COLUMNS;
    let end = (start + CHUNK_COLUMNS).min(n);
    debug_assert!(BLOCK % 8 == 0 && start < end);
    // SAFETY: each task writes its own columns of y; x and y have the sizes compute() checked.
    matmul_cols(job.weights, job.x, job.m, job.y, start..end, job.isa);
}
