//! Reading a torch tensor's metadata, and holding its storage.
//!
//! Only exact `torch.Tensor` and `torch.nn.Parameter` objects are read: their attributes are
//! torch's own C getters, so no Python code of a subclass runs while a buffer is checked.
//! Every number needed to place the buffer in memory is read here, once per step; nothing is
//! remembered across steps.

use std::fmt;
use std::sync::OnceLock;

use pyo3::exceptions::PyTypeError;
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::PyType;
use rustadam::layout;
use smallvec::SmallVec;

/// The element types the core takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub(crate) fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// Sizes or strides, inline up to 4 dimensions (read for every tensor at every step; more spill
/// to the heap).
pub(crate) type Dims<T> = SmallVec<[T; 4]>;

/// torch objects compared by identity; looked up once.
pub(crate) struct Torch {
    tensor: Py<PyType>,
    parameter: Py<PyType>,
    strided: Py<PyAny>,
    /// `torch.Tensor`'s own methods, called with the tensor: an exact tensor's lookup finds
    /// them, and calling them directly skips the lookup (read for every buffer of every step).
    is_neg: Py<PyAny>,
    is_conj: Py<PyAny>,
    storage_offset: Py<PyAny>,
    untyped_storage: Py<PyAny>,
    /// `torch.UntypedStorage.data_ptr`, to find a held storage's memory again.
    storage_data_ptr: Py<PyAny>,
    /// `torch._C.DisableTorchFunction`, entered while buffers are read.
    disable_torch_function: Py<PyAny>,
    /// (torch dtype, element type, complex: each element is a pair of reals)
    dtypes: Vec<(Py<PyAny>, DType, bool)>,
    /// torch's objects are laid out as `prefetch` assumes: cache hints may be given.
    pub(crate) hints: bool,
    /// `torch.Tensor.__hash__` as torch defines it (the object's identity), if it is that.
    identity_hash: Option<Py<PyAny>>,
}

pub(crate) fn torch(py: Python<'_>) -> PyResult<&'static Torch> {
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
    let tensor = m.getattr("Tensor")?;
    let identity_hash = identity_hash(&tensor)?;
    let t = Torch {
        is_neg: tensor.getattr("is_neg")?.unbind(),
        is_conj: tensor.getattr("is_conj")?.unbind(),
        storage_offset: tensor.getattr("storage_offset")?.unbind(),
        untyped_storage: tensor.getattr("untyped_storage")?.unbind(),
        storage_data_ptr: m.getattr("UntypedStorage")?.getattr("data_ptr")?.unbind(),
        disable_torch_function: m.getattr("_C")?.getattr("DisableTorchFunction")?.unbind(),
        tensor: tensor.cast_into::<PyType>()?.unbind(),
        parameter: m
            .getattr("nn")?
            .getattr("Parameter")?
            .cast_into::<PyType>()?
            .unbind(),
        strided: m.getattr("strided")?.unbind(),
        dtypes,
        hints: crate::prefetch::layout_holds(py),
        identity_hash,
    };
    Ok(TORCH.get_or_init(|| t))
}

/// Torch-function modes and subclass handlers switched off for as long as it lives: an active
/// `TorchFunctionMode` would otherwise run its own Python code for (and answer) the metadata
/// calls `read` makes, `storage_offset()` included.
pub(crate) struct NoTorchFunction<'py>(Bound<'py, PyAny>);

impl<'py> NoTorchFunction<'py> {
    pub(crate) fn enter(py: Python<'py>, th: &Torch) -> PyResult<Self> {
        let guard = th.disable_torch_function.bind(py).call0()?;
        guard.call_method0(intern!(py, "__enter__"))?;
        Ok(Self(guard))
    }
}

impl Drop for NoTorchFunction<'_> {
    fn drop(&mut self) {
        let py = self.0.py();
        let none = py.None();
        if let Err(e) = self
            .0
            .call_method1(intern!(py, "__exit__"), (&none, &none, &none))
        {
            e.write_unraisable(py, Some(&self.0));
        }
    }
}

/// Why a tensor cannot be a buffer of the core as it is. `Layout` can be stepped through a
/// gathered copy; the others go to the torch path (or are errors, as the caller decides).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Not on the CPU.
    Device(String),
    /// Not a float or complex type the core takes.
    DType(String),
    /// Not `torch.strided`.
    Layout(String),
    /// A negative view (`is_neg()`): its memory holds −x.
    NegView,
    /// A conjugate view (`is_conj()`): its memory holds the conjugate.
    ConjView,
    /// No memory of its own (a freed storage, a wrapper): `data_ptr()` is 0.
    NoData,
    /// Its view reaches outside its storage (a storage shrunk after the view was made).
    OutsideStorage { needed: usize, nbytes: usize },
    /// Its data pointer is not aligned for its element type.
    Misaligned(usize),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device(d) => write!(f, "it is on device {d}; the Rust core runs on CPU tensors"),
            Self::DType(d) => write!(
                f,
                "its dtype is {d}; the Rust core takes float32, float64, bfloat16, float16, \
                 complex64 and complex128"
            ),
            Self::Layout(l) => write!(f, "its layout is {l}, not torch.strided"),
            Self::NegView => write!(f, "it is a negative view (is_neg() is set)"),
            Self::ConjView => write!(f, "it is a conjugate view (is_conj() is set)"),
            Self::NoData => write!(f, "it has no data of its own (data_ptr() is 0)"),
            Self::OutsideStorage { needed, nbytes } => write!(
                f,
                "its view needs {needed} bytes of its storage, which has {nbytes}"
            ),
            Self::Misaligned(p) => write!(f, "its data pointer {p:#x} is misaligned"),
        }
    }
}

