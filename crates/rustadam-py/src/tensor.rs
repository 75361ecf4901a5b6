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
use pyo3::types::{PyList, PyType};
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
    /// The methods of `torch._C.TensorBase` and `torch._C.StorageBase`, called with the
    /// tensor or storage: calling them directly skips the lookup (read for every buffer of
    /// every step), and these types are immutable, so no Python code can replace them (a
    /// `torch.UntypedStorage.__len__` assigned by user code would lie about a storage's size).
    is_neg: NoArgs,
    is_conj: NoArgs,
    untyped_storage: NoArgs,
    storage_data_ptr: NoArgs,
    storage_nbytes: NoArgs,
    /// `torch._C.StorageBase` and its C `__len__` (its size in bytes), called directly where
    /// this Python exposes a static type's slots (3.10 and later) and it agrees with
    /// `nbytes()`: a method call costs more than the rest of the check.
    storage_base: Py<PyType>,
    storage_len: Option<ffi::lenfunc>,
    /// Where torch has no one-call read (`dlpack::layout`): `TensorBase`'s getters of
    /// `layout`, `is_cpu`, `dtype` and `shape`, and its `stride` and `data_ptr` methods.
    attributes: [Py<PyAny>; 6],
    /// `torch._C._increment_version`: autograd's record that a tensor was written in place.
    increment_version: Py<PyAny>,
    /// `gc.isenabled`, `gc.disable` and `gc.enable`, for `NoCollection`.
    gc: [Py<PyAny>; 3],
    /// `torch._C.DisableTorchFunction` and `torch._C._DisableTorchDispatch`, entered while
    /// buffers are read.
    disable_torch_function: Py<PyAny>,
    disable_torch_dispatch: Py<PyAny>,
    /// `torch._C._len_torch_function_stack` and `_len_torch_dispatch_stack`: how many modes
    /// of each kind are active.
    mode_stacks: [Py<PyAny>; 2],
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
    let c = m.getattr("_C")?;
    let (tensor_base, storage_base) = (c.getattr("TensorBase")?, c.getattr("StorageBase")?);
    let probe = tensor.call0()?;
    let storage_probe = m.getattr("UntypedStorage")?.call1((24,))?;
    let t = Torch {
        is_neg: NoArgs::new(&tensor_base, "is_neg", &probe)?,
        is_conj: NoArgs::new(&tensor_base, "is_conj", &probe)?,
        untyped_storage: NoArgs::new(&tensor_base, "untyped_storage", &probe)?,
        storage_data_ptr: NoArgs::new(&storage_base, "data_ptr", &storage_probe)?,
        storage_nbytes: NoArgs::new(&storage_base, "nbytes", &storage_probe)?,
        storage_len: storage_len(py, &storage_base, &storage_probe)?,
        storage_base: storage_base.clone().cast_into::<PyType>()?.unbind(),
        attributes: [
            tensor_base.getattr("layout")?.unbind(),
            tensor_base.getattr("is_cpu")?.unbind(),
            tensor_base.getattr("dtype")?.unbind(),
            tensor_base.getattr("shape")?.unbind(),
            tensor_base.getattr("stride")?.unbind(),
            tensor_base.getattr("data_ptr")?.unbind(),
        ],
        disable_torch_function: c.getattr("DisableTorchFunction")?.unbind(),
        disable_torch_dispatch: c.getattr("_DisableTorchDispatch")?.unbind(),
        mode_stacks: [
            c.getattr("_len_torch_function_stack")?.unbind(),
            c.getattr("_len_torch_dispatch_stack")?.unbind(),
        ],
        increment_version: c.getattr("_increment_version")?.unbind(),
        gc: {
            let gc = py.import("gc")?;
            [
                gc.getattr("isenabled")?.unbind(),
                gc.getattr("disable")?.unbind(),
                gc.getattr("enable")?.unbind(),
            ]
        },
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

/// `StorageBase`'s C `__len__`, where Python gives a static type's slots (3.10 and later) and
/// it answers as `nbytes()` does on a probe; None otherwise.
fn storage_len(
    py: Python<'_>,
    storage_base: &Bound<'_, PyAny>,
    probe: &Bound<'_, PyAny>,
) -> PyResult<Option<ffi::lenfunc>> {
    if py.version_info() < (3, 10) {
        return Ok(None);
    }
    let ty = storage_base.cast::<PyType>()?;
    // SAFETY: a live type object; the GIL is held. On 3.10 and later any type gives its slots.
    let slot = unsafe { ffi::PyType_GetSlot(ty.as_type_ptr(), ffi::Py_sq_length) };
    if slot.is_null() {
        drop(PyErr::take(py));
        return Ok(None);
    }
    // SAFETY: the `Py_sq_length` slot holds a `lenfunc`.
    let len = unsafe { std::mem::transmute::<*mut std::ffi::c_void, ffi::lenfunc>(slot) };
    let nbytes: isize = storage_base.getattr("nbytes")?.call1((probe,))?.extract()?;
    // SAFETY: `probe` is an instance of `StorageBase`, alive, with the GIL held.
    let n = unsafe { len(probe.as_ptr()) };
    Ok((n == nbytes && n == 24).then_some(len))
}

/// Torch-function and torch-dispatch modes switched off for as long as it lives: an active
/// `TorchFunctionMode` would otherwise run its own Python code for (and answer) the metadata
/// calls `read` makes, `is_neg()` included, and a `TorchDispatchMode` would answer the device
/// of a tensor whose device torch asks Python for (a fake tensor whose class was set to
/// `torch.nn.Parameter`): with both off, such a question raises instead. A guard is entered
/// only where its kind of mode is active (each costs a few Python calls, on every step): only
/// exact tensors are read, whose metadata calls only a mode sends to Python, save a tensor
/// torch itself asks Python about (a subclass instance with a Python sizes/strides policy whose
/// class was set to `nn.Parameter`). Its answers are used as torch uses them; its view is still
/// checked against its storage's memory (`hold`), so a false answer moves the writes within
/// that storage, as it moves torch's own.
pub(crate) struct NoModes<'py>(SmallVec<[Bound<'py, PyAny>; 2]>);

