//! ONNX Runtime custom operators (domain `cheapest`), registered through ONNX Runtime's custom-op library
//! interface: `SessionOptions.register_custom_ops_library(<this library>)` calls `RegisterCustomOps`.
//!
//! The core's own shared library exports it, so the Python service needs no second binary: it passes the
//! path of the `_cheapest_core` extension module it already imported. Nothing here links against ONNX
//! Runtime; every call goes through the `OrtApi` table the runtime hands over (C API version 17, i.e.
//! ONNX Runtime 1.17 or newer).
//!
//! Operators (CPU execution provider):
//!   Q4Linear      fp32 x times a 4-bit block-quantized weight (kernels::q4), optionally SwiGLU on x first or
//!                 a SkipSimplifiedLayerNormalization folded in (`SkipNorm`, as Q8Linear)
//!   Q8LinearInt8  x rounded to int8 per block times an 8-bit weight (kernels::q8, or kernels::q8g in row
//!                 groups of 16): an LM head's scoring pass
//!   Q8GatherGrouped  the embedding lookup and the rescored rows on the grouped layout
//!   Q8Linear      fp32 x times an 8-bit block-quantized weight (kernels::q8f): Q5_0, Q8_0, Q6_K ... tensors
//!   Q8HeadPlanes  a tied 8-bit LM head held as two 4-bit planes (kernels::q8planes): scored from the high
//!                 plane, every row that could be the argmax recomputed exactly
//!   Q8GatherPlanes  the embedding lookup on the same planes
//!   GroupAttention  GroupQueryAttention's causal attention with rotary embeddings over a shared KV cache,
//!                 per query without ONNX Runtime's per-head GEMMs (kernels::attention)
//!   QkNorm        per-head RMS norms of the query and key heads of a packed QKV (Gemma 3's q_norm / k_norm)
//!
//! Each kernel reads its weights where the session keeps its constant initializers and splits output
//! columns over `KernelContext_ParallelFor`, i.e. ONNX Runtime's own intra-op pool with the calling thread
//! taking part: no second pool competes for the same cores.

/// `$body` with `$w` bound to the weights, whichever way their scales are stored.
macro_rules! by_scale {
    ($weights:expr, |$w:ident| $body:expr) => {
        match $weights {
            ByScale::F32($w) => $body,
            ByScale::F16($w) => $body,
        }
    };
}

mod attention;
mod pages;
mod q4_linear;
mod q8_linear;
mod q8_planes;
mod q8f_linear;
mod qk_norm;

use core::ffi::{c_char, c_int, c_void, CStr};
use core::ops::Range;
use core::ptr;
use std::sync::OnceLock;

use ort_sys::{
    ONNXTensorElementDataType, OrtApi, OrtApiBase, OrtCustomOp, OrtCustomOpDomain, OrtCustomOpInputOutputCharacteristic,
    OrtErrorCode, OrtKernelContext, OrtKernelInfo, OrtMemType, OrtSessionOptions, OrtStatusPtr, OrtValue,
};

use crate::kernels::q4::Isa;

pub use pages::{active as huge_pages_active, set_enabled as set_huge_pages};

pub const DOMAIN: &CStr = c"cheapest";
const API_VERSION: u32 = 17;

static OPS: [&OrtCustomOp; 8] = [&attention::OP, &q4_linear::OP, &q8_linear::OP, &q8_linear::GATHER, &q8f_linear::OP, &q8_planes::HEAD, &q8_planes::GATHER, &qk_norm::OP];

const FLOAT: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
const UINT8: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
const INT8: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
const INT32: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
const INT64: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
const FLOAT16: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
/// An input declared with this type takes any element type; the kernel checks what it got (block scales: fp32
/// or fp16).
const ANY: ONNXTensorElementDataType = ONNXTensorElementDataType::ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

/// A Rust element type and the ONNX tensor element type it reads.
trait Element: Sized {
    const TYPE: ONNXTensorElementDataType;