/// A tensor's memory as the core sees it: a strided view of real elements, in a storage this
/// value keeps alive.
#[derive(Debug)]
pub(crate) struct Meta {
    /// The first element (offset 0 of the view).
    pub ptr: usize,
    pub dtype: DType,
    pub complex: bool,
    /// Sizes and strides (in elements) of the real view: a complex tensor has a trailing
    /// dimension (re, im) of stride 1.
    pub shape: Dims<usize>,
    pub strides: Dims<isize>,
    /// Real elements.
    pub numel: usize,
    /// `[lowest, highest]` element offsets the view reaches, `None` when empty.
    pub range: Option<(isize, isize)>,
    /// The storage, held so that its memory outlives the call whatever Python code does to
    /// the tensor meanwhile (`p.data = …` in another thread, say).
    pub storage: Option<Py<PyAny>>,
    /// The storage's memory when read: its first byte and its size. A held storage can still
    /// move its memory (`share_memory_()`, `resize_`), which `still_in_place` finds.
    pub storage_at: (usize, usize),
}

impl Meta {
    /// The bytes the view reaches: `[start, end)`, empty for an empty view.
    pub(crate) fn byte_span(&self) -> (usize, usize) {
        let size = self.dtype.size() as isize;
        match self.range {
            None => (self.ptr, self.ptr),
            Some((lo, hi)) => (
                (self.ptr as isize + lo * size) as usize,
                (self.ptr as isize + (hi + 1) * size) as usize,
            ),
        }
    }

    pub(crate) fn is_dense(&self) -> bool {
        layout::is_dense(&self.shape, &self.strides)
    }
}

/// `f(t)`, without the argument tuple a call through pyo3 builds on this abi3 target (three
/// calls for every buffer of every step).
fn call_one<'py>(f: &Py<PyAny>, t: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = t.py();
    // SAFETY: both are live objects and the GIL is held; the argument list ends with NULL as
    // the function requires; it returns a new reference, or NULL with an exception set.
    unsafe {
        let r = ffi::PyObject_CallFunctionObjArgs(
            f.as_ptr(),
            t.as_ptr(),
            std::ptr::null_mut::<ffi::PyObject>(),
        );
        Bound::from_owned_ptr_or_err(py, r)
    }
}

/// `torch.Tensor.__hash__` if it hashes a tensor by its identity, as torch defines it.
fn identity_hash(tensor: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
    let f = tensor.getattr("__hash__")?;
    let probe = tensor.call0()?;
    let by_id = probe.hash()? == probe.as_ptr() as isize;
    Ok(by_id.then(|| f.unbind()))
}

impl Torch {
    /// Whether `torch.Tensor` and `torch.nn.Parameter` still hash by identity (nobody replaced
    /// `__hash__` since torch was looked up): then a dict lookup of an exact tensor finds the
    /// key that is that very object, and never compares keys with `==`.
    pub(crate) fn hashes_by_identity(&self, py: Python<'_>) -> PyResult<bool> {
        let Some(f) = &self.identity_hash else {
            return Ok(false);
        };
        let key = intern!(py, "__hash__");
        Ok(self.tensor.bind(py).getattr(key)?.is(f) && self.parameter.bind(py).getattr(key)?.is(f))
    }

    /// Whether `ty` is exactly `torch.Tensor` or `torch.nn.Parameter` (no subclass).
    pub(crate) fn is_exact_tensor_type(&self, ty: *mut ffi::PyTypeObject) -> bool {
        let ty = ty.cast::<ffi::PyObject>();
        ty == self.tensor.as_ptr() || ty == self.parameter.as_ptr()
    }
}

/// Whether `t` is exactly a `torch.Tensor` or `torch.nn.Parameter` (no subclass).
pub(crate) fn is_exact_tensor(t: &Bound<'_, PyAny>, th: &Torch) -> bool {
    th.is_exact_tensor_type(t.get_type_ptr())
}