impl<'py> NoModes<'py> {
    pub(crate) fn enter(py: Python<'py>, th: &Torch) -> PyResult<Self> {
        let mut guards = Self(SmallVec::new());
        for (active, disable) in [
            (&th.mode_stacks[0], &th.disable_torch_function),
            (&th.mode_stacks[1], &th.disable_torch_dispatch),
        ] {
            if active.bind(py).call0()?.extract::<usize>()? == 0 {
                continue;
            }
            let guard = disable.bind(py).call0()?;
            guard.call_method0(intern!(py, "__enter__"))?;
            // Entered: left on drop whatever happens to the next.
            guards.0.push(guard);
        }
        Ok(guards)
    }
}

impl Drop for NoModes<'_> {
    fn drop(&mut self) {
        for guard in self.0.iter().rev() {
            let py = guard.py();
            let none = py.None();
            if let Err(e) = guard.call_method1(intern!(py, "__exit__"), (&none, &none, &none)) {
                e.write_unraisable(py, Some(guard));
            }
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
    /// No memory of its own (a freed storage, a wrapper, a meta storage): its `data_ptr()` or
    /// its storage's is 0.
    NoData,
    /// Its view reaches outside its storage (a storage shrunk after the view was made, or a
    /// tensor whose data another thread replaced while it was read): it covers bytes
    /// `[start, end)` of a storage of `nbytes`.
    OutsideStorage {
        start: isize,
        end: isize,
        nbytes: usize,
    },
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
            Self::NoData => write!(
                f,
                "it has no data of its own (its data_ptr() or its storage's is 0)"
            ),
            Self::OutsideStorage { start, end, nbytes } => write!(
                f,
                "its view covers bytes [{start}, {end}) of its storage, which has {nbytes}"
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

/// A method of one of torch's C types that takes no argument (`is_neg`, `untyped_storage`,
/// …). Where Python shows it as a C function of that kind (`METH_NOARGS`), it is called as
/// that function, `f(self, NULL)`, as Python's own call ends up doing: the descriptor's
/// argument and type checks it skips are made for every buffer of every step (about 1 ms of a
/// 16 ms step of 4,000 parameters). Otherwise (another Python, another torch) through the
/// descriptor.
struct NoArgs {
    descriptor: Py<PyAny>,
    direct: Option<ffi::PyCFunction>,
}

impl NoArgs {
    /// `ty.name`, checked on `probe`, an instance of `ty`.
    fn new(ty: &Bound<'_, PyAny>, name: &str, probe: &Bound<'_, PyAny>) -> PyResult<Self> {
        let descriptor = ty.getattr(name)?;
        let bound = descriptor.call_method1("__get__", (probe,))?;
        let b = bound.as_ptr();
        // SAFETY: a live object and the GIL held; the getters are asked only of a C function
        // object (PyCFunction_Check).
        let direct = unsafe {
            let noargs = ffi::PyCFunction_Check(b) != 0
                && ffi::PyCFunction_GetFlags(b) == ffi::METH_NOARGS
                && ffi::PyCFunction_GetSelf(b) == probe.as_ptr();
            if noargs {
                ffi::PyCFunction_GetFunction(b)
            } else {
                None
            }
        };
        Ok(Self {
            descriptor: descriptor.unbind(),
            direct,
        })
    }

    /// The method called on `obj`.
    ///
    /// # Safety
    /// `obj` is an instance of the type the method was looked up on (the direct call does not
    /// check, as the descriptor would).
    unsafe fn call<'py>(&self, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        match self.direct {
            // SAFETY: a METH_NOARGS function takes (self, NULL) and returns a new reference
            // or NULL with an exception set; `obj` is of its type (the contract), alive, and
            // the GIL is held.
            Some(f) => unsafe {
                let r = f(obj.as_ptr(), std::ptr::null_mut());
                Bound::from_owned_ptr_or_err(obj.py(), r)
            },
            None => call_one(&self.descriptor, obj),
        }
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

    /// TypeError unless every entry of `written` is a tensor: checked before a step writes
    /// anything, so that its version bumps cannot fail part way after the writes.
    pub(crate) fn check_tensors(&self, written: &Bound<'_, PyList>) -> PyResult<()> {
        let tensor = self.tensor.as_ptr().cast::<ffi::PyTypeObject>();
        for (i, t) in written.iter().enumerate() {
            // SAFETY: live type objects; the GIL is held. No Python code runs.
            if unsafe { ffi::PyType_IsSubtype(t.get_type_ptr(), tensor) } == 0 {
                return Err(PyTypeError::new_err(format!(
                    "written[{i}] must be a torch.Tensor, not {}",
                    t.get_type().name()?
                )));
            }
        }
        Ok(())
    }

    /// Bumps the version counter of every tensor of `written` (autograd then refuses a backward
    /// through a graph that saved one of them before the step). torch's loop waits on each
    /// tensor's lines in turn, cold after a step streamed its data through the caches (about
    /// 250 ns a tensor): it is called a chunk at a time, with the next chunks' lines hinted.
    pub(crate) fn increment_version(&self, written: &Bound<'_, PyList>) -> PyResult<()> {
        let held: Vec<Bound<'_, PyAny>> = written.iter().collect();
        let objs: Vec<*mut ffi::PyObject> = held.iter().map(|t| t.as_ptr()).collect();
        // SAFETY: `held` holds every object for the whole call; the GIL is held.
        unsafe {
            crate::prefetch::chunked(self, &objs, crate::prefetch::Then::Version, |lo, hi| {
                call_one(&self.increment_version, written.get_slice(lo, hi).as_any()).map(drop)
            })
        }
    }

    /// A storage's memory: its first byte and its size in bytes.
    fn storage_memory(&self, storage: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
        let py = storage.py();
        let ty = storage.get_type_ptr();
        // SAFETY: both are live type objects; the GIL is held.
        if unsafe { ffi::PyType_IsSubtype(ty, self.storage_base.as_ptr().cast()) } == 0 {
            return Err(PyTypeError::new_err(format!(
                "untyped_storage() gave a {}, not a torch storage",
                storage.get_type().name()?
            )));
        }
        // SAFETY: `storage` is an instance of `StorageBase`, the methods' type (just checked).
        let base = unsafe { self.storage_data_ptr.call(storage) }?.extract()?;
        let nbytes = match self.storage_len {
            Some(len) => {
                // SAFETY: `len` is `StorageBase`'s own C `__len__` and `storage` an instance of
                // it (checked just above), alive and with the GIL held.
                let n = unsafe { len(storage.as_ptr()) };
                usize::try_from(n).map_err(|_| {
                    PyErr::take(py).unwrap_or_else(|| PyTypeError::new_err("a storage's size"))
                })?
            }
            // SAFETY: as for `data_ptr` above.
            None => unsafe { self.storage_nbytes.call(storage) }?.extract()?,
        };
        Ok((base, nbytes))
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
            // `TensorBase`'s own getters and methods (a getset descriptor's `__get__` is the
            // getter), never `t`'s attribute lookup, which Python code could redirect.
            let [layout, is_cpu, dtype, shape, stride, data_ptr] = &th.attributes;
            let get = |d: &Py<PyAny>| d.bind(py).call_method1(intern!(py, "__get__"), (t,));
            let layout = get(layout)?;
            if !layout.is(th.strided.bind(py)) {
                return Ok(Err(Refusal::Layout(layout.to_string())));
            }
            if !get(is_cpu)?.extract::<bool>()? {
                let device = t.getattr(intern!(py, "device"))?;
                return Ok(Err(Refusal::Device(device.to_string())));
            }
            let dt = get(dtype)?;
            let Some(&(_, dtype, complex)) = th.dtypes.iter().find(|(d, _, _)| dt.is(d.bind(py)))
            else {
                return Ok(Err(Refusal::DType(dt.to_string())));
            };
            let shape: Dims<usize> = dims(get(shape)?)?;
            let strides: Dims<isize> = dims(call_one(stride, t)?)?;
            let ptr: usize = call_one(data_ptr, t)?.extract()?;
            (ptr, dtype, complex, shape, strides)
        }
    };
    // SAFETY: `t` is exactly a tensor (checked above), an instance of `TensorBase`, the
    // method's type.
    let neg = unsafe { th.is_neg.call(t) }?;
    if neg.extract::<bool>()? {
        return Ok(Err(Refusal::NegView));
    }
    // SAFETY: as for `is_neg`.
    if complex && unsafe { th.is_conj.call(t) }?.extract::<bool>()? {
        return Ok(Err(Refusal::ConjView));
    }
    if complex {
        // A complex tensor is a real one with a trailing dimension (re, im) of stride 1.
        strides.iter_mut().for_each(|s| *s *= 2);
        shape.push(2);
        strides.push(1);
    }
    let numel = shape.iter().product::<usize>();
    let range = layout::offset_range(&shape, &strides);
    let meta = Meta {
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
    if range.is_some() {
        if ptr == 0 {
            return Ok(Err(Refusal::NoData));
        }
        if !ptr.is_multiple_of(dtype.size()) {
            return Ok(Err(Refusal::Misaligned(ptr)));
        }
    }
    Ok(Ok(meta))
}

/// Takes a reference to the storage of `t`, the tensor `m` was read from, and checks that the
/// view `m` describes lies inside that storage's memory. The view and the storage come from
/// separate calls, with `read`'s `is_neg()` (which releases the GIL) between them and other
/// tensors' reads: another thread may have given `t` other data meanwhile. Measured against
/// the held storage itself, a view that is not inside it is refused, and one that is can be
/// written for as long as the storage is held. `m.storage` stays None for an empty view.
pub(crate) fn hold(
    t: &Bound<'_, PyAny>,
    th: &Torch,
    m: &mut Meta,
) -> PyResult<Result<(), Refusal>> {
    let Some((lo, hi)) = m.range else {
        return Ok(Ok(()));
    };
    if !is_exact_tensor(t, th) {
        return Err(PyTypeError::new_err("hold: not exactly a torch.Tensor"));
    }
    // SAFETY: `t` is exactly a tensor (just checked), an instance of `TensorBase`.
    let storage = unsafe { th.untyped_storage.call(t) }?;
    let (base, nbytes) = th.storage_memory(&storage)?;
    if base == 0 {
        // A storage without memory (a meta storage): the view's address is its offset alone.
        return Ok(Err(Refusal::NoData));
    }
    let size = m.dtype.size() as isize;
    let at = m.ptr.wrapping_sub(base) as isize;
    let byte = |i: isize| i.checked_mul(size).and_then(|b| b.checked_add(at));
    let (start, end) = match (byte(lo), hi.checked_add(1).and_then(byte)) {
        (Some(s), Some(e)) => (s, e),
        _ => (isize::MIN, isize::MAX), // beyond any storage
    };
    if start < 0 || end as usize > nbytes {
        return Ok(Err(Refusal::OutsideStorage { start, end, nbytes }));
    }
    m.storage = Some(storage.unbind());
    m.storage_at = (base, nbytes);
    Ok(Ok(()))
}

/// The cyclic garbage collector paused for as long as it lives (if it was running): a
/// collection runs finalizers (arbitrary Python code) inside any allocation of a tracked
/// object, `untyped_storage()`'s result included.
pub(crate) struct NoCollection<'py>(Option<Bound<'py, PyAny>>);

impl<'py> NoCollection<'py> {
    pub(crate) fn enter(py: Python<'py>, th: &Torch) -> PyResult<Self> {
        let [isenabled, disable, enable] = &th.gc;
        if !isenabled.bind(py).call0()?.is_truthy()? {
            return Ok(Self(None));
        }
        disable.bind(py).call0()?;
        Ok(Self(Some(enable.bind(py).clone())))
    }
}

impl Drop for NoCollection<'_> {
    fn drop(&mut self) {
        let Some(enable) = &self.0 else { return };
        if let Err(e) = enable.call0() {
            e.write_unraisable(enable.py(), Some(enable));
        }
    }
}

/// Whether the storage `m` holds still has the memory it had when `m` was read (nothing moved
/// it since: `share_memory_()`, `resize_` and the like replace a storage's memory in place).
pub(crate) fn still_in_place(py: Python<'_>, m: &Meta, th: &Torch) -> PyResult<bool> {
    let Some(storage) = &m.storage else {
        return Ok(true); // an empty view: nothing is read or written
    };
    Ok(th.storage_memory(storage.bind(py))? == m.storage_at)
}
