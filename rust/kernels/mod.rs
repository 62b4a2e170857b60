//! Numeric kernels the model graph calls through ONNX Runtime custom operators (`ortops`).
//!
//! Plain Rust with runtime CPU-feature dispatch (AVX-512, AVX2+FMA, portable), unit-tested
//! against straightforward scalar arithmetic without ONNX Runtime.

pub mod q4;
pub mod q8;