/// The integers of a Python tuple (a `torch.Size` or a stride tuple).
fn dims<T: for<'a, 'py> FromPyObject<'a, 'py>>(tuple: Bound<'_, PyAny>) -> PyResult<Dims<T>> {
    tuple
        .try_iter()?
        .map(|x| x?.extract::<T>().map_err(Into::into))
        .collect()
}

/// Reads a tensor; `Ok(Err(_))` when the core cannot take it. `TypeError` for any object that
/// is not exactly a `torch.Tensor` or `torch.nn.Parameter`: nothing else is asked anything.
pub(crate) fn read(
    t: &Bound<'_, PyAny>,
    th: &Torch,
    what: impl FnOnce() -> String,
) -> PyResult<Result<Meta, Refusal>> {
    let py = t.py();
    if !is_exact_tensor(t, th) {
        return Err(PyTypeError::new_err(format!(
            "{} must be exactly a torch.Tensor or torch.nn.Parameter, not {}",
            what(),
            t.get_type().name()?
        )));
    }
    // One C call where torch offers it; the Python attributes otherwise (and for the message
    // of a tensor the core does not take).
    let fast = crate::dlpack::layout(t).filter(|l| l.cpu && l.dtype.is_some());
    let (ptr, dtype, complex, mut shape, mut strides) = match fast {
        Some(l) => {
            let (dtype, complex) = l.dtype.expect("filtered");
            (l.ptr, dtype, complex, l.shape, l.strides)
        }
        None => {
            let layout = t.getattr(intern!(py, "layout"))?;
            if !layout.is(th.strided.bind(py)) {
                return Ok(Err(Refusal::Layout(layout.to_string())));
            }
            if !t.getattr(intern!(py, "is_cpu"))?.extract::<bool>()? {
                let device = t.getattr(intern!(py, "device"))?;
                return Ok(Err(Refusal::Device(device.to_string())));
            }
            let dt = t.getattr(intern!(py, "dtype"))?;
            let Some(&(_, dtype, complex)) = th.dtypes.iter().find(|(d, _, _)| dt.is(d.bind(py)))
            else {
                return Ok(Err(Refusal::DType(dt.to_string())));
            };
            let shape: Dims<usize> = dims(t.getattr(intern!(py, "shape"))?)?;
            let strides: Dims<isize> = dims(t.call_method0(intern!(py, "stride"))?)?;
            let ptr: usize = t.call_method0(intern!(py, "data_ptr"))?.extract()?;
            (ptr, dtype, complex, shape, strides)
        }
    };
    if call_one(&th.is_neg, t)?.extract::<bool>()? {
        return Ok(Err(Refusal::NegView));
    }
    if complex && call_one(&th.is_conj, t)?.extract::<bool>()? {
        return Ok(Err(Refusal::ConjView));
    }
    let mut offset: usize = call_one(&th.storage_offset, t)?.extract()?;
    if complex {
        // A complex tensor is a real one with a trailing dimension (re, im) of stride 1.
        strides.iter_mut().for_each(|s| *s *= 2);
        shape.push(2);
        strides.push(1);
        offset *= 2;
    }
    let numel = shape.iter().product::<usize>();
    let range = layout::offset_range(&shape, &strides);
    let mut meta = Meta {
        ptr,
        dtype,
        complex,
        shape,
        strides,
        numel,
        range,
        storage: None,
        storage_at: (0, 0),
    };
    let Some((lo, hi)) = range else {
        return Ok(Ok(meta));
    };
    if ptr == 0 {
        return Ok(Err(Refusal::NoData));
    }
    if !ptr.is_multiple_of(dtype.size()) {
        return Ok(Err(Refusal::Misaligned(ptr)));
    }
    // The view must lie inside the storage we hold: data_ptr is the storage's base plus
    // storage_offset elements, so the bounds follow from the offsets alone.
    let storage = call_one(&th.untyped_storage, t)?;
    // len() of an UntypedStorage is its size in bytes (a slot call, no method lookup).
    let nbytes: usize = storage.len()?;
    let first = offset as isize + lo;
    let needed = (offset as isize + hi + 1) as usize * dtype.size();
    if first < 0 || needed > nbytes {
        return Ok(Err(Refusal::OutsideStorage { needed, nbytes }));
    }
    meta.storage = Some(storage.unbind());
    meta.storage_at = (ptr - offset * dtype.size(), nbytes);
    Ok(Ok(meta))
}

/// Whether the storage `m` holds still has the memory it had when `m` was read (nothing moved
/// it since: `share_memory_()`, `resize_` and the like replace a storage's memory in place).
pub(crate) fn still_in_place(py: Python<'_>, m: &Meta, th: &Torch) -> PyResult<bool> {
    let Some(storage) = &m.storage else {
        return Ok(true); // an empty view: nothing is read or written
    };
    let storage = storage.bind(py);
    let base: usize = call_one(&th.storage_data_ptr, storage)?.extract()?;
    Ok((base, storage.len()?) == m.storage_at)
}
