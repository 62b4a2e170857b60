//! Python exceptions of the core. Each subclasses the builtin whose meaning
//! it shares, so callers can catch `ValueError` / `OSError` as usual.
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(cheapest_core, KeyFormatError, PyValueError, "An API key kind, key or pepper is malformed.");
create_exception!(cheapest_core, TokenizerError, PyValueError, "A tokenizer file is invalid, or ids are out of range.");
create_exception!(cheapest_core, RateLimiterError, PyOSError, "The shared rate-limit table cannot be opened or is full.");
create_exception!(cheapest_core, SseError, PyValueError, "An SSE event cannot be framed (bad finish reason, object kind, ...).");

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KeyFormatError", py.get_type::<KeyFormatError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("RateLimiterError", py.get_type::<RateLimiterError>())?;
    m.add("SseError", py.get_type::<SseError>())?;
    Ok(())
}