    fn reads(element: ONNXTensorElementDataType) -> bool {
        element == Self::TYPE
    }
}

/// Codes are bytes, whichever of the two byte types the graph declares them as.
impl Element for u8 {
    const TYPE: ONNXTensorElementDataType = UINT8;

    fn reads(element: ONNXTensorElementDataType) -> bool {
        element == UINT8 || element == INT8
    }
}

impl Element for f32 {
    const TYPE: ONNXTensorElementDataType = FLOAT;
}

impl Element for half::f16 {
    const TYPE: ONNXTensorElementDataType = FLOAT16;
}

/// The C API table, valid for the life of the process once ONNX Runtime has handed it over.
#[derive(Clone, Copy)]
struct Api(&'static OrtApi);

impl Api {
    fn get(&self) -> &'static OrtApi {
        self.0
    }

    /// An ONNX Runtime error status carrying `message` (operator and shape facts only, never data).
    fn error(&self, message: &str) -> OrtStatusPtr {
        let text = std::ffi::CString::new(message).unwrap_or_else(|_| c"cheapest op error".into());
        // SAFETY: CreateStatus copies the message.
        unsafe { (self.0.CreateStatus)(OrtErrorCode::ORT_RUNTIME_EXCEPTION, text.as_ptr()) }
    }

    /// Ok(()) for a null status; otherwise the status itself, to be returned to ONNX Runtime.
    fn check(&self, status: OrtStatusPtr) -> Result<(), OrtStatusPtr> {
        if status.0.is_null() {
            Ok(())
        } else {
            Err(status)
        }
    }
}

struct Domain(*mut OrtCustomOpDomain);
// SAFETY: the domain is created once and only read by ONNX Runtime afterwards.
unsafe impl Send for Domain {}
unsafe impl Sync for Domain {}

static DOMAIN_HANDLE: OnceLock<Result<Domain, String>> = OnceLock::new();

/// Entry point ONNX Runtime looks up by name after loading this library.
///
/// # Safety
/// Called by ONNX Runtime with valid session options and its API base.
#[no_mangle]
pub unsafe extern "C" fn RegisterCustomOps(options: *mut OrtSessionOptions, api_base: *const OrtApiBase) -> OrtStatusPtr {
    if options.is_null() || api_base.is_null() {
        return OrtStatusPtr(ptr::null_mut());
    }
    let raw = ((*api_base).GetApi)(API_VERSION);
    if raw.is_null() {
        // A runtime older than 1.17 hands out no table to report through; its session then refuses the
        // graph's `cheapest` operators by name.
        return OrtStatusPtr(ptr::null_mut());
    }
    let api = Api(&*raw);
    let domain = DOMAIN_HANDLE.get_or_init(|| {
        let mut domain: *mut OrtCustomOpDomain = ptr::null_mut();
        let status = (api.get().CreateCustomOpDomain)(DOMAIN.as_ptr(), &mut domain);
        if !status.0.is_null() {
            return Err(message_of(api, status));
        }
        for op in OPS {
            let status = (api.get().CustomOpDomain_Add)(domain, op);
            if !status.0.is_null() {
                return Err(message_of(api, status));
            }
        }
        Ok(Domain(domain))
    });
    match domain {
        Ok(domain) => (api.get().AddCustomOpDomain)(options, domain.0),
        Err(message) => api.error(message),
    }
}

unsafe fn message_of(api: Api, status: OrtStatusPtr) -> String {
    let text = CStr::from_ptr((api.get().GetErrorMessage)(status.0) as *const c_char).to_string_lossy().into_owned();
    (api.get().ReleaseStatus)(status.0);
    text
}

// --- one operator = a Kernel type; the C function table is generated from it -------------------------------

