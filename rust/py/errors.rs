//! Python exceptions of the core. Each subclasses the builtin whose meaning
//! it shares, so callers can catch `ValueError` / `OSError` as usual.
use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(cheapest_core, KeyFormatError, PyValueError, "An API key kind, key or pepper is malformed.");
create_exception!(cheapest_core, TokenizerError, PyValueError, "A tokenizer file is invalid, or ids are out of range.");
create_exception!(cheapest_core, RateLimiterError, PyOSError, "The shared rate-limit table cannot be opened or used.");
create_exception!(
    cheapest_core,
    RateLimiterFull,
    RateLimiterError,
    "Every slot of the rate-limit table a key may use holds a live limit: answer 503, retry later."
);
create_exception!(cheapest_core, SseError, PyValueError, "An SSE event cannot be framed (bad finish reason, object kind, ...).");
create_exception!(
    cheapest_core,
    StopStringError,
    PyValueError,
    "Too many or too long stop strings, or text that is not valid Unicode; the message never quotes them."
);
create_exception!(
    cheapest_core,
    SamplerError,
    PyValueError,
    "A sampling parameter or a logits/mask buffer is invalid (NaN logits, nothing allowed, bad dtype, ...)."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("KeyFormatError", py.get_type::<KeyFormatError>())?;
    m.add("TokenizerError", py.get_type::<TokenizerError>())?;
    m.add("RateLimiterError", py.get_type::<RateLimiterError>())?;
    m.add("RateLimiterFull", py.get_type::<RateLimiterFull>())?;
    m.add("SseError", py.get_type::<SseError>())?;
    m.add("StopStringError", py.get_type::<StopStringError>())?;
    m.add("SamplerError", py.get_type::<SamplerError>())?;
    Ok(())
}
