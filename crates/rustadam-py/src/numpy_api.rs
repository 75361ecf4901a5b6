//! The numpy entry points of `rustadam._core` (no torch needed).

use pyo3::prelude::*;

/// Adds the numpy functions to the module.
pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