/// What an operator declares and does; `op::<K>()` turns it into ONNX Runtime's function table.
trait Kernel: Sized {
    const NAME: &'static CStr;
    /// Element types of the inputs; those from index `REQUIRED_INPUTS` on are optional.
    const INPUTS: &'static [ONNXTensorElementDataType];
    const REQUIRED_INPUTS: usize;
    /// Outputs, all float; those from index `REQUIRED_OUTPUTS` on are optional.
    const OUTPUTS: usize = 1;
    const REQUIRED_OUTPUTS: usize = Self::OUTPUTS;
    /// Constant inputs read a few rows at a time (embedding gathers, rescored rows), left where the session keeps
    /// them: copied into huge pages (pages.rs) they would all be resident, mapped only the rows read are.
    const SPARSE_INPUTS: &'static [usize] = &[];

    unsafe fn new(api: Api, info: *const OrtKernelInfo) -> Result<Self, OrtStatusPtr>;
    unsafe fn compute(&self, context: *mut OrtKernelContext) -> Result<(), OrtStatusPtr>;
}

const fn op<K: Kernel>() -> OrtCustomOp {
    OrtCustomOp {
        version: API_VERSION,
        CreateKernel: None,
        GetName: Some(name::<K>),
        GetExecutionProviderType: Some(provider),
        GetInputType: Some(input_type::<K>),
        GetInputTypeCount: Some(input_count::<K>),
        GetOutputType: Some(output_type),
        GetOutputTypeCount: Some(output_count::<K>),
        KernelCompute: None,
        KernelDestroy: Some(destroy::<K>),
        GetInputCharacteristic: Some(input_characteristic::<K>),
        GetOutputCharacteristic: Some(output_characteristic::<K>),
        GetInputMemoryType: Some(input_memory),
        GetVariadicInputMinArity: Some(one),
        GetVariadicInputHomogeneity: Some(one),
        GetVariadicOutputMinArity: Some(one),
        GetVariadicOutputHomogeneity: Some(one),
        CreateKernelV2: Some(create::<K>),
        KernelComputeV2: Some(compute::<K>),
        InferOutputShapeFn: None,
        GetStartVersion: Some(start_version),
        GetEndVersion: Some(end_version),
    }
}

unsafe extern "system" fn name<K: Kernel>(_: *const OrtCustomOp) -> *const c_char {
    K::NAME.as_ptr()
}

unsafe extern "system" fn provider(_: *const OrtCustomOp) -> *const c_char {
    c"CPUExecutionProvider".as_ptr()
}

unsafe extern "system" fn input_type<K: Kernel>(_: *const OrtCustomOp, index: usize) -> ONNXTensorElementDataType {
    K::INPUTS.get(index).copied().unwrap_or(FLOAT)
}

unsafe extern "system" fn input_count<K: Kernel>(_: *const OrtCustomOp) -> usize {
    K::INPUTS.len()
}

unsafe extern "system" fn output_type(_: *const OrtCustomOp, _: usize) -> ONNXTensorElementDataType {
    FLOAT
}

unsafe extern "system" fn output_count<K: Kernel>(_: *const OrtCustomOp) -> usize {
    K::OUTPUTS
}

