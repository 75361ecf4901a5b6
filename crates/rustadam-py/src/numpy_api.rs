//! The numpy entry points of `rustadam._core` (no torch needed).
//!
//! `numpy_adam_step` updates one parameter's arrays in place, `numpy_adam_step_many` many in one
//! call. Each array is checked (an ndarray of float32 or float64, one dtype and shape per
//! parameter, C-contiguous, aligned), then borrowed through rust-numpy's borrow checker:
//! writable for the parameter and moments, read-only for the gradient. That refuses read-only
//! arrays and any array passed twice where one of the uses writes, before anything is written.
//! The kernel runs with the GIL released.

use crate::config::Config;
use numpy::prelude::*;
use numpy::{
    dtype, BorrowError, PyArrayDyn, PyReadonlyArrayDyn, PyReadwriteArrayDyn, PyUntypedArray,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use rustadam::{layout, AdamConfig, AnyTensor, ExecOptions, TensorRefs};

/// The arguments' names, in the order a parameter's arrays are checked and borrowed.
const NAMES: [&str; 4] = ["param", "grad", "exp_avg", "exp_avg_sq"];

/// How an argument is named in messages: `grad` in the one-parameter call, `grads[2]` in the
/// list call (the names of its arguments).
fn label(buffer: usize, index: Option<usize>) -> String {
    match index {
        None => NAMES[buffer].to_string(),
        Some(i) => format!("{}s[{i}]", NAMES[buffer]),
    }
}

/// A shape or strides as Python prints a tuple.
fn tuple_str<T: std::fmt::Display>(items: &[T]) -> String {
    match items {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            items
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F64,
}

/// Checks one argument and returns its dtype; `TypeError`/`ValueError` naming it otherwise.
fn check_array(obj: &Bound<'_, PyAny>, name: &str, written: bool) -> PyResult<DType> {
    let py = obj.py();
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray, not {}",
            obj.get_type().name()?
        )));
    };
    let dt = arr.dtype();
    let kind = if dt.is_equiv_to(&dtype::<f32>(py)) {
        DType::F32
    } else if dt.is_equiv_to(&dtype::<f64>(py)) {
        DType::F64
    } else {
        return Err(PyTypeError::new_err(format!(
            "{name} has dtype {dt}; rustadam.numpy takes float32 and float64 arrays"
        )));
    };
    if !arr.is_c_contiguous() {
        let hint = if written {
            "it is updated in place, so a copy would not do: allocate it C-contiguous"
        } else {
            "pass numpy.ascontiguousarray(...) of it"
        };
        return Err(PyValueError::new_err(format!(
            "{name} is not C-contiguous (strides {}); {hint}",
            tuple_str(arr.strides())
        )));
    }
    if !arr.is_aligned() {
        return Err(PyValueError::new_err(format!(
            "{name} is not aligned in memory for its dtype"
        )));
    }
    Ok(kind)
}

/// A parameter's four arrays, borrowed.
struct Borrowed<'py, T: numpy::Element> {
    param: PyReadwriteArrayDyn<'py, T>,
    grad: PyReadonlyArrayDyn<'py, T>,
    exp_avg: PyReadwriteArrayDyn<'py, T>,
    exp_avg_sq: PyReadwriteArrayDyn<'py, T>,
    step: u64,
}

