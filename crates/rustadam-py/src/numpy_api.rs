//! The numpy entry points of `rustadam._core` (no torch needed).
//!
//! `numpy_adam_step` updates one parameter's arrays in place, `numpy_adam_step_many` many in one
//! call. Each array is checked (an ndarray of float32 or float64, one dtype and shape per
//! parameter, C-contiguous, aligned, the parameter and moments writeable), and no array the
//! step writes may share a byte with any other array of the call, found by memory extents
//! (not by base objects, which two `numpy.frombuffer` views of one buffer do not share). The
//! step claims its memory in the process-wide registry torch steps use too, then runs with the
//! GIL released. Nothing is written unless every check passes.

use crate::config::Config;
use numpy::prelude::*;
use numpy::{dtype, npyffi, PyUntypedArray};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::type_object::PyTypeInfo;
use pyo3::types::{PyBool, PyDict, PyType};
use rustadam::{layout, AdamConfig, AnyTensor, Element, ExecOptions, TensorRefs};

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

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }
}

/// Checks one argument and returns its dtype; `TypeError`/`ValueError` naming it otherwise.
/// Reads only the array's C fields (no Python code runs), `masked` being `MaskedArray`'s
/// type where `numpy.ma` was imported.
fn check_array(
    obj: &Bound<'_, PyAny>,
    name: &str,
    written: bool,
    masked: Option<&Bound<'_, PyType>>,
) -> PyResult<DType> {
    let py = obj.py();
    let Ok(arr) = obj.cast::<PyUntypedArray>() else {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a numpy.ndarray, not {}",
            obj.get_type().name()?
        )));
    };
    if masked.is_some_and(|m| is_subtype(arr, m)) {
        return Err(PyTypeError::new_err(format!(
            "{name} is a numpy.ma.MaskedArray: the step would ignore its mask (update masked \
             entries, read masked gradients); pass its .data to update every entry"
        )));
    }
    let dt = arr.dtype();
    let kind = if dt.is_equiv_to(&dtype::<f32>(py)) {
        DType::F32
    } else if dt.is_equiv_to(&dtype::<f64>(py)) {
        DType::F64
    } else {
        // A float in the other byte order is refused too (the core reads native numbers).
        let order = if dt.kind() == b'f' && dt.is_native_byteorder() == Some(false) {
            " (not in the machine's byte order: pass it through .astype(its native dtype))"
        } else {
            ""
        };
        return Err(PyTypeError::new_err(format!(
            "{name} has dtype {dt}{order}; rustadam.numpy takes float32 and float64 arrays"
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

/// `numpy.ma.MaskedArray` if an argument is a strict subclass of ndarray (only such can be
/// masked), None otherwise. Looked up before any array is checked: the import runs Python code.
fn masked_type<'py>(py: Python<'py>, items: &[Item<'py>]) -> PyResult<Option<Bound<'py, PyType>>> {
    let ndarray = PyUntypedArray::type_object(py);
    let subclassed = items
        .iter()
        .flat_map(|(objs, _)| objs.iter())
        .any(|o| o.cast::<PyUntypedArray>().is_ok() && !o.get_type().is(&ndarray));
    if !subclassed {
        return Ok(None);
    }
    let masked = py.import("numpy.ma")?.getattr("MaskedArray")?;
    Ok(Some(masked.cast_into::<PyType>()?))
}

/// Whether `arr`'s type is `ty` or a subclass of it, by the types' own MRO: never by
/// `isinstance`, which asks the object's `__class__` (a property a subclass may define, run
/// between two arrays' checks).
fn is_subtype(arr: &Bound<'_, PyUntypedArray>, ty: &Bound<'_, PyType>) -> bool {
    // SAFETY: both are live type objects and the GIL is held; PyType_IsSubtype reads the MRO
    // tuple alone and runs no Python code.
    unsafe { pyo3::ffi::PyType_IsSubtype(arr.get_type_ptr(), ty.as_type_ptr()) != 0 }
}

/// Whether numpy lets the array be written (its WRITEABLE flag).
fn is_writeable(arr: &Bound<'_, PyUntypedArray>) -> bool {
    // SAFETY: `arr` is a live ndarray and the GIL is held; its flags are a plain field.
    unsafe {
        (*npyffi::_PyArray_GET_ITEM_DATA(arr.as_array_ptr())).flags & npyffi::NPY_ARRAY_WRITEABLE
            != 0
    }
}

/// The memory an array covers, named for messages.
struct Span {
    start: usize,
    end: usize,
    name: String,
    written: bool,
}

/// One parameter's four arrays (param, grad, exp_avg, exp_avg_sq), as first element and
/// length; made only by `Checked::new`.
struct Entry<T> {
    ptrs: [*mut T; 4],
    len: usize,
    step: u64,
}

/// Every array of a call, checked: ndarrays of one element type per parameter, C-contiguous,
/// aligned, the written ones writeable, and no written array sharing a byte with any other
/// array of the call (by memory extents, whatever their base objects). The only way to the
/// slices the kernel takes (`tensors`).
struct Checked<'a> {
    f32s: Vec<Entry<f32>>,
    f64s: Vec<Entry<f64>>,
    /// The arrays, held for as long as their memory is used.
    _held: &'a [Item<'a>],
}

impl<'a> Checked<'a> {
    /// Checks `items`, with their step counts `steps`; `TypeError`/`ValueError` naming the
    /// array otherwise. Each parameter's arrays are read once, dtype, shape and memory in one
    /// pass in which no Python code runs, so that what is checked is what is written.
    fn new(
        items: &'a [Item<'a>],
        steps: &[u64],
        positions: &[Option<usize>],
        masked: Option<&Bound<'_, PyType>>,
    ) -> PyResult<(Self, Vec<Span>)> {
        let mut spans = Vec::with_capacity(items.len() * 4);
        let (mut f32s, mut f64s) = (Vec::new(), Vec::new());
        for (((objs, _), &step), &index) in items.iter().zip(steps).zip(positions) {
            let mut kind = None;
            for (b, o) in objs.iter().enumerate() {
                let k = check_array(o, &label(b, index), b != 1, masked)?;
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
            let kind = kind.expect("four arrays");
            let arrays: Vec<&Bound<'a, PyUntypedArray>> = objs
                .iter()
                .map(|o| o.cast::<PyUntypedArray>())
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
            let len = arrays[0].len();
            let bytes = len * kind.size();
            let mut ptrs = [std::ptr::null_mut::<u8>(); 4];
            for (b, a) in arrays.iter().enumerate() {
                let written = b != 1;
                if written && !is_writeable(a) {
                    return Err(PyValueError::new_err(format!(
                        "{} is read-only (its WRITEABLE flag is off); it is updated in place",
                        label(b, index)
                    )));
                }
                // SAFETY: a live ndarray's data pointer field, read with the GIL held.
                let start = unsafe { (*npyffi::_PyArray_GET_ITEM_DATA(a.as_array_ptr())).data };
                ptrs[b] = start.cast();
                spans.push(Span {
                    start: start as usize,
                    end: start as usize + bytes,
                    name: label(b, index),
                    written,
                });
            }
            match kind {
                DType::F32 => f32s.push(Entry {
                    ptrs: ptrs.map(|p| p.cast()),
                    len,
                    step,
                }),
                DType::F64 => f64s.push(Entry {
                    ptrs: ptrs.map(|p| p.cast()),
                    len,
                    step,
                }),
            }
        }
        check_disjoint(&spans)?;
        Ok((
            Self {
                f32s,
                f64s,
                _held: items,
            },
            spans,
        ))
    }

    /// The kernel's view of every parameter.
    fn tensors(&mut self) -> Vec<AnyTensor<'_>> {
        fn refs<T: Element>(e: &mut Entry<T>) -> TensorRefs<'_, T> {
            let [p, g, m, v] = e.ptrs;
            if e.len == 0 {
                // numpy calls an empty array aligned wherever its pointer is (or null).
                return TensorRefs::new(&mut [], &[], &mut [], &mut [], e.step);
            }
            // SAFETY: `Checked::new` found each array an ndarray of `T` (so `len` aligned
            // elements from its data pointer are its memory: numpy's ALIGNED flag holds of a
            // non-empty array's pointer), held by `_held` for this value's life (numpy does not
            // resize an array that is referenced), and no written array sharing a byte with
            // another; `&mut self` makes the slices unique. The one precondition left: no
            // `resize(refcheck=False)` of these arrays meanwhile.
            unsafe {
                TensorRefs::new(
                    std::slice::from_raw_parts_mut(p, e.len),
                    std::slice::from_raw_parts(g, e.len),
                    std::slice::from_raw_parts_mut(m, e.len),
                    std::slice::from_raw_parts_mut(v, e.len),
                    e.step,
                )
            }
        }
        let mut out: Vec<AnyTensor<'_>> = Vec::with_capacity(self.f32s.len() + self.f64s.len());
        out.extend(self.f32s.iter_mut().map(|e| AnyTensor::from(refs(e))));
        out.extend(self.f64s.iter_mut().map(|e| AnyTensor::from(refs(e))));
        out
    }
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
             array, apart from every other array of the call (was one array passed twice?)",
            spans[b].name, spans[a].name
        ))),
    }
}