unsafe extern "system" fn input_characteristic<K: Kernel>(
    _: *const OrtCustomOp,
    index: usize,
) -> OrtCustomOpInputOutputCharacteristic {
    if index >= K::REQUIRED_INPUTS {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
}

unsafe extern "system" fn output_characteristic<K: Kernel>(_: *const OrtCustomOp, index: usize) -> OrtCustomOpInputOutputCharacteristic {
    if index >= K::REQUIRED_OUTPUTS {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_OPTIONAL
    } else {
        OrtCustomOpInputOutputCharacteristic::INPUT_OUTPUT_REQUIRED
    }
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

unsafe extern "system" fn create<K: Kernel>(
    _: *const OrtCustomOp,
    api: *const OrtApi,
    info: *const OrtKernelInfo,
    kernel: *mut *mut c_void,
) -> OrtStatusPtr {
    match pages::collect(K::SPARSE_INPUTS, || K::new(Api(&*api), info)) {
        (Ok(kernel_), pinned) => {
            *kernel = Box::into_raw(Box::new(Built { kernel: kernel_, _pinned: pinned })).cast();
            OrtStatusPtr(ptr::null_mut())
        }
        (Err(status), _) => status,
    }
}

/// A kernel with the huge-page chunks its weights were copied into (pages.rs), released with it.
struct Built<K> {
    kernel: K,
    _pinned: Vec<std::sync::Arc<pages::Chunk>>,
}

unsafe extern "system" fn destroy<K: Kernel>(kernel: *mut c_void) {
    if !kernel.is_null() {
        drop(Box::from_raw(kernel.cast::<Built<K>>()));
    }
}

unsafe extern "system" fn compute<K: Kernel>(kernel: *mut c_void, context: *mut OrtKernelContext) -> OrtStatusPtr {
    match (*kernel.cast::<Built<K>>()).kernel.compute(context) {
        Ok(()) => OrtStatusPtr(ptr::null_mut()),
        Err(status) => status,
    }
}

// --- helpers the kernels share --------------------------------------------------------------------------------

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

/// What every block-quantized operator reads: K, N, the codes (input 1), the scales (input 2) and the optional
/// per-block terms stored as the scales are (input 3).
struct BlockInputs<S: 'static> {
    k: usize,
    n: usize,
    codes: &'static [u8],
    scales: &'static [S],
    offsets: Option<&'static [S]>,
}

unsafe fn block_weights<S: Element>(api: Api, info: *const OrtKernelInfo, op: &str) -> Result<BlockInputs<S>, OrtStatusPtr> {
    let (k, n) = dims(api, info, op)?;
    let missing = || api.error(&format!("{op}: codes and scales must be constant initializers"));
    let codes = constant::<u8>(api, info, 1, op)?.ok_or_else(missing)?;
    let scales = constant::<S>(api, info, 2, op)?.ok_or_else(missing)?;
    Ok(BlockInputs { k, n, codes, scales, offsets: constant::<S>(api, info, 3, op)? })
}

/// The K and N attributes of a weight matrix [N, K].
unsafe fn dims(api: Api, info: *const OrtKernelInfo, op: &str) -> Result<(usize, usize), OrtStatusPtr> {
    match (usize::try_from(attribute(api, info, c"K", None)?), usize::try_from(attribute(api, info, c"N", None)?)) {
        (Ok(k), Ok(n)) => Ok((k, n)),
        _ => Err(api.error(&format!("{op}: K and N must be non-negative"))),
    }
}

/// Whether block scales at input `index` (declared `ANY`) are stored as fp16 (else they must be fp32).
unsafe fn half_input(api: Api, info: *const OrtKernelInfo, index: usize, op: &str) -> Result<bool, OrtStatusPtr> {
    let mut typeinfo = ptr::null_mut();
    api.check((api.get().KernelInfo_GetInputTypeInfo)(info, index, &mut typeinfo))?;
    let mut tensor = ptr::null();
    let mut element = ANY;
    let mut status = (api.get().CastTypeInfoToTensorInfo)(typeinfo, &mut tensor);
    if status.0.is_null() && !tensor.is_null() {
        status = (api.get().GetTensorElementType)(tensor, &mut element);
    }
    (api.get().ReleaseTypeInfo)(typeinfo);
    api.check(status)?;
    match element {
        FLOAT16 => Ok(true),
        FLOAT => Ok(false),
        _ => Err(api.error(&format!("{op}: block scales must be float or float16"))),
    }
}

/// A constant initializer input of element type T, read in place (None when an optional input is absent).
unsafe fn constant<T: Element>(api: Api, info: *const OrtKernelInfo, index: usize, op: &str) -> Result<Option<&'static [T]>, OrtStatusPtr> {
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
        return Err(api.error(&format!("{op}: weights must be constant initializers")));
    }
    if !T::reads(element_type(api, value)?) {
        return Err(api.error(&format!("{op}: initializer {index} has the wrong element type")));
    }
    let elements: usize = shape(api, value)?.iter().map(|&d| d.max(0) as usize).product();
    let mut data: *mut c_void = ptr::null_mut();
    api.check((api.get().GetTensorMutableData)(value.cast_mut(), &mut data))?;
    if data.align_offset(core::mem::align_of::<T>()) != 0 {
        return Err(api.error(&format!("{op}: initializer {index} is not aligned for its element type")));
    }
    // SAFETY: the session owns the initializer for at least the kernel's life; a copy in huge pages lives as long
    // as the kernel being built (pages::collect in `create`).
    let src = core::slice::from_raw_parts(data.cast::<T>(), elements);
    let bytes = core::slice::from_raw_parts(data.cast::<u8>().cast_const(), core::mem::size_of_val(src));
    Ok(Some(match pages::copy(bytes, index) {
        Some(copy) => core::slice::from_raw_parts(copy.cast::<T>(), elements),
        None => src,
    }))
}

