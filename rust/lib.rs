//! cheapest_core: the per-request hot work of the cheapest service.
//!
//! Each concern is plain Rust in its own module, unit-tested without Python.
//! The PyO3 layer lives in `py/` and is compiled only with the `python`
//! feature (maturin turns it on), so `cargo test` needs no interpreter.

pub mod kernels;
pub mod keys;
pub mod ortops;
pub mod ratelimit;
pub mod sampling;
pub mod sse;
pub mod stops;
pub mod tokens;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
use pyo3::prelude::*;

#[cfg(feature = "python")]
#[pymodule]
fn _cheapest_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    py::errors::register(m)?;
    py::engine::register(m)?;
    py::keys::register(m)?;
    py::tokens::register(m)?;
    py::ratelimit::register(m)?;
    py::sse::register(m)?;
    py::stops::register(m)?;
    py::sampling::register(m)?;
    Ok(())
}
