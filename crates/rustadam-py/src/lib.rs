//! `rustadam._core`: the Python extension over the rustadam core.
//!
//! Glue only, and the only code that turns foreign memory into slices: `plan` reads and checks
//! every buffer of a step (exact tensor types, device, dtype, shape, layout, storage bounds,
//! overlaps) and holds their storages; `Plan.execute` runs the core on them with the GIL
//! released. The numpy entry points live in `numpy_api`.

mod config;
mod dlpack;
mod gather;
mod numpy_api;
mod openmp;
mod plan;
mod prefetch;
mod registry;
mod tensor;
mod threads;

use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use rustadam::SimdLevel;

create_exception!(
    _core,
    StepError,
    PyRuntimeError,
    "A parameter the step cannot take: args are (group, index, kind, reason); nothing was written."
);

/// One Adam step over the tensors of one group: `plan` and `execute` in one call, refusing
/// (`StepError`) any parameter the core does not take. Every element of the lists must be
/// exactly a `torch.Tensor` or `torch.nn.Parameter` (TypeError otherwise); `steps[i]` is t after
/// this update.
#[pyfunction]
#[pyo3(signature = (
    params, grads, exp_avgs, exp_avg_sqs, steps, config, *, max_exp_avg_sqs=None,
    compensations=None, seeds=None, num_threads=None, pool=None, simd=None
))]
#[allow(clippy::too_many_arguments)]
fn adam_step<'py>(
    py: Python<'py>,
    params: Bound<'py, PyAny>,
    grads: Bound<'py, PyAny>,
    exp_avgs: Bound<'py, PyAny>,
    exp_avg_sqs: Bound<'py, PyAny>,
    steps: Bound<'py, PyAny>,
    config: Bound<'py, config::Config>,
    max_exp_avg_sqs: Option<Bound<'py, PyAny>>,
    compensations: Option<Bound<'py, PyAny>>,
    seeds: Option<Bound<'py, PyAny>>,
    num_threads: Option<Bound<'py, PyAny>>,
    pool: Option<&str>,
    simd: Option<&str>,
) -> PyResult<()> {
    // One thread unless asked.
    let num_threads = num_threads.as_ref().map_or(Ok(1), threads::count)?;
    let n = params.len()?;
    let seeds = match seeds {
        Some(s) => s,
        None => PyList::new(py, vec![0u64; n])?.into_any(),
    };
    let group = PyTuple::new(
        py,
        [
            config.into_any(),
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs.unwrap_or_else(|| py.None().into_bound(py)),
            compensations.unwrap_or_else(|| py.None().into_bound(py)),
            steps,
            seeds,
        ],
    )?;
    let groups = PyList::new(py, [group])?;
    let opts = threads::options(num_threads, pool, simd)?;
    // No collection (finalizers: any Python code) between the plan's checks and the writes;
    // `groups` holds every tensor until then.
    let _paused = tensor::NoCollection::enter(py, tensor::torch(py)?)?;
    let mut plan = plan::plan(py, groups, true)?;
    plan.run(py, opts, false, None)
}

/// `non_overlapping(shape, strides)`: whether no two elements of the view share memory, proven
/// as the core proves it before writing a buffer in place (`layout::is_non_overlapping`), so
/// that every path refuses the same views. ValueError where the lengths differ.
#[pyfunction]
fn non_overlapping(shape: Vec<usize>, strides: Vec<isize>) -> PyResult<bool> {
    if shape.len() != strides.len() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "non_overlapping: one stride per dimension",
        ));
    }
    Ok(rustadam::layout::is_non_overlapping(&shape, &strides))
}

/// The SIMD levels this CPU runs, from the slowest; the last is the one used by default.
#[pyfunction]
fn simd_levels(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    PyTuple::new(py, SimdLevel::available().into_iter().map(|l| l.name()))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    openmp::watch_fork();
    openmp::note_fork_worker(m.py());
    m.add_function(wrap_pyfunction!(plan::plan, m)?)?;
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(gather::step_plain, m)?)?;
    m.add_function(wrap_pyfunction!(gather::param_seed, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(non_overlapping, m)?)?;
    m.add_class::<plan::Plan>()?;
    m.add_class::<config::Config>()?;
    m.add("StepError", m.py().get_type::<StepError>())?;
    numpy_api::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