unsafe fn element_type(api: Api, value: *const OrtValue) -> Result<ONNXTensorElementDataType, OrtStatusPtr> {
    let mut info = ptr::null_mut();
    api.check((api.get().GetTensorTypeAndShape)(value, &mut info))?;
    let mut element = ANY;
    let status = (api.get().GetTensorElementType)(info, &mut element);
    (api.get().ReleaseTensorTypeAndShapeInfo)(info);
    api.check(status)?;
    Ok(element)
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

/// Input 0 of width `width` in its last dimension and output 0 of the same shape with N there:
/// (x data, rows M, y data).
unsafe fn row_io(
    api: Api,
    context: *mut OrtKernelContext,
    width: usize,
    n: usize,
    op: &str,
) -> Result<(*const f32, usize, *mut f32), OrtStatusPtr> {
    let mut x: *const OrtValue = ptr::null();
    api.check((api.get().KernelContext_GetInput)(context, 0, &mut x))?;
    let mut dims = shape(api, x)?;
    if dims.last().copied() != Some(width as i64) {
        return Err(api.error(&format!("{op}: the input's last dimension must be {width}")));
    }
    let m: usize = dims[..dims.len() - 1].iter().map(|&d| d.max(0) as usize).product();
    *dims.last_mut().expect("rank >= 1") = n as i64;
    let mut y: *mut OrtValue = ptr::null_mut();
    api.check((api.get().KernelContext_GetOutput)(context, 0, dims.as_ptr(), dims.len(), &mut y))?;
    let mut x_data: *mut c_void = ptr::null_mut();
    let mut y_data: *mut c_void = ptr::null_mut();
    if m > 0 {
        api.check((api.get().GetTensorMutableData)(x.cast_mut(), &mut x_data))?;
        api.check((api.get().GetTensorMutableData)(y, &mut y_data))?;
    }
    Ok((x_data.cast::<f32>().cast_const(), m, y_data.cast::<f32>()))
}

/// Input `index`: its data and dimensions (`op` names the operator if it is missing).
unsafe fn input(api: Api, context: *mut OrtKernelContext, index: usize, op: &str) -> Result<(*mut c_void, Vec<i64>), OrtStatusPtr> {
    let mut value: *const OrtValue = ptr::null();
    api.check((api.get().KernelContext_GetInput)(context, index, &mut value))?;
    if value.is_null() {
        return Err(api.error(&format!("{op}: input {index} is missing")));
    }
    let dims = shape(api, value)?;
    let mut data: *mut c_void = ptr::null_mut();
    api.check((api.get().GetTensorMutableData)(value.cast_mut(), &mut data))?;
    Ok((data, dims))
}

/// Output `index` with dimensions `dims`: its data.
unsafe fn output(api: Api, context: *mut OrtKernelContext, index: usize, dims: &[usize]) -> Result<*mut c_void, OrtStatusPtr> {
    let dims: Vec<i64> = dims.iter().map(|&v| v as i64).collect();
    let mut value: *mut OrtValue = ptr::null_mut();
    api.check((api.get().KernelContext_GetOutput)(context, index, dims.as_ptr(), dims.len(), &mut value))?;
    let mut data: *mut c_void = ptr::null_mut();
    api.check((api.get().GetTensorMutableData)(value, &mut data))?;
    Ok(data)
}

/// Output 0 = the rows `row(id, out)` writes for each id of input 0 (int64, any shape): [ids.., k]; an id outside
/// 0..n is refused by name. The embedding lookups of the heads stored in the core's layouts.
unsafe fn gather_rows(api: Api, context: *mut OrtKernelContext, op: &str, (n, k): (usize, usize), row: impl Fn(usize, &mut [f32])) -> Result<(), OrtStatusPtr> {
    let (ids, dims) = input(api, context, 0, op)?;
    let count: usize = dims.iter().map(|&d| d.max(0) as usize).product();
    let mut out_dims: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
    out_dims.push(k);
    let out = output(api, context, 0, &out_dims)?;
    if count == 0 {
        return Ok(());
    }
    let ids = core::slice::from_raw_parts(ids.cast::<i64>(), count);
    let rows = core::slice::from_raw_parts_mut(out.cast::<f32>(), count * k);
    for (&id, out) in ids.iter().zip(rows.chunks_exact_mut(k)) {
        let Some(id) = usize::try_from(id).ok().filter(|&i| i < n) else {
            return Err(api.error(&format!("{op}: an id is outside 0..{n}")));
        };
        row(id, out);
    }
    Ok(())
}

/// Runs `task(i)` for i in 0..tasks on the session's intra-op pool (inline when there is one task).
unsafe fn parallel<F: Fn(usize) + Sync>(api: Api, context: *mut OrtKernelContext, tasks: usize, task: F) -> Result<(), OrtStatusPtr> {
    unsafe extern "C" fn trampoline<F: Fn(usize) + Sync>(data: *mut c_void, i: usize) {
        (*data.cast::<F>())(i);
    }
    if tasks <= 1 {
        task(0);
        return Ok(());
    }
    let data = (&task as *const F).cast_mut().cast::<c_void>();
    api.check((api.get().KernelContext_ParallelFor)(context, trampoline::<F>, tasks, 0, data))
}

/// A SkipSimplifiedLayerNormalization folded into the linear after it (Q4Linear, Q8Linear): its other inputs and
/// its residual output for one call. The sum of squares is taken as ONNX Runtime's kernel takes it (one element at
/// a time, each square rounded before it is added), so the normalized rows have its bits.
struct SkipNorm {
    skip: *const f32,
    gamma: *const f32,
    /// Output 1 (s = x + skip), or null when the node does not ask for it.
    residual: *mut f32,
    epsilon: f32,
}

impl SkipNorm {
    /// The node's `epsilon` attribute: present where a norm is folded in.
    unsafe fn epsilon(api: Api, info: *const OrtKernelInfo) -> Option<f32> {
        let mut epsilon = 0f32;
        let status = (api.get().KernelInfoGetAttribute_float)(info, c"epsilon".as_ptr(), &mut epsilon);
        if status.0.is_null() {
            Some(epsilon)
        } else {
            (api.get().ReleaseStatus)(status.0);
            None
        }
    }

    /// This call's skip (input 4), gamma (input 5) and residual output (output 1, where the node has it) for a
    /// linear of K = `k` whose node folds a norm (`epsilon`), else None.
    unsafe fn of_call(api: Api, context: *mut OrtKernelContext, op: &str, k: usize, epsilon: Option<f32>) -> Result<Option<SkipNorm>, OrtStatusPtr> {
        let Some(epsilon) = epsilon else {
            return Ok(None);
        };
        let (_, x_dims) = input(api, context, 0, op)?;
        let (skip, skip_dims) = input(api, context, 4, op)?;
        let (gamma, gamma_dims) = input(api, context, 5, op)?;
        if skip_dims != x_dims || x_dims.last().copied() != Some(k as i64) {
            return Err(api.error(&format!("{op}: skip must have the input's shape [.., {k}]")));
        }
        if gamma_dims.iter().product::<i64>() != k as i64 {
            return Err(api.error(&format!("{op}: gamma must hold {k} values")));
        }
        let mut outputs = 0usize;
        api.check((api.get().KernelContext_GetOutputCount)(context, &mut outputs))?;
        let residual = if outputs > 1 {
            let dims: Vec<usize> = x_dims.iter().map(|&d| d.max(0) as usize).collect();
            output(api, context, 1, &dims)?.cast::<f32>()
        } else {
            core::ptr::null_mut()
        };
        Ok(Some(SkipNorm { skip: skip.cast::<f32>().cast_const(), gamma: gamma.cast::<f32>().cast_const(), residual, epsilon }))
    }

    /// `apply` as a linear's activation (`run_linear` / `linear_io` call it on this call's input 0).
    fn activation(&self) -> impl Fn(&[f32], usize, &mut [f32]) + '_ {
        // SAFETY: the linear passes its input 0, whose shape `of_call` checked skip's and the residual's against.
        move |x, k, out| unsafe { self.apply(x, k, out) }
    }

    /// out = the normalized rows of x + skip (x [M, k]), and the residual output = x + skip where asked for.
    ///
    /// # Safety
    /// skip (and the residual output) hold x.len() values and gamma k, as `of_call` checked for input 0.
    unsafe fn apply(&self, x: &[f32], k: usize, out: &mut [f32]) {
        let skip = core::slice::from_raw_parts(self.skip, x.len());
        let gamma = core::slice::from_raw_parts(self.gamma, k);
        for (row, ((xr, sr), or)) in x.chunks_exact(k).zip(skip.chunks_exact(k)).zip(out.chunks_exact_mut(k)).enumerate() {
            let mut squares = 0f32;
            for ((o, &a), &b) in or.iter_mut().zip(xr).zip(sr) {
                let v = a + b;
                *o = v;
                squares += v * v; // rounded, then added: ONNX Runtime's loop (no fused multiply-add)
            }
            if !self.residual.is_null() {
                core::slice::from_raw_parts_mut(self.residual.add(row * k), k).copy_from_slice(or);
            }
            let scale = (squares / k as f32 + self.epsilon).sqrt();
            for (o, &g) in or.iter_mut().zip(gamma) {
                *o = *o / scale * g;
            }
        }
    }
}

