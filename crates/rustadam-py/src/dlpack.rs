//! A tensor's layout in one C call: torch's DLPack exchange API (DLPack ≥ 1.2, torch ≥ 2.9).
//!
//! `dltensor_from_py_object_no_sync` fills a `DLTensor` (data pointer, device, dtype, shape,
//! strides) straight from the C++ tensor, where reading the same through Python attributes
//! takes six calls. The view it gives is valid only while the GIL is held and the tensor is not
//! changed: `read` copies what it needs at once. Where torch has no such API, `layout` is None
//! and the caller reads the Python attributes instead.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods};

use crate::tensor::{DType, Dims};

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

/// `DLTensor` of dlpack.h (stable since DLPack 0.x).
#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *const i64,
    strides: *const i64,
    byte_offset: u64,
}

#[repr(C)]
struct Version {
    major: u32,
    minor: u32,
}

/// `DLPackExchangeAPI` of dlpack.h ≥ 1.2: a versioned header, then five function pointers.
#[repr(C)]
struct ExchangeApi {
    version: Version,
    prev_api: *const c_void,
    managed_tensor_allocator: *const c_void,
    managed_tensor_from_py_object_no_sync: *const c_void,
    managed_tensor_to_py_object_no_sync: *const c_void,
    dltensor_from_py_object_no_sync:
        Option<unsafe extern "C" fn(py_object: *mut c_void, out: *mut DLTensor) -> c_int>,
    current_work_stream: *const c_void,
}

type FromPyObject = unsafe extern "C" fn(*mut c_void, *mut DLTensor) -> c_int;

/// torch's `dltensor_from_py_object_no_sync`, if this torch has it; looked up once.
fn exporter(py: Python<'_>) -> Option<FromPyObject> {
    static FOUND: OnceLock<Option<usize>> = OnceLock::new();
    let f = *FOUND.get_or_init(|| lookup(py).map(|f| f as usize));
    // SAFETY: the value was made from a function pointer of this type just above.
    f.map(|f| unsafe { std::mem::transmute::<usize, FromPyObject>(f) })
}

fn lookup(py: Python<'_>) -> Option<FromPyObject> {
    if std::env::var_os("RUSTADAM_NO_DLPACK").is_some() {
        return None;
    }
    let capsule = py
        .import("torch")
        .and_then(|t| t.getattr("_C"))
        .and_then(|c| c.call_method0("_dlpack_exchange_api"))
        .ok()?;
    let capsule = capsule.cast::<PyCapsule>().ok()?;
    let ptr = capsule.pointer_checked(Some(c"dlpack_exchange_api")).ok()?;
    // SAFETY: torch's capsule of this name points at its static DLPackExchangeAPI, which lives
    // as long as the process; the header (version) is stable across DLPack versions.
    let api = unsafe { &*(ptr.as_ptr() as *const ExchangeApi) };
    // The function-pointer layout above is that of DLPack 1.2 and later 1.x.
    if api.version.major != 1 || api.version.minor < 2 {
        return None;
    }
    api.dltensor_from_py_object_no_sync
}

/// A tensor's layout as DLPack describes it (elements, not bytes).
pub(crate) struct Layout {
    pub ptr: usize,
    pub cpu: bool,
    /// The element type and whether it is complex; None for a type the core does not take.
    pub dtype: Option<(DType, bool)>,
    pub shape: Dims<usize>,
    pub strides: Dims<isize>,
}

/// Reads `t`'s layout in one call; None where torch has no such API or cannot export `t`
/// (the caller then reads its Python attributes). `t` must be exactly a `torch.Tensor` or
/// `torch.nn.Parameter`, the type the API was discovered from.
pub(crate) fn layout(t: &Bound<'_, PyAny>) -> Option<Layout> {
    let export = exporter(t.py())?;
    let mut out = DLTensor {
        data: std::ptr::null_mut(),
        device: DLDevice {
            device_type: 0,
            device_id: 0,
        },
        ndim: 0,
        dtype: DLDataType {
            code: 0,
            bits: 0,
            lanes: 0,
        },
        shape: std::ptr::null(),
        strides: std::ptr::null(),
        byte_offset: 0,
    };
    // SAFETY: `t` is a live torch tensor of the type the API was found on, the GIL is held, and
    // `out` is a DLTensor the function fills.
    if unsafe { export(t.as_ptr() as *mut c_void, &mut out) } != 0 {
        // It cannot export this tensor (a sparse one, say): clear its error, read attributes.
        drop(PyErr::take(t.py()));
        return None;
    }
    let ndim = usize::try_from(out.ndim).ok()?;
    if ndim > 0 && (out.shape.is_null() || out.strides.is_null()) {
        return None; // strides may be NULL for compact tensors in DLPack: read attributes
    }
    // SAFETY: for ndim > 0 the producer points shape and strides at ndim values, valid until
    // control returns to Python (we copy them now).
    let (shape, strides) = unsafe {
        if ndim == 0 {
            (&[][..], &[][..])
        } else {
            (
                std::slice::from_raw_parts(out.shape, ndim),
                std::slice::from_raw_parts(out.strides, ndim),
            )
        }
    };
    let dtype = match (out.dtype.code, out.dtype.bits, out.dtype.lanes) {
        (2, 32, 1) => Some((DType::F32, false)),
        (2, 64, 1) => Some((DType::F64, false)),
        (2, 16, 1) => Some((DType::F16, false)),
        (4, 16, 1) => Some((DType::BF16, false)),
        (5, 64, 1) => Some((DType::F32, true)),
        (5, 128, 1) => Some((DType::F64, true)),
        _ => None,
    };
    Some(Layout {
        ptr: (out.data as usize).wrapping_add(out.byte_offset as usize),
        cpu: out.device.device_type == 1,
        dtype,
        shape: shape.iter().map(|&n| n as usize).collect(),
        strides: strides.iter().map(|&s| s as isize).collect(),
    })
}
