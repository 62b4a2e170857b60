//! Python face of `sse`: every event is built in a per-thread buffer and
//! copied once into the `bytes` handed to Granian; no dict, no str.
use std::cell::RefCell;

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::py::errors::SseError;
use crate::sse::{self, Framer, ObjectKind};

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(4096));
}

fn emit<'py>(
    py: Python<'py>,
    write: impl FnOnce(&mut Vec<u8>) -> Result<(), sse::SseError>,
) -> PyResult<Bound<'py, PyBytes>> {
    BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        write(&mut buf).map_err(|e| SseError::new_err(e.to_string()))?;
        let bytes = PyBytes::new(py, &buf);
        if buf.capacity() > 1 << 16 {
            // One huge chunk should not pin its buffer for the thread's life.
            *buf = Vec::with_capacity(4096);
        }
        Ok(bytes)
    })
}

/// The events of one streamed completion, as `data: {...}\n\n` bytes.
#[pyclass(frozen, module = "cheapest_core._cheapest_core")]
pub struct SseFramer {
    inner: Framer,
}

#[pymethods]
impl SseFramer {
    #[new]
    #[pyo3(signature = (id, model, created, object = "chat.completion.chunk"))]
    fn new(id: &str, model: &str, created: i64, object: &str) -> PyResult<Self> {
        let kind = ObjectKind::parse(object).ok_or_else(|| SseError::new_err(sse::SseError::UnknownObject.to_string()))?;
        Ok(SseFramer { inner: Framer::new(id, model, created, kind) })
    }

    #[getter]
    fn object(&self) -> &'static str {
        self.inner.kind().as_str()
    }

    fn role<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        emit(py, |out| self.inner.role(out))
    }

    fn delta<'py>(&self, py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyBytes>> {
        emit(py, |out| {
            self.inner.delta(out, text);
            Ok(())
        })
    }

    fn finish<'py>(&self, py: Python<'py>, reason: &str) -> PyResult<Bound<'py, PyBytes>> {
        emit(py, |out| self.inner.finish(out, reason))
    }

    fn usage<'py>(&self, py: Python<'py>, prompt_tokens: u64, completion_tokens: u64) -> PyResult<Bound<'py, PyBytes>> {
        emit(py, |out| {
            self.inner.usage(out, prompt_tokens, completion_tokens);
            Ok(())
        })
    }

    #[staticmethod]
    fn done(py: Python<'_>) -> Bound<'_, PyBytes> {
        PyBytes::new(py, sse::DONE)
    }

    #[pyo3(signature = (message, r#type, code = None))]
    fn error<'py>(&self, py: Python<'py>, message: &str, r#type: &str, code: Option<&str>) -> PyResult<Bound<'py, PyBytes>> {
        emit(py, |out| {
            sse::error_event(out, message, r#type, code);
            Ok(())
        })
    }
}

/// The JSON string literal, quotes included, that the framer writes for `text`.
#[pyfunction]
fn json_escape(text: &str) -> String {
    sse::escape(text)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SseFramer>()?;
    m.add_function(wrap_pyfunction!(json_escape, m)?)?;
    Ok(())
}
