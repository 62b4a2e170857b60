//! Python face of the ONNX Runtime operators' process-wide settings (rust/ortops).
use pyo3::prelude::*;

/// Whether operators created from now on copy their weights into transparent huge pages (ortops/pages.rs).
#[pyfunction]
fn set_huge_page_weights(on: bool) {
    crate::ortops::set_huge_pages(on);
}

/// Whether weights are being copied into huge pages: asked for and allowed by the kernel's THP mode.
#[pyfunction]
fn huge_page_weights() -> bool {
    crate::ortops::huge_pages_active()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(set_huge_page_weights, m)?)?;
    m.add_function(wrap_pyfunction!(huge_page_weights, m)?)?;
    Ok(())
}
