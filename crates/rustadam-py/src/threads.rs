//! How a step runs: thread count, thread pool and SIMD level, with their environment defaults.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyInt};
use rustadam::{ExecOptions, ForkJoin, SimdLevel};

use crate::openmp;

/// An environment variable, non-empty, as an owned string.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The options of a call: `pool` ("openmp" or "rayon") and `simd` ("portable", "avx2",
/// "avx512") default to `RUSTADAM_THREAD_POOL` and `RUSTADAM_SIMD`, then to OpenMP where the
/// process has it and the best level of the CPU.
pub(crate) fn options(
    num_threads: usize,
    pool: Option<&str>,
    simd: Option<&str>,
) -> PyResult<ExecOptions> {
    let (pool_env, simd_env) = (env("RUSTADAM_THREAD_POOL"), env("RUSTADAM_SIMD"));
    let pool = pool.or(pool_env.as_deref());
    let simd = simd.or(simd_env.as_deref());
    let opts = ExecOptions {
        num_threads,
        simd: simd.map(parse_simd).transpose()?,
        fork_join: parse_pool(pool)?,
        ..ExecOptions::default()
    };
    opts.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(opts)
}

/// A `num_threads` argument: an int from 1 to [`rustadam::max_threads`]; `ValueError` naming it
/// otherwise (not the `OverflowError` of a negative or huge value, nor 0 taken as 1).
pub(crate) fn count(obj: &Bound<'_, PyAny>) -> PyResult<usize> {
    let max = rustadam::max_threads();
    let n = match obj.cast::<PyInt>() {
        Ok(i) if !obj.is_instance_of::<PyBool>() => i.extract::<i64>().unwrap_or(i64::MIN),
        _ => {
            return Err(PyValueError::new_err(format!(
                "num_threads must be an int from 1 to {max}, not {}",
                obj.get_type().name()?
            )))
        }
    };
    match usize::try_from(n) {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(PyValueError::new_err(format!(
            "num_threads must be an int from 1 to {max}, got {obj}"
        ))),
    }
}

/// The thread pool by name: "openmp" (torch's OpenMP threads), "rayon" (the core's own), or
/// `None` for OpenMP where the process may use it, else rayon.
fn parse_pool(name: Option<&str>) -> PyResult<Option<ForkJoin>> {
    let openmp = openmp::fork_join as ForkJoin;
    match name {
        None => Ok(openmp::available().then_some(openmp)),
        Some("rayon") => Ok(None),
        Some("openmp") if openmp::available() => Ok(Some(openmp)),
        // A child made by fork() inherits the setting, not a usable team: the core's own pool.
        Some("openmp") if openmp::forked() => Ok(None),
        Some("openmp") => Err(PyValueError::new_err(
            "thread pool 'openmp': no usable OpenMP runtime in this process (none is loaded, \
             or this is a child made by fork())",
        )),
        Some(other) => Err(PyValueError::new_err(format!(
            "unknown thread pool {other:?} (RUSTADAM_THREAD_POOL); expected 'openmp' or 'rayon'"
        ))),
    }
}

fn parse_simd(name: &str) -> PyResult<SimdLevel> {
    match SimdLevel::from_name(name) {
        Some(l) if l.is_available() => Ok(l),
        Some(_) => Err(PyValueError::new_err(format!(
            "SIMD level {name:?} (RUSTADAM_SIMD) is not available on this CPU"
        ))),
        None => Err(PyValueError::new_err(format!(
            "unknown SIMD level {name:?} (RUSTADAM_SIMD); expected 'portable', 'avx2' or 'avx512'"
        ))),
    }
}