/// Output columns per parallel task of an fp32-activation linear, at least: small enough to balance two busy
/// cores, large enough that the per-task cost (an atomic claim and a call) stays negligible.
const MIN_CHUNK: usize = 32;

/// y[M, N] computed by `cols(x, y, range)` over at most `max_tasks` disjoint column ranges on the intra-op pool:
/// the split the fp32-activation linears (Q4Linear, Q8Linear) use.
unsafe fn split_columns<F: Fn(*const f32, *mut f32, Range<usize>) + Sync>(
    api: Api,
    context: *mut OrtKernelContext,
    (x, m, n, y): (*const f32, usize, usize, *mut f32),
    max_tasks: usize,
    cols: F,
) -> Result<(), OrtStatusPtr> {
    // Prompts (many x rows): wider tasks, so each task streams x through its column panels fewer times.
    let min_chunk = if m > 16 { 8 * MIN_CHUNK } else { MIN_CHUNK };
    let (chunk, tasks) = column_chunks(n, min_chunk, max_tasks);
    let (x, y) = (SharedIn(x), SharedOut(y));
    parallel(api, context, tasks, move |task| cols(x.ptr(), y.ptr(), task * chunk..((task + 1) * chunk).min(n)))
}

/// A kernel's weights with their block scales as stored (fp32 or fp16; `by_scale!` runs code on either).
enum ByScale<A, B> {
    F32(A),
    F16(B),
}

