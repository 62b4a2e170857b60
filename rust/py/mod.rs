//! PyO3 wrappers: argument conversion, GIL release and error mapping only.
pub mod engine;
pub mod errors;
pub mod keys;
pub mod ratelimit;
pub mod sampling;
pub mod sse;
pub mod stops;
pub mod tokens;