/// A parameter's four arrays and its step count `t`, as passed.
type Item<'py> = ([Bound<'py, PyAny>; 4], Bound<'py, PyAny>);

/// A step count: an int from 1 to 2**63 - 1 (the count of updates including this one);
/// `TypeError` for what is not an integer (a bool included), `ValueError` naming it for one
/// out of range (not the `OverflowError` of a huge value).
fn check_step(step: &Bound<'_, PyAny>, index: Option<usize>) -> PyResult<u64> {
    let name = || match index {
        None => "step".to_string(),
        Some(i) => format!("steps[{i}]"),
    };
    let py = step.py();
    let value = match step.extract::<i64>() {
        _ if step.is_instance_of::<PyBool>() => None,
        Ok(t) => Some(t),
        Err(e) if e.is_instance_of::<PyOverflowError>(py) => Some(0),
        Err(e) if e.is_instance_of::<PyTypeError>(py) => None,
        // Not a refusal: an error of the object's own `__index__` (KeyboardInterrupt too).
        Err(e) => return Err(e),
    };
    match value {
        Some(t) if t >= 1 => Ok(t as u64),
        Some(_) => Err(PyValueError::new_err(format!(
            "{} must be an int from 1 to 2**63 - 1 (it is t, the count of updates including \
             this one), got {step}",
            name()
        ))),
        None => Err(PyTypeError::new_err(format!(
            "{} must be an int, not {}",
            name(),
            step.get_type().name()?
        ))),
    }
}