impl<A, B> ByScale<A, B> {
    /// The fp16 form where input 2 (the block scales) is fp16, else the fp32 one.
    unsafe fn load(
        api: Api,
        info: *const OrtKernelInfo,
        op: &str,
        full: impl FnOnce() -> Result<A, OrtStatusPtr>,
        half: impl FnOnce() -> Result<B, OrtStatusPtr>,
    ) -> Result<Self, OrtStatusPtr> {
        Self::load_at(api, info, 2, op, full, half)
    }

    /// As `load`, with the block scales at input `index`.
    unsafe fn load_at(
        api: Api,
        info: *const OrtKernelInfo,
        index: usize,
        op: &str,
        full: impl FnOnce() -> Result<A, OrtStatusPtr>,
        half: impl FnOnce() -> Result<B, OrtStatusPtr>,
    ) -> Result<Self, OrtStatusPtr> {
        Ok(if half_input(api, info, index, op)? { ByScale::F16(half()?) } else { ByScale::F32(full()?) })
    }
}

/// What a linear does to its input rows first: x[M, width] -> [M, k] (SwiGLU, a folded norm).
type Activate<'a> = &'a dyn Fn(&[f32], usize, &mut [f32]);

/// A linear's input: input 0 as stored, or what `activate` made of it.
enum LinearInput {
    Stored(*const f32),
    Activated(Vec<f32>),
}

