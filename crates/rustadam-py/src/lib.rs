//! `rustadam._core`: the Python extension over the rustadam core.
//!
//! Glue only: it reads each torch tensor's metadata, checks everything that makes a slice over
//! its memory sound, hands the slices to `rustadam::step_tensors` with the GIL released, and maps
//! errors to Python exceptions. Tensors it cannot take are returned, with the reason, for the
//! caller's torch path.

mod numpy_api;
mod openmp;

use std::collections::HashMap;
use std::sync::OnceLock;

use pyo3::exceptions::PyValueError;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use rustadam::{AdamConfig, AnyTensor, ExecOptions, SimdLevel, TensorRefs, WeightDecay};
use smallvec::SmallVec;

/// The element types the core takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// torch objects compared by identity; looked up once.
struct Torch {
    strided: Py<PyAny>,
    /// (torch dtype, element type, complex: each element is a pair of reals)
    dtypes: Vec<(Py<PyAny>, DType, bool)>,
}

fn torch(py: Python<'_>) -> PyResult<&'static Torch> {
    static TORCH: OnceLock<Torch> = OnceLock::new();
    if let Some(t) = TORCH.get() {
        return Ok(t);
    }
    let m = py.import("torch")?;
    let mut dtypes = Vec::new();
    for (name, dtype, complex) in [
        ("float32", DType::F32, false),
        ("float64", DType::F64, false),
        ("bfloat16", DType::BF16, false),
        ("float16", DType::F16, false),
        ("complex64", DType::F32, true),
        ("complex128", DType::F64, true),
    ] {
        dtypes.push((m.getattr(name)?.unbind(), dtype, complex));
    }
    let t = Torch {
        strided: m.getattr("strided")?.unbind(),
        dtypes,
    };
    Ok(TORCH.get_or_init(|| t))
}

/// What the kernel needs of one tensor, read from it and checked.
#[derive(Debug, Clone)]
struct View {
    ptr: usize,
    /// Real elements: a complex tensor counts each element as two.
    numel: usize,
    dtype: DType,
    complex: bool,
    shape: Dims<usize>,
    /// Strides of the dimensions longer than 1; those are the ones that place elements.
    strides: Dims<isize>,
}

/// Sizes or strides, inline up to 6 dimensions: read for every tensor at every step, so they
/// should cost no allocation.
type Dims<T> = SmallVec<[T; 6]>;

/// The integers of a Python tuple (a `torch.Size` or a stride tuple).
fn dims<T: for<'a, 'py> FromPyObject<'a, 'py>>(tuple: Bound<'_, PyAny>) -> PyResult<Dims<T>> {
    tuple
        .try_iter()?
        .map(|x| x?.extract::<T>().map_err(Into::into))
        .collect()
}

impl View {
    fn bytes(&self) -> usize {
        self.numel * self.dtype.size()
    }
}

/// Why a tensor cannot go to the core as it is.
enum Refusal {
    /// The core does not handle it (device, dtype, layout kind, view flags).
    Unsupported(String),
    /// Its memory is not dense and non-overlapping: a gathered copy would go.
    Layout(String),
}

/// Reads a tensor; `Ok(Err(_))` when the core cannot take it as it is.
fn view(t: &Bound<'_, PyAny>, th: &Torch) -> PyResult<Result<View, Refusal>> {
    use Refusal::{Layout, Unsupported};
    let py = t.py();
    let layout = t.getattr(intern!(py, "layout"))?;
    if !layout.is(th.strided.bind(py)) {
        return Ok(Err(Unsupported(format!(
            "its layout is {layout}, not torch.strided"
        ))));
    }
    if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
        let device = t.getattr(intern!(py, "device"))?;
        return Ok(Err(Unsupported(format!(
            "it is on device {device}; the Rust core runs on CPU tensors"
        ))));
    }
    let dt = t.getattr(intern!(py, "dtype"))?;
    let Some(&(_, dtype, complex)) = th.dtypes.iter().find(|(d, _, _)| dt.is(d.bind(py))) else {
        return Ok(Err(Unsupported(format!(
            "its dtype is {dt}; the Rust core takes float32, float64, bfloat16, float16, \
             complex64 and complex128"
        ))));
    };
    if t.call_method0(intern!(py, "is_neg"))?.extract::<bool>()? {
        return Ok(Err(Unsupported(
            "it is a negative view (is_neg() is set)".into(),
        )));
    }
    if complex && t.call_method0(intern!(py, "is_conj"))?.extract::<bool>()? {
        return Ok(Err(Unsupported(
            "it is a conjugate view (is_conj() is set)".into(),
        )));
    }
    let mut shape: Dims<usize> = dims(t.getattr(intern!(py, "shape"))?)?;
    let mut all_strides: Dims<isize> = dims(t.call_method0(intern!(py, "stride"))?)?;
    let ptr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
    if complex {
        // A complex tensor is a real one with a trailing dimension (re, im) of stride 1.
        all_strides.iter_mut().for_each(|s| *s *= 2);
        shape.push(2);
        all_strides.push(1);
    }
    let numel = shape.iter().product::<usize>();
    let strides: Dims<isize> = shape
        .iter()
        .zip(&all_strides)
        .filter(|(&n, _)| n > 1)
        .map(|(_, &s)| s)
        .collect();
    let v = View {
        ptr,
        numel,
        dtype,
        complex,
        shape,
        strides,
    };
    if numel > 0 {
        if ptr == 0 {
            // A DTensor or a tensor whose storage was freed: no memory of its own to step.
            return Ok(Err(Unsupported(
                "it has no data of its own (data_ptr() is 0)".into(),
            )));
        }
        if !is_dense_non_overlapping(&v) {
            return Ok(Err(Layout(format!(
                "its memory is not dense and non-overlapping (shape {:?}, strides {:?})",
                &v.shape[..v.shape.len() - complex as usize],
                &all_strides[..all_strides.len() - complex as usize]
            ))));
        }
        if !ptr.is_multiple_of(dtype.size()) {
            return Ok(Err(Unsupported(format!(
                "its data pointer {ptr:#x} is misaligned"
            ))));
        }
    }
    Ok(Ok(v))
}

