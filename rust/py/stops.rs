//! Python face of `stops`: conversion and error mapping only. A push is a
//! few transitions per byte of one token's text, so the GIL is kept.
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::py::errors::StopStringError;
use crate::stops;

/// The text as UTF-8; a str holding lone surrogates has none, and the
/// message says so without quoting it.
fn utf8<'a>(text: &'a Bound<'_, PyString>, what: &str) -> PyResult<&'a str> {
    text.to_str().map_err(|_| StopStringError::new_err(format!("{what} is not valid Unicode (it contains a lone surrogate)")))
}

/// One completion's stop strings over its streamed text.
#[pyclass(module = "cheapest_core._cheapest_core", name = "StopMatcher")]
pub struct PyStopMatcher {
    inner: stops::StopMatcher,
}

#[pymethods]
impl PyStopMatcher {
    #[new]
    fn new(stops: Vec<Bound<'_, PyString>>) -> PyResult<Self> {
        if stops.len() > stops::MAX_STOPS {
            return Err(StopStringError::new_err(stops::StopError::TooMany { count: stops.len() }.to_string()));
        }
        let texts = stops
            .iter()
            .enumerate()
            .map(|(i, s)| utf8(s, &format!("stop string {i}")))
            .collect::<PyResult<Vec<&str>>>()?;
        let inner = stops::StopMatcher::new(&texts).map_err(|e| StopStringError::new_err(e.to_string()))?;
        Ok(PyStopMatcher { inner })
    }

    fn push(&mut self, text: &Bound<'_, PyString>) -> PyResult<(String, bool)> {
        Ok(self.inner.push(utf8(text, "text")?))
    }

    /// The latest stop string found, if any.
    #[getter]
    fn matched(&self) -> Option<&str> {
        self.inner.matched()
    }

    fn flush(&mut self) -> String {
        self.inner.flush()
    }

    #[classattr]
    const MAX_STOPS: usize = stops::MAX_STOPS;

    #[classattr]
    const MAX_STOP_CHARS: usize = stops::MAX_STOP_CHARS;
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyStopMatcher>()
}
