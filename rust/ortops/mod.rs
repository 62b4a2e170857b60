//! ONNX Runtime custom operators (domain `cheapest`), registered through ONNX Runtime's custom-op library
//! interface: `SessionOptions.register_custom_ops_library(<this library>)` calls `RegisterCustomOps`.
//!
//! The core's own shared library exports it, so the Python service needs no second binary: it passes the
//! path of the `_cheapest_core` extension module it already imported. Nothing here links against ONNX
//! Runtime; every call goes through the `OrtApi` table the runtime hands over (C API version 17, i.e.
//! ONNX Runtime 1.17 or newer).
//!
//! Operators:
//!   Q4Linear   fp32 x [.., K] times a 4-bit block-quantized weight (kernels::q4), optionally with SwiGLU
//!              applied to x first; parallel over output columns on ONNX Runtime's own intra-op pool.

mod q4_linear;

use core::ffi::{c_char, CStr};
use core::ptr;
use std::sync::OnceLock;

use ort_sys::{OrtApi, OrtApiBase, OrtCustomOpDomain, OrtErrorCode, OrtSessionOptions, OrtStatusPtr};

pub const DOMAIN: &CStr = c"cheapest";
const API_VERSION: u32 = 17;

/// The C API table, valid for the life of the process once ONNX Runtime has handed it over.
#[derive(Clone, Copy)]
pub(crate) struct Api(&'static OrtApi);

impl Api {
    pub(crate) fn get(&self) -> &'static OrtApi {
        self.0
    }

    /// An ONNX Runtime error status carrying `message` (operator and shape facts only, never data).
    pub(crate) fn error(&self, message: &str) -> OrtStatusPtr {
        let text = std::ffi::CString::new(message).unwrap_or_else(|_| c"cheapest op error".into());
        // SAFETY: CreateStatus copies the message.
        unsafe { (self.0.CreateStatus)(OrtErrorCode::ORT_RUNTIME_EXCEPTION, text.as_ptr()) }
    }

    /// Ok(()) for a null status; otherwise the status itself, to be returned to ONNX Runtime.
    pub(crate) fn check(&self, status: OrtStatusPtr) -> Result<(), OrtStatusPtr> {
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
            let message = message_of(api, status);
            return Err(message);
        }
        for op in q4_linear::OPS {
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