enum Entry<'py> {
    F32(Borrowed<'py, f32>),
    F64(Borrowed<'py, f64>),
}

/// The memory an array borrowed so far covers, to name the other argument of a conflict.
struct Span {
    start: usize,
    end: usize,
    name: String,
    written: bool,
}

/// Turns a failed borrow into a message naming both arguments where the conflict is ours.
fn borrow_error(err: BorrowError, name: &str, start: usize, end: usize, spans: &[Span]) -> PyErr {
    match err {
        BorrowError::NotWriteable => PyValueError::new_err(format!(
            "{name} is read-only (its WRITEABLE flag is off); it is updated in place"
        )),
        _ => match spans.iter().find(|s| start < s.end && s.start < end) {
            Some(other) => PyValueError::new_err(format!(
                "{name} shares memory with {}: every param, exp_avg and exp_avg_sq must be its \
                 own array (was one array passed twice?)",
                other.name
            )),
            None => PyValueError::new_err(format!(
                "{name} is already borrowed by other Rust code; it cannot be updated now"
            )),
        },
    }
}

/// Checks the dtypes and shapes of one parameter's arrays, then borrows them.
fn borrow_entry<'py, T: numpy::Element>(
    objs: [&Bound<'py, PyAny>; 4],
    index: Option<usize>,
    step: u64,
    spans: &mut Vec<Span>,
) -> PyResult<Borrowed<'py, T>> {
    let arrays: Vec<&Bound<'py, PyArrayDyn<T>>> = objs
        .iter()
        .map(|o| o.cast::<PyArrayDyn<T>>())
        .collect::<Result<_, _>>()?;
    let shape = arrays[0].shape();
    for (b, a) in arrays.iter().enumerate().skip(1) {
        if a.shape() != shape {
            return Err(PyValueError::new_err(format!(
                "{} has shape {} but {} has shape {}",
                label(b, index),
                tuple_str(a.shape()),
                label(0, index),
                tuple_str(shape)
            )));
        }
    }
    let bytes = arrays[0].len() * std::mem::size_of::<T>();
    let take = |b: usize| -> (String, usize, usize) {
        let start = arrays[b].data() as usize;
        (label(b, index), start, start + bytes)
    };
    // Borrowed in the order param, grad, exp_avg, exp_avg_sq, so a conflict names the later one.
    let (name, start, end) = take(0);
    let param = arrays[0]
        .try_readwrite()
        .map_err(|e| borrow_error(e, &name, start, end, spans))?;
    spans.push(Span {
        start,
        end,
        name,
        written: true,
    });
    let (name, start, end) = take(1);
    let grad = arrays[1]
        .try_readonly()
        .map_err(|e| borrow_error(e, &name, start, end, spans))?;
    spans.push(Span {
        start,
        end,
        name,
        written: false,
    });
    let (name, start, end) = take(2);
    let exp_avg = arrays[2]
        .try_readwrite()
        .map_err(|e| borrow_error(e, &name, start, end, spans))?;
    spans.push(Span {
        start,
        end,
        name,
        written: true,
    });
    let (name, start, end) = take(3);
    let exp_avg_sq = arrays[3]
        .try_readwrite()
        .map_err(|e| borrow_error(e, &name, start, end, spans))?;
    spans.push(Span {
        start,
        end,
        name,
        written: true,
    });
    Ok(Borrowed {
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        step,
    })
}

fn refs<'a, T: numpy::Element>(b: &'a mut Borrowed<'_, T>) -> PyResult<TensorRefs<'a, T>> {
    let err = |_| PyValueError::new_err("an array is not contiguous and aligned");
    Ok(TensorRefs::new(
        b.param.as_slice_mut().map_err(err)?,
        b.grad.as_slice().map_err(err)?,
        b.exp_avg.as_slice_mut().map_err(err)?,
        b.exp_avg_sq.as_slice_mut().map_err(err)?,
        b.step,
    ))
}

/// Refuses arrays that share memory where one is written, by their memory extents: rust-numpy's
/// borrow tracking knows arrays by their base objects, and two arrays made by
/// `numpy.frombuffer` over one buffer have none in common.
fn check_disjoint(spans: &[Span]) -> PyResult<()> {
    let ranges: Vec<layout::Span> = spans
        .iter()
        .map(|s| layout::Span {
            start: s.start,
            end: s.end,
            written: s.written,
        })
        .collect();
    match layout::conflicts(&ranges).first() {
        None => Ok(()),
        Some(&(a, b)) => Err(PyValueError::new_err(format!(
            "{} shares memory with {}: every param, exp_avg and exp_avg_sq must be its own \
             array, apart from every other array of the call",
            spans[b].name, spans[a].name
        ))),
    }
}

fn check_step(step: i64, index: Option<usize>) -> PyResult<u64> {
    if step < 1 {
        let name = match index {
            None => "step".to_string(),
            Some(i) => format!("steps[{i}]"),
        };
        return Err(PyValueError::new_err(format!(
            "{name} must be at least 1 (it is t, the count of updates including this one), \
             got {step}"
        )));
    }
    Ok(step as u64)
}