/// Checks and borrows every parameter's arrays, then runs one step over all of them with the
/// GIL released. `index` is `None` for the one-parameter call.
fn run(
    py: Python<'_>,
    items: Vec<Item<'_>>,
    positions: &[Option<usize>],
    cfg: &AdamConfig,
    num_threads: Option<usize>,
) -> PyResult<Vec<u64>> {
    // The step counts first: reading one may run Python code (an `__index__`), which could
    // change an array (its dtype, say) after it was checked.
    let steps = items
        .iter()
        .zip(positions)
        .map(|((_, step), &index)| check_step(step, index))
        .collect::<PyResult<Vec<u64>>>()?;
    let masked = masked_type(py, &items)?;
    // From here to the write no Python code runs: the arrays' checks read their C fields.
    let (mut checked, spans) = Checked::new(&items, &steps, positions, masked.as_ref())?;
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
    let mut tensors = checked.tensors();
    let opts = crate::threads::options(
        num_threads.unwrap_or_else(|| ExecOptions::default().num_threads),
        None,
        None,
    )?;
    py.detach(|| rustadam::step_tensors(cfg, &mut tensors, &opts))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(steps)
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
    step: Bound<'py, PyAny>,
    config: Bound<'py, Config>,
    num_threads: Option<Bound<'py, PyAny>>,
) -> PyResult<()> {
    let num_threads = num_threads
        .as_ref()
        .map(crate::threads::count)
        .transpose()?;
    let items = vec![([param, grad, exp_avg, exp_avg_sq], step)];
    run(py, items, &[None], &supported(&config)?, num_threads).map(drop)
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
/// every entry passes its checks. With `states`, `states[i]["step"]` is set to `steps[i]`
/// once the arrays are written, inside this call: back in Python a KeyboardInterrupt could
/// land between the two. `indices[i]` is entry `i`'s name in messages (`params[indices[i]]`),
/// for a caller that passes some of its parameters.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, steps, config, *, num_threads=None, states=None, indices=None))]
#[allow(clippy::too_many_arguments)]
fn numpy_adam_step_many<'py>(
    py: Python<'py>,
    params: Vec<Bound<'py, PyAny>>,
    grads: Vec<Bound<'py, PyAny>>,
    exp_avgs: Vec<Bound<'py, PyAny>>,
    exp_avg_sqs: Vec<Bound<'py, PyAny>>,
    steps: Vec<Bound<'py, PyAny>>,
    config: Bound<'py, Config>,
    num_threads: Option<Bound<'py, PyAny>>,
    states: Option<Vec<Bound<'py, PyDict>>>,
    indices: Option<Vec<usize>>,
) -> PyResult<()> {
    let n = params.len();
    let lengths = [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()];
    if lengths.iter().any(|&l| l != n) {
        return Err(PyValueError::new_err(format!(
            "params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per parameter \
             (got {n}, {}, {}, {} and {})",
            lengths[0], lengths[1], lengths[2], lengths[3]
        )));
    }
    if states.as_ref().is_some_and(|s| s.len() != n)
        || indices.as_ref().is_some_and(|s| s.len() != n)
    {
        return Err(PyValueError::new_err(
            "states and indices must have one entry per parameter",
        ));
    }
    let num_threads = num_threads
        .as_ref()
        .map(crate::threads::count)
        .transpose()?;
    let cfg = supported(&config)?;
    let positions: Vec<Option<usize>> = match &indices {
        Some(ix) => ix.iter().map(|&i| Some(i)).collect(),
        None => (0..n).map(Some).collect(),
    };
    let items = params
        .into_iter()
        .zip(grads)
        .zip(exp_avgs)
        .zip(exp_avg_sqs)
        .zip(steps)
        .map(|((((p, g), m), v), t)| ([p, g, m, v], t))
        .collect();
    let counts = run(py, items, &positions, &cfg, num_threads)?;
    crate::plan::commit(py, states.into_iter().flatten().zip(counts), None)
}

/// Adds the numpy functions to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(numpy_adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(numpy_adam_step_many, m)?)?;
    Ok(())
}
