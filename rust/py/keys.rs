//! Python face of `keys`: conversion and error mapping only. Calls take well
//! under a microsecond, so the GIL is kept (releasing it costs more).
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::keys::{self, KeyError, KeyKind};
use crate::py::errors::KeyFormatError;

fn err(e: KeyError) -> PyErr {
    KeyFormatError::new_err(e.to_string())
}

fn kind_arg(kind: &str) -> PyResult<KeyKind> {
    KeyKind::parse(kind).ok_or_else(|| err(KeyError::UnknownKind))
}

/// The key as UTF-8. A str that has none (lone surrogates) is not a key;
/// the message says so without quoting it.
fn key_str<'a>(key: &'a Bound<'_, PyString>) -> Option<&'a str> {
    key.to_str().ok()
}

fn key_required<'a>(key: &'a Bound<'_, PyString>) -> PyResult<&'a str> {
    key_str(key).ok_or_else(|| err(KeyError::Malformed))
}

#[pyfunction]
fn generate_key(kind: &str) -> PyResult<String> {
    keys::generate(kind_arg(kind)?).map_err(err)
}

#[pyfunction]
#[pyo3(signature = (key, *, kind = None))]
fn check_key(key: &Bound<'_, PyString>, kind: Option<&str>) -> PyResult<bool> {
    let kind = kind.map(kind_arg).transpose()?;
    Ok(key_str(key).is_some_and(|k| keys::check(k, kind)))
}

#[pyfunction]
fn key_kind(key: &Bound<'_, PyString>) -> Option<&'static str> {
    key_str(key).and_then(keys::kind_of).map(KeyKind::as_str)
}

#[pyfunction]
fn hash_key<'py>(key: &Bound<'py, PyString>, pepper: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    let digest = keys::hash(key_required(key)?, pepper).map_err(err)?;
    Ok(PyBytes::new(key.py(), &digest))
}

#[pyfunction]
fn verify_key(key: &Bound<'_, PyString>, pepper: &[u8], expected_hash: &[u8]) -> PyResult<bool> {
    keys::verify(key_required(key)?, pepper, expected_hash).map_err(err)
}

#[pyfunction]
fn key_hint(key: &Bound<'_, PyString>) -> PyResult<String> {
    keys::hint(key_required(key)?).map_err(err)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(generate_key, m)?)?;
    m.add_function(wrap_pyfunction!(check_key, m)?)?;
    m.add_function(wrap_pyfunction!(key_kind, m)?)?;
    m.add_function(wrap_pyfunction!(hash_key, m)?)?;
    m.add_function(wrap_pyfunction!(verify_key, m)?)?;
    m.add_function(wrap_pyfunction!(key_hint, m)?)?;
    Ok(())
}