/// Checks and borrows every parameter's arrays, then runs one step over all of them with the
/// GIL released. `index` is `None` for the one-parameter call.
fn run(
    py: Python<'_>,
    items: Vec<([Bound<'_, PyAny>; 4], i64)>,
    single: bool,
    cfg: &AdamConfig,
    num_threads: Option<usize>,
) -> PyResult<()> {
    let mut checked = Vec::with_capacity(items.len());
    for (i, (objs, step)) in items.iter().enumerate() {
        let index = (!single).then_some(i);
        let step = check_step(*step, index)?;
        let mut kind = None;
        for (b, o) in objs.iter().enumerate() {
            let k = check_array(o, &label(b, index), b != 1)?;
            match kind {
                None => kind = Some(k),
                Some(p) if p != k => {
                    return Err(PyTypeError::new_err(format!(
                        "{} has dtype {} but {} has dtype {}",
                        label(b, index),
                        o.cast::<PyUntypedArray>()?.dtype(),
                        label(0, index),
                        objs[0].cast::<PyUntypedArray>()?.dtype(),
                    )))
                }
                Some(_) => {}
            }
        }
        checked.push((kind.expect("four arrays"), step));
    }
    let mut spans = Vec::new();
    let mut entries = Vec::with_capacity(items.len());
    for (i, ((objs, _), (kind, step))) in items.iter().zip(&checked).enumerate() {
        let index = (!single).then_some(i);
        let objs = [&objs[0], &objs[1], &objs[2], &objs[3]];
        entries.push(match kind {
            DType::F32 => Entry::F32(borrow_entry(objs, index, *step, &mut spans)?),
            DType::F64 => Entry::F64(borrow_entry(objs, index, *step, &mut spans)?),
        });
    }
    check_disjoint(&spans)?;
    // Claimed in the process-wide registry, as torch steps claim theirs: another step (numpy or
    // torch, in another thread) over the same memory is refused instead of racing this one.
    let _claim = crate::registry::borrow(
        spans
            .iter()
            .map(|s| layout::Span {
                start: s.start,
                end: s.end,
                written: s.written,
            })
            .collect(),
    )?;
    let mut tensors: Vec<AnyTensor<'_>> = entries
        .iter_mut()
        .map(|e| match e {
            Entry::F32(b) => refs(b).map(AnyTensor::from),
            Entry::F64(b) => refs(b).map(AnyTensor::from),
        })
        .collect::<PyResult<_>>()?;
    let opts = crate::threads::options(
        num_threads.unwrap_or_else(|| ExecOptions::default().num_threads),
        None,
        None,
    )?;
    py.detach(|| rustadam::step_tensors(cfg, &mut tensors, &opts))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// One Adam step of one parameter's numpy arrays, in place.
///
/// `param`, `exp_avg` and `exp_avg_sq` are updated; `grad` is only read. All four are
/// C-contiguous float32 or float64 arrays of one dtype and shape. `step` is t after this update
/// (1 on the first). Raises TypeError or ValueError naming the argument at fault, before
/// anything is written.
#[pyfunction]
#[pyo3(signature = (param, grad, exp_avg, exp_avg_sq, step, config, *, num_threads=None))]
#[allow(clippy::too_many_arguments)]
fn numpy_adam_step<'py>(
    py: Python<'py>,
    param: Bound<'py, PyAny>,
    grad: Bound<'py, PyAny>,
    exp_avg: Bound<'py, PyAny>,
    exp_avg_sq: Bound<'py, PyAny>,
    step: i64,
    config: Bound<'py, Config>,
    num_threads: Option<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let num_threads = num_threads
        .as_ref()
        .map(crate::threads::count)
        .transpose()?;
    let items = vec![([param, grad, exp_avg, exp_avg_sq], step)];
    run(py, items, true, &supported(&config)?, num_threads)
}

/// The config of a numpy call: the options that need more buffers are refused.
fn supported(config: &Bound<'_, Config>) -> PyResult<AdamConfig> {
    let cfg = config.get().inner;
    if cfg.amsgrad || cfg.rounding != rustadam::Rounding::Nearest {
        return Err(PyValueError::new_err(
            "rustadam.numpy does not take amsgrad or a rounding mode other than 'nearest'",
        ));
    }
    Ok(cfg)
}

/// One Adam step of many parameters' numpy arrays in one call (lists of equal length; a
/// parameter's four arrays share a dtype, parameters may differ). Nothing is written unless
/// every entry passes its checks.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, steps, config, *, num_threads=None))]
#[allow(clippy::too_many_arguments)]
fn numpy_adam_step_many<'py>(
    py: Python<'py>,
    params: Vec<Bound<'py, PyAny>>,
    grads: Vec<Bound<'py, PyAny>>,
    exp_avgs: Vec<Bound<'py, PyAny>>,
    exp_avg_sqs: Vec<Bound<'py, PyAny>>,
    steps: Vec<i64>,
    config: Bound<'py, Config>,
    num_threads: Option<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let num_threads = num_threads
        .as_ref()
        .map(crate::threads::count)
        .transpose()?;
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
        .iter()
        .any(|&l| l != n)
    {
        return Err(PyValueError::new_err(format!(
            "params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per parameter \
             (got {n}, {}, {}, {} and {})",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len(),
            steps.len()
        )));
    }
    let cfg = supported(&config)?;
    let items = params
        .into_iter()
        .zip(grads)
        .zip(exp_avgs)
        .zip(exp_avg_sqs)
        .zip(steps)
        .map(|((((p, g), m), v), t)| ([p, g, m, v], t))
        .collect();
    run(py, items, false, &cfg, num_threads)
}

/// Adds the numpy functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(numpy_adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_adam_step_many, m)?)?;
    Ok(())
}