impl LinearInput {
    fn ptr(&self) -> *const f32 {
        match self {
            LinearInput::Stored(p) => *p,
            LinearInput::Activated(v) => v.as_ptr(),
        }
    }
}

/// Input 0 ([.., width]) through `activate` (x[M, width] -> [M, k]) when given, and output 0 ([.., N]):
/// (x [M, k], M, y [M, N]), or None when M is 0.
unsafe fn linear_io(
    api: Api,
    context: *mut OrtKernelContext,
    op: &str,
    (width, k, n): (usize, usize, usize),
    activate: Option<Activate<'_>>,
) -> Result<Option<(LinearInput, usize, *mut f32)>, OrtStatusPtr> {
    let (x, m, y) = row_io(api, context, width, n, op)?;
    if m == 0 {
        return Ok(None);
    }
    let x = match activate {
        Some(f) => {
            let mut out = vec![0.0f32; m * k];
            f(core::slice::from_raw_parts(x, m * width), k, &mut out);
            LinearInput::Activated(out)
        }
        None => LinearInput::Stored(x),
    };
    Ok(Some((x, m, y)))
}

/// An fp32-activation linear: `linear_io`, then y[M, N] by `cols(x, m, y, range)` over column ranges on the
/// intra-op pool (Q4Linear, Q8Linear).
unsafe fn run_linear<F: Fn(*const f32, usize, *mut f32, Range<usize>) + Sync>(
    api: Api,
    context: *mut OrtKernelContext,
    op: &str,
    shape: (usize, usize, usize),
    activate: Option<Activate<'_>>,
    cols: F,
) -> Result<(), OrtStatusPtr> {
    let Some((x, m, y)) = linear_io(api, context, op, shape, activate)? else {
        return Ok(());
    };
    // SAFETY (callers): each task writes its own columns of y; x and y have the sizes row_io checked.
    split_columns(api, context, (x.ptr(), m, shape.2, y), usize::MAX, move |x, y, range| cols(x, m, y, range))
}

/// Column ranges for `parallel`: at most `max_tasks` chunks of a multiple of 16 columns, at least `min`.
fn column_chunks(n: usize, min: usize, max_tasks: usize) -> (usize, usize) {
    let chunk = n.div_ceil(max_tasks).max(min).next_multiple_of(16);
    (chunk, n.div_ceil(chunk))
}

/// Raw pointers crossing into pool threads: tasks read the same input and write their own output columns.
#[derive(Clone, Copy)]
struct SharedIn(*const f32);
unsafe impl Send for SharedIn {}
unsafe impl Sync for SharedIn {}

#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

// Methods, not field access, so closures capture the Sync wrapper rather than the bare pointer.
impl SharedIn {
    fn ptr(self) -> *const f32 {
        self.0
    }
}

impl SharedOut {
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

fn detect() -> Isa {
    Isa::detect()
}