/// True when the elements fill `numel` consecutive slots exactly once: sorted by stride,
/// the dimensions (of length > 1) must have strides 1, n0, n0·n1, …
fn is_dense_non_overlapping(v: &View) -> bool {
    let mut dims: Dims<(isize, usize)> = v
        .strides
        .iter()
        .zip(v.shape.iter().filter(|&&n| n > 1))
        .map(|(&s, &n)| (s, n))
        .collect();
    dims.sort_unstable();
    let mut expected: usize = 1;
    for (s, n) in dims {
        if s < 0 || s as usize != expected {
            return false;
        }
        expected *= n;
    }
    true
}

/// A tensor's four buffers, read and checked.
struct Entry {
    index: usize,
    bufs: [View; 4],
    step: u64,
}

const BUFFER_NAMES: [&str; 4] = ["param", "grad", "exp_avg", "exp_avg_sq"];

/// What the caller is to do with a parameter the core left alone.
const FATAL: &str = "fatal"; // no backend gives a meaningful result: raise
const LAYOUT: &str = "layout"; // not dense as it is: step a gathered copy
const UNSUPPORTED: &str = "unsupported"; // step it with torch ops

/// `(index, reason, kind)` for a parameter the core left alone; kind is one of the above.
type Rejection = (usize, String, &'static str);

/// Finds every buffer that overlaps another one it must not overlap. Gradients may share memory
/// with each other (they are only read); anything written may share memory with nothing.
fn overlaps(entries: &[Entry]) -> Vec<Rejection> {
    // (start, end, entry position, buffer number)
    let mut spans: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(entries.len() * 4);
    for (e, entry) in entries.iter().enumerate() {
        for (b, v) in entry.bufs.iter().enumerate() {
            if v.numel > 0 {
                spans.push((v.ptr, v.ptr + v.bytes(), e, b));
            }
        }
    }
    spans.sort_unstable();
    let mut bad: Vec<Rejection> = Vec::new();
    // The span reaching furthest so far, among all and among written buffers.
    let mut reach_any: Option<(usize, usize, usize)> = None;
    let mut reach_written: Option<(usize, usize, usize)> = None;
    for &(start, end, e, b) in &spans {
        let written = b != 1;
        let hit = if written { reach_any } else { reach_written };
        if let Some((r_end, r_e, r_b)) = hit {
            if start < r_end {
                for (x, xb, y, yb) in [(e, b, r_e, r_b), (r_e, r_b, e, b)] {
                    let own = x == y;
                    let reason = if own {
                        format!(
                            "its {} shares memory with its {}",
                            BUFFER_NAMES[xb], BUFFER_NAMES[yb]
                        )
                    } else {
                        format!(
                            "its {} shares memory with the {} of another parameter in this call",
                            BUFFER_NAMES[xb], BUFFER_NAMES[yb]
                        )
                    };
                    bad.push((
                        entries[x].index,
                        reason,
                        if own { FATAL } else { UNSUPPORTED },
                    ));
                }
            }
        }
        if reach_any.is_none_or(|(r, _, _)| end > r) {
            reach_any = Some((end, e, b));
        }
        if written && reach_written.is_none_or(|(r, _, _)| end > r) {
            reach_written = Some((end, e, b));
        }
    }
    bad
}

/// A mutable slice over a checked buffer.
///
/// # Safety
/// `v.ptr` points at `v.numel` initialised, aligned elements of `E` in memory that stays alive
/// and is touched by no other slice or thread for `'a` (checked by `view` and `overlaps`; the
/// tensors are held by the caller's Python references for the whole call).
unsafe fn slice_mut<'a, E>(v: &View) -> &'a mut [E] {
    if v.numel == 0 {
        return &mut [];
    }
    // SAFETY: as the function's contract states.
    unsafe { std::slice::from_raw_parts_mut(v.ptr as *mut E, v.numel) }
}

/// A shared slice over a checked buffer.
///
/// # Safety
/// As for [`slice_mut`], except that other shared slices may overlap it.
unsafe fn slice<'a, E>(v: &View) -> &'a [E] {
    if v.numel == 0 {
        return &[];
    }
    // SAFETY: as the function's contract states.
    unsafe { std::slice::from_raw_parts(v.ptr as *const E, v.numel) }
}

/// The typed buffers of one checked entry.
///
/// # Safety
/// The entry passed `view` and `overlaps`, its four buffers have one dtype `E`, and the tensors
/// stay alive for `'a`.
unsafe fn refs<'a, E>(e: &Entry) -> TensorRefs<'a, E> {
    let [p, g, m, v] = &e.bufs;
    // SAFETY: the caller's contract covers each buffer; only the gradient is shared.
    unsafe {
        TensorRefs {
            param: slice_mut(p),
            grad: slice(g),
            exp_avg: slice_mut(m),
            exp_avg_sq: slice_mut(v),
            step: e.step,
        }
    }
}

/// Metadata of the parameters and states a group passed last time, so that a step need not
/// read every attribute of every tensor again.
///
/// An entry is used only for the same Python object with the same data pointer; it holds a
/// reference to the object, so the object's address cannot be reused while the entry lives.
/// A parameter whose checks fail on remembered metadata is read again from its tensors before
/// anything is decided, and entries a call does not see are dropped.
#[pyclass(module = "rustadam._core")]
#[derive(Default)]
struct TensorCache {
    entries: HashMap<usize, Cached>,
    generation: u64,
}

struct Cached {
    _tensor: Py<PyAny>,
    view: View,
    generation: u64,
}

#[pymethods]
impl TensorCache {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    /// How many tensors it remembers.
    fn __len__(&self) -> usize {
        self.entries.len()
    }
}

/// `view`, through the cache when one is given; also says whether the answer was remembered.
fn view_cached(
    t: &Bound<'_, PyAny>,
    th: &Torch,
    cache: Option<&mut TensorCache>,
) -> PyResult<(Result<View, Refusal>, bool)> {
    let Some(c) = cache else {
        return Ok((view(t, th)?, false));
    };
    let key = t.as_ptr() as usize;
    let generation = c.generation;
    if let Some(e) = c.entries.get_mut(&key) {
        let ptr: usize = t.call_method0(intern!(t.py(), "data_ptr"))?.extract()?;
        if ptr == e.view.ptr {
            e.generation = generation;
            return Ok((Ok(e.view.clone()), true));
        }
    }
    let fresh = view(t, th)?;
    match &fresh {
        Ok(v) => {
            c.entries.insert(
                key,
                Cached {
                    _tensor: t.clone().unbind(),
                    view: v.clone(),
                    generation,
                },
            );
        }
        Err(_) => {
            c.entries.remove(&key);
        }
    }
    Ok((fresh, false))
}

/// Reads one parameter's four buffers and checks them against each other. The flag says
/// whether any buffer's metadata came from the cache.
fn read_entry(
    i: usize,
    tensors: &[&Bound<'_, PyAny>; 4],
    step: u64,
    th: &Torch,
    mut cache: Option<&mut TensorCache>,
) -> PyResult<(bool, Result<Entry, Rejection>)> {
    let mut bufs: Vec<View> = Vec::with_capacity(4);
    let mut remembered = false;
    for (b, t) in tensors.iter().enumerate() {
        // Gradients are not remembered: holding one would keep it alive after zero_grad().
        let (v, hit) = if b == 1 {
            (view(t, th)?, false)
        } else {
            view_cached(t, th, cache.as_deref_mut())?
        };
        remembered |= hit;
        let (why, kind) = match v {
            Ok(v) => {
                bufs.push(v);
                continue;
            }
            Err(Refusal::Layout(why)) => (why, LAYOUT),
            Err(Refusal::Unsupported(why)) => (why, UNSUPPORTED),
        };
        let why = format!("{}: {why}", BUFFER_NAMES[b]);
        return Ok((remembered, Err((i, why, kind))));
    }
    let p = &bufs[0];
    let same_type = |v: &View| (v.dtype, v.complex) == (p.dtype, p.complex);
    if let Some(b) = (1..4).find(|&b| !same_type(&bufs[b])) {
        // A gradient of another dtype would be cast silently by torch ops: refuse it.
        let kind = if b == 1 { FATAL } else { UNSUPPORTED };
        let why = format!("{} has another dtype than param", BUFFER_NAMES[b]);
        return Ok((remembered, Err((i, why, kind))));
    }
    if let Some(b) = (1..4).find(|&b| bufs[b].shape != p.shape) {
        let why = format!(
            "{} has shape {:?} but param has {:?}",
            BUFFER_NAMES[b], bufs[b].shape, p.shape
        );
        return Ok((remembered, Err((i, why, FATAL))));
    }
    if let Some(b) = (1..4).find(|&b| bufs[b].strides != p.strides) {
        let why = format!(
            "{} is laid out in memory differently from param",
            BUFFER_NAMES[b]
        );
        return Ok((remembered, Err((i, why, LAYOUT))));
    }
    let bufs: [View; 4] = bufs.try_into().expect("four buffers");
    Ok((
        remembered,
        Ok(Entry {
            index: i,
            bufs,
            step,
        }),
    ))
}

/// Reads and checks every parameter's four buffers: the entries the core can take, and the
/// rejections. `ok` is false when nothing may run (a fatal rejection, or an unsupported one
/// under `strict`); the rejections are then just those.
fn collect(
    py: Python<'_>,
    [params, grads, exp_avgs, exp_avg_sqs]: [&[Bound<'_, PyAny>]; 4],
    steps: &[u64],
    strict: bool,
    cache: Option<&mut TensorCache>,
) -> PyResult<(Vec<Entry>, Vec<Rejection>, bool)> {
    let n = params.len();
    if [grads.len(), exp_avgs.len(), exp_avg_sqs.len(), steps.len()]
        .iter()
        .any(|&l| l != n)
    {
        return Err(PyValueError::new_err(
            "params, grads, exp_avgs, exp_avg_sqs and steps must have one entry per parameter",
        ));
    }
    let th = torch(py)?;
    let mut cache = cache;
    if let Some(c) = cache.as_deref_mut() {
        c.generation += 1;
    }

    let mut rejected: Vec<Rejection> = Vec::new();
    let mut entries: Vec<Entry> = Vec::with_capacity(n);
    for i in 0..n {
        let tensors = [&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]];
        let mut read = read_entry(i, &tensors, steps[i], th, cache.as_deref_mut())?;
        if let (Err(_), true, Some(c)) = (&read.1, read.0, cache.as_deref_mut()) {
            // A check failed on remembered metadata: judge the tensors as they are now.
            for t in tensors {
                c.entries.remove(&(t.as_ptr() as usize));
            }
            read = read_entry(i, &tensors, steps[i], th, Some(c))?;
        }
        match read.1 {
            Ok(e) => entries.push(e),
            Err(r) => rejected.push(r),
        }
    }
    if let Some(c) = cache {
        // Forget tensors this call did not see, so the cache holds no tensor past its use.
        let generation = c.generation;
        c.entries.retain(|_, e| e.generation == generation);
    }
    let clashes = overlaps(&entries);
    if !clashes.is_empty() {
        entries.retain(|e| !clashes.iter().any(|c| c.0 == e.index));
        rejected.extend(clashes);
        rejected.sort_by_key(|r| (r.0, r.2 != FATAL));
        rejected.dedup_by_key(|r| r.0);
    }
    if rejected.iter().any(|r| r.2 == FATAL) {
        rejected.retain(|r| r.2 == FATAL);
        return Ok((Vec::new(), rejected, false));
    }
    if strict && rejected.iter().any(|r| r.2 == UNSUPPORTED) {
        rejected.retain(|r| r.2 == UNSUPPORTED);
        return Ok((Vec::new(), rejected, false));
    }

    Ok((entries, rejected, true))
}

/// The typed slices of checked entries, alive as long as `entries` (whose tensors the caller's
/// Python references hold).
fn tensors(entries: &[Entry]) -> Vec<AnyTensor<'_>> {
    entries
        .iter()
        .map(|e| match e.bufs[0].dtype {
            // SAFETY: each entry passed `view` (live, aligned, dense, one dtype) and `overlaps`
            // (no written buffer shares memory with another); the caller holds the tensors.
            DType::F32 => AnyTensor::F32(unsafe { refs(e) }),
            // SAFETY: as above.
            DType::F64 => AnyTensor::F64(unsafe { refs(e) }),
            // SAFETY: as above.
            DType::BF16 => AnyTensor::BF16(unsafe { refs(e) }),
            // SAFETY: as above.
            DType::F16 => AnyTensor::F16(unsafe { refs(e) }),
        })
        .collect()
}

/// One Adam step over the CPU tensors of a parameter group.
///
/// Returns `(ran, [(index, reason, kind)])` for the parameters it left untouched, which the
/// caller handles by kind: "layout" (not dense as it is: step a gathered copy), "unsupported"
/// (another device or dtype, memory shared with another parameter: step with torch ops) or
/// "fatal" (a parameter's own buffers share memory, a gradient of another dtype, a state of
/// another shape). When any is fatal, or `strict` is set and any is unsupported, nothing is
/// written, `ran` is false and the list holds just those.
/// `steps[i]` is t after this update. Raises ValueError for invalid hyper-parameters.
#[pyfunction]
#[pyo3(signature = (
    params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
    weight_decouple, absolute, optimized_update, num_threads, strict=false, simd=None, cache=None,
    pool=None
))]
#[allow(clippy::too_many_arguments)]
fn adam_step(
    py: Python<'_>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    exp_avgs: Vec<Bound<'_, PyAny>>,
    exp_avg_sqs: Vec<Bound<'_, PyAny>>,
    steps: Vec<u64>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    weight_decouple: bool,
    absolute: bool,
    optimized_update: bool,
    num_threads: usize,
    strict: bool,
    simd: Option<&str>,
    cache: Option<Bound<'_, TensorCache>>,
    pool: Option<&str>,
) -> PyResult<(bool, Vec<Rejection>)> {
    let cfg = config(
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        weight_decouple,
        absolute,
        optimized_update,
    )?;
    let opts = ExecOptions {
        num_threads,
        simd: simd.map(parse_simd).transpose()?,
        fork_join: parse_pool(pool)?,
        ..ExecOptions::default()
    };
    let mut cache = cache.as_ref().map(|c| c.borrow_mut());
    let lists = [&params[..], &grads[..], &exp_avgs[..], &exp_avg_sqs[..]];
    let (entries, rejected, ok) = collect(py, lists, &steps, strict, cache.as_deref_mut())?;
    if !ok {
        return Ok((false, rejected));
    }
    let mut tensors = tensors(&entries);
    py.detach(|| rustadam::step_tensors(&cfg, &mut tensors, &opts))
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((true, rejected))
}

