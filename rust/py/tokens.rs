//! Python face of `tokens`: conversion, GIL release and error mapping only.
//!
//! Texts are borrowed from the Python strings (no copy) and counted with the
//! GIL released when they are long enough for that to pay; a batch is
//! borrowed as `PyBackedStr`s so it can be counted on rayon's threads.
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedStr;
use pyo3::types::{PyBytes, PyString};
use std::path::PathBuf;
use std::sync::Arc;

use crate::py::errors::TokenizerError;
use crate::tokens;

/// Below this many bytes, releasing and re-taking the GIL costs more than
/// counting.
const DETACH_MIN: usize = 4096;

fn err(e: tokens::TokenizerError) -> PyErr {
    TokenizerError::new_err(e.0)
}

/// The text as UTF-8; a str holding lone surrogates has none, and the error
/// says so without quoting it.
fn text_str<'a>(text: &'a Bound<'_, PyString>) -> PyResult<&'a str> {
    text.to_str()
        .map_err(|_| TokenizerError::new_err("text is not valid Unicode (it contains a lone surrogate)"))
}

fn ids_u32(ids: Vec<i64>, vocab_size: usize) -> PyResult<Vec<u32>> {
    ids.into_iter()
        .map(|id| {
            u32::try_from(id).map_err(|_| {
                TokenizerError::new_err(format!("token id {id} is not in the vocabulary (size {vocab_size})"))
            })
        })
        .collect()
}

/// A Hugging Face `tokenizer.json`: counts equal the `tokenizers` package's
/// `len(encode(text).ids)`.
#[pyclass(module = "cheapest_core._cheapest_core", name = "Tokenizer", frozen)]
pub struct PyTokenizer {
    inner: Arc<tokens::Tokenizer>,
}

#[pymethods]
impl PyTokenizer {
    #[staticmethod]
    fn from_file(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let tk = py.detach(|| tokens::Tokenizer::from_file(&path)).map_err(err)?;
        Ok(PyTokenizer { inner: Arc::new(tk) })
    }

    #[staticmethod]
    fn from_str(py: Python<'_>, json: &str) -> PyResult<Self> {
        let tk = py.detach(|| tokens::Tokenizer::from_str(json)).map_err(err)?;
        Ok(PyTokenizer { inner: Arc::new(tk) })
    }

    fn count(&self, py: Python<'_>, text: &Bound<'_, PyString>) -> PyResult<usize> {
        let text = text_str(text)?;
        if text.len() < DETACH_MIN {
            return Ok(self.inner.count(text));
        }
        Ok(py.detach(|| self.inner.count(text)))
    }

    fn count_batch(&self, py: Python<'_>, texts: Vec<Bound<'_, PyString>>) -> PyResult<Vec<usize>> {
        let texts: Vec<PyBackedStr> = texts
            .into_iter()
            .map(|t| {
                PyBackedStr::try_from(t).map_err(|_| {
                    TokenizerError::new_err("text is not valid Unicode (it contains a lone surrogate)")
                })
            })
            .collect::<PyResult<_>>()?;
        Ok(py.detach(|| self.inner.count_batch(&texts)))
    }

    #[pyo3(signature = (text, add_special_tokens = true))]
    fn encode(&self, py: Python<'_>, text: &Bound<'_, PyString>, add_special_tokens: bool) -> PyResult<Vec<u32>> {
        let text = text_str(text)?;
        if text.len() < DETACH_MIN {
            return Ok(self.inner.encode(text, add_special_tokens));
        }
        Ok(py.detach(|| self.inner.encode(text, add_special_tokens)))
    }

    #[pyo3(signature = (ids, skip_special_tokens = false))]
    fn decode(&self, py: Python<'_>, ids: Vec<i64>, skip_special_tokens: bool) -> PyResult<String> {
        let ids = ids_u32(ids, self.inner.vocab_size())?;
        py.detach(|| self.inner.decode(&ids, skip_special_tokens)).map_err(err)
    }

    fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    fn id_to_token(&self, id: i64) -> Option<String> {
        u32::try_from(id).ok().and_then(|id| self.inner.id_to_token(id))
    }

    /// The bytes one token stands for in decoded text, where the tokenizer's shape says so exactly (byte-level
    /// BPE, SentencePiece BPE); None for other shapes.
    fn token_bytes<'py>(&self, py: Python<'py>, id: i64) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let id = ids_u32(vec![id], self.inner.vocab_size())?[0];
        Ok(self.inner.token_bytes(id).map_err(err)?.map(|b| PyBytes::new(py, &b)))
    }

    #[pyo3(signature = (skip_special_tokens = false))]
    fn decoder(&self, skip_special_tokens: bool) -> PyIncrementalDecoder {
        PyIncrementalDecoder { inner: self.inner.decoder(skip_special_tokens) }
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }

    /// True when counting uses one of the exact fast paths (byte-level BPE, or
    /// SentencePiece BPE read without the crate) rather than the `tokenizers` crate.
    #[getter]
    fn fast_path(&self) -> bool {
        self.inner.fast_path()
    }

    fn __repr__(&self) -> String {
        format!(
            "Tokenizer(vocab_size={}, fast_path={})",
            self.inner.vocab_size(),
            if self.inner.fast_path() { "True" } else { "False" }
        )
    }
}

/// Streaming detokenization: never emits half of a UTF-8 character; all
/// `push` results plus `flush()` equal `Tokenizer.decode` of all the ids.
#[pyclass(module = "cheapest_core._cheapest_core", name = "IncrementalDecoder")]
pub struct PyIncrementalDecoder {
    inner: tokens::IncrementalDecoder,
}

#[pymethods]
impl PyIncrementalDecoder {
    fn push(&mut self, id: i64) -> PyResult<String> {
        let id = ids_u32(vec![id], usize::MAX)
            .map_err(|_| TokenizerError::new_err(format!("token id {id} is not in the vocabulary")))?;
        self.inner.push_many(&id).map_err(err)
    }

    fn push_many(&mut self, ids: Vec<i64>) -> PyResult<String> {
        let ids = ids_u32(ids, usize::MAX)
            .map_err(|_| TokenizerError::new_err("a token id is not in the vocabulary"))?;
        self.inner.push_many(&ids).map_err(err)
    }

    fn flush(&mut self) -> PyResult<String> {
        self.inner.flush().map_err(err)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyTokenizer>()?;
    m.add_class::<PyIncrementalDecoder>()?;
    Ok(())
}
