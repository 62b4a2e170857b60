//! Python face of `sampling`: buffers in, the GIL released for the passes
//! over the vocabulary, errors mapped.
//!
//! The logits and the mask are read in place through the buffer protocol
//! (no copy) while the GIL is released, as numpy's own loops do: the caller
//! must not write them from another thread during the call.
use pyo3::buffer::PyBuffer;
use pyo3::prelude::*;
use pyo3::types::PyInt;

use crate::py::errors::SamplerError;
use crate::sampling::{self, SampleError};

fn err(e: SampleError) -> PyErr {
    SamplerError::new_err(e.to_string())
}

/// A contiguous 1-D buffer's items, readable without the GIL.
fn items<'b, T: pyo3::buffer::Element>(buf: &'b PyBuffer<T>, what: &str) -> PyResult<&'b [T]> {
    if buf.dimensions() != 1 || !buf.is_c_contiguous() {
        return Err(SamplerError::new_err(format!("{what} must be a contiguous 1-D buffer")));
    }
    if buf.item_count() == 0 {
        return Ok(&[]);
    }
    // SAFETY: `PyBuffer::get` checked the item type, size and alignment; the
    // buffer is contiguous with `item_count` items and stays valid while
    // `buf` holds it, which the slice's lifetime ties it to.
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const T, buf.item_count()) })
}

fn logits_buffer(logits: &Bound<'_, PyAny>) -> PyResult<PyBuffer<f32>> {
    PyBuffer::<f32>::get(logits)
        .map_err(|_| SamplerError::new_err("logits must be a float32 buffer (e.g. a numpy array of dtype float32)"))
}

/// A bitmask of 32-bit words, signed (as constrained-decoding libraries
/// make them) or unsigned.
enum MaskBuffer {
    Unsigned(PyBuffer<u32>),
    Signed(PyBuffer<i32>),
}

impl MaskBuffer {
    fn get(mask: &Bound<'_, PyAny>) -> PyResult<MaskBuffer> {
        if let Ok(b) = PyBuffer::<u32>::get(mask) {
            return Ok(MaskBuffer::Unsigned(b));
        }
        PyBuffer::<i32>::get(mask)
            .map(MaskBuffer::Signed)
            .map_err(|_| SamplerError::new_err("allowed must be a buffer of 32-bit words (uint32 or int32)"))
    }

    fn words(&self) -> PyResult<&[u32]> {
        match self {
            MaskBuffer::Unsigned(b) => items(b, "allowed"),
            // SAFETY: i32 and u32 have the same size and alignment; the bits are what matter.
            MaskBuffer::Signed(b) => items(b, "allowed").map(|w| unsafe { &*(w as *const [i32] as *const [u32]) }),
        }
    }
}

fn nonnegative(value: &Bound<'_, PyInt>, what: &str) -> PyResult<u64> {
    value.extract::<u64>().map_err(|_| SamplerError::new_err(format!("{what} must be an integer between 0 and 2**64 - 1")))
}

/// Next-token choice for one sequence: greedy, temperature, top-k, top-p,
/// an allowed-token mask; seeded draws are reproducible.
#[pyclass(module = "cheapest_core._cheapest_core", name = "Sampler")]
pub struct PySampler {
    inner: sampling::Sampler,
}

#[pymethods]
impl PySampler {
    #[new]
    #[pyo3(signature = (temperature = 1.0, top_p = 1.0, top_k = 0, seed = None))]
    fn new(temperature: f64, top_p: f64, top_k: i64, seed: Option<&Bound<'_, PyInt>>) -> PyResult<Self> {
        let top_k = u64::try_from(top_k).map_err(|_| SamplerError::new_err("top_k must be >= 0 (0: off)"))?;
        let seed = seed.map(|s| nonnegative(s, "seed")).transpose()?;
        Ok(PySampler { inner: sampling::Sampler::new(temperature, top_p, top_k, seed).map_err(err)? })
    }

    #[getter]
    fn greedy(&self) -> bool {
        self.inner.greedy()
    }

    #[pyo3(signature = (logits, allowed = None))]
    fn sample(&mut self, py: Python<'_>, logits: &Bound<'_, PyAny>, allowed: Option<&Bound<'_, PyAny>>) -> PyResult<u32> {
        let logits_buf = logits_buffer(logits)?;
        let mask_buf = allowed.map(MaskBuffer::get).transpose()?;
        let xs = items(&logits_buf, "logits")?;
        let bits = mask_buf.as_ref().map(MaskBuffer::words).transpose()?;
        let inner = &mut self.inner;
        py.detach(|| inner.sample(xs, bits)).map_err(err)
    }

    #[pyo3(signature = (logits, token, top_n = 0))]
    fn logprobs(
        &self,
        py: Python<'_>,
        logits: &Bound<'_, PyAny>,
        token: &Bound<'_, PyInt>,
        top_n: i64,
    ) -> PyResult<(f64, Vec<(u32, f64)>)> {
        let logits_buf = logits_buffer(logits)?;
        let xs = items(&logits_buf, "logits")?;
        let token = token.extract::<u64>().map_err(|_| SamplerError::new_err("token must be an index into the logits"))?;
        let top_n = usize::try_from(top_n).map_err(|_| SamplerError::new_err("top_n must be >= 0"))?;
        py.detach(|| sampling::logprobs(xs, token, top_n)).map_err(err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PySampler>()
}