/// The machine's limit for `adam_step` on the same tensors: the same loads and stores, chunks
/// and threads with trivial arithmetic. For benchmarks: it overwrites the buffers meaninglessly.
#[pyfunction]
#[pyo3(signature = (params, grads, exp_avgs, exp_avg_sqs, *, num_threads))]
fn roofline(
    py: Python<'_>,
    params: Vec<Bound<'_, PyAny>>,
    grads: Vec<Bound<'_, PyAny>>,
    exp_avgs: Vec<Bound<'_, PyAny>>,
    exp_avg_sqs: Vec<Bound<'_, PyAny>>,
    num_threads: usize,
) -> PyResult<()> {
    let steps = vec![1; params.len()];
    let lists = [&params[..], &grads[..], &exp_avgs[..], &exp_avg_sqs[..]];
    let (entries, rejected, _) = collect(py, lists, &steps, true, None)?;
    if let Some((i, why, _)) = rejected.first() {
        return Err(PyValueError::new_err(format!("tensor {i}: {why}")));
    }
    let opts = ExecOptions {
        num_threads,
        ..ExecOptions::default()
    };
    let mut tensors = tensors(&entries);
    py.detach(|| rustadam::roofline(&mut tensors, &opts))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// The hyper-parameters of a call, validated (both entry points, torch and numpy).
#[allow(clippy::too_many_arguments)]
pub(crate) fn config(
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    weight_decouple: bool,
    absolute: bool,
    optimized_update: bool,
) -> PyResult<AdamConfig> {
    let cfg = AdamConfig::default()
        .lr(lr)
        .betas(beta1, beta2)
        .eps(eps)
        .weight_decay(WeightDecay::from_flags(
            weight_decay,
            weight_decouple,
            absolute,
        ))
        .optimized_update(optimized_update);
    cfg.validate()
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(cfg)
}

/// The thread pool by name: "openmp" (torch's OpenMP threads), "rayon" (the core's own), or
/// `None` for OpenMP where the process has it, else rayon.
fn parse_pool(name: Option<&str>) -> PyResult<Option<rustadam::ForkJoin>> {
    let openmp = openmp::fork_join as rustadam::ForkJoin;
    match name {
        None => Ok(openmp::available().then_some(openmp)),
        Some("rayon") => Ok(None),
        Some("openmp") if openmp::available() => Ok(Some(openmp)),
        Some("openmp") => Err(PyValueError::new_err(
            "thread pool 'openmp': no OpenMP runtime is loaded in this process",
        )),
        Some(other) => Err(PyValueError::new_err(format!(
            "unknown thread pool {other:?}; expected 'openmp' or 'rayon'"
        ))),
    }
}

fn parse_simd(name: &str) -> PyResult<SimdLevel> {
    match SimdLevel::from_name(name) {
        Some(l) if l.is_available() => Ok(l),
        Some(_) => Err(PyValueError::new_err(format!(
            "SIMD level {name:?} is not available on this CPU"
        ))),
        None => Err(PyValueError::new_err(format!(
            "unknown SIMD level {name:?}; expected 'portable', 'avx2' or 'avx512'"
        ))),
    }
}

/// The SIMD levels this CPU runs, from the slowest; the last is the one used by default.
#[pyfunction]
fn simd_levels(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    PyTuple::new(py, SimdLevel::available().into_iter().map(|l| l.name()))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(adam_step, m)?)?;
    m.add_function(wrap_pyfunction!(simd_levels, m)?)?;
    m.add_function(wrap_pyfunction!(roofline, m)?)?;
    m.add_class::<TensorCache>()?;
    numpy_api::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
