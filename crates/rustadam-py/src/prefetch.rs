//! Cache hints for the tensors a step is about to read.
//!
//! A step of many small tensors spends most of its checking time waiting on memory: for each
//! buffer torch's calls touch its Python object, its C++ `TensorImpl` and its `StorageImpl`
//! (and a parameter's autograd metadata for `.grad`), each likely a cache miss after the
//! previous step's kernel streamed the data through the caches, and each waited for in turn.
//! Hinting the CPU to fetch the lines of the tensors a few places ahead overlaps those misses
//! (4,000 tensors of 1,000 elements: about 1.7 ms of a 15 ms step).
//!
//! Finding a `TensorImpl` takes torch's C++ layout: the tensor's Python object holds the
//! pointer right after the object header, and the `TensorImpl` holds its storage's and its
//! autograd metadata's pointers at fixed places. That layout is checked once against torch's
//! own answers (`Tensor._cdata`, `UntypedStorage._cdata`); where it does not hold, no hint is
//! given. A hint reads words only inside objects the caller holds and never dereferences what
//! it finds there: it prefetches it, and a prefetch of any address cannot fault. A wrong guess
//! can cost speed, never correctness.

use pyo3::ffi;
use pyo3::prelude::*;

use crate::tensor::Torch;

/// How far ahead (in tensors, or parameters) each stage runs: the object's line first, then
/// the `TensorImpl` lines it points to, then what the `TensorImpl` points to. Each stage finds
/// the previous one's lines in the cache.
const AHEAD: [usize; 3] = [12, 8, 4];

/// The word of a `THPVariable` (torch's tensor object) holding its `TensorImpl` pointer.
const IMPL_WORD: usize = 2;
/// The words of a `TensorImpl` holding its `StorageImpl` and `AutogradMeta` pointers (after
/// the vtable and the reference counts).
const STORAGE_WORD: usize = 2;
const AUTOGRAD_META_WORD: usize = 3;
/// The word of a `TensorImpl` holding its version counter's pointer (after the autograd and
/// extra metadata): the counter a step bumps for every tensor it writes, in an allocation of
/// its own.
const VERSION_WORD: usize = 5;
/// The `TensorImpl` lines torch's metadata calls read (sizes, strides, offset, dtype, keys).
const IMPL_LINES: usize = 4;

/// What the third stage fetches: the storage (for the buffer reads of a plan), the autograd
/// metadata (for `.grad`, read while a step gathers its lists) or the version counter (for
/// the version bumps of the tensors a step wrote).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    Storage,
    AutogradMeta,
    Version,
}

fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it never faults and changes no state the program sees,
    // whatever the address.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(addr as *const i8);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// `ptr`'s `word`-th machine word.
///
/// # Safety
/// The word lies inside a live allocation and is aligned. Another thread may write it
/// meanwhile (a concurrent `set_` in C++): the value read is then only a wrong hint.
unsafe fn word(ptr: usize, word: usize) -> usize {
    // SAFETY: the function's contract.
    unsafe { (ptr as *const usize).add(word).read_volatile() }
}

/// The `TensorImpl` of `obj` if `obj` is exactly a `torch.Tensor` or `torch.nn.Parameter`
/// and torch's layout was confirmed; None otherwise.
///
/// # Safety
/// `obj` is a live Python object (the caller holds a reference to it, or to the list that
/// does), and the GIL is held.
unsafe fn tensor_impl(obj: *mut ffi::PyObject, th: &Torch) -> Option<usize> {
    if obj.is_null() || !th.hints {
        return None;
    }
    // SAFETY: `obj` is live (the contract); its type pointer is in its header.
    let ty = unsafe { ffi::Py_TYPE(obj) };
    if !th.is_exact_tensor_type(ty) {
        return None;
    }
    // SAFETY: exact tensor objects are at least `MIN_BASICSIZE` bytes (checked with the layout),
    // so the word is inside the object; objects are 8-aligned.
    Some(unsafe { word(obj as usize, IMPL_WORD) })
}

/// One stage's hints for one object.
///
/// # Safety
/// As `tensor_impl`; and for the stages after the first, the object holds its `TensorImpl`
/// alive (a tensor object owns a reference to it).
unsafe fn stage(k: usize, obj: *mut ffi::PyObject, then: Then, th: &Torch) {
    if k == 0 {
        prefetch(obj as usize);
        return;
    }
    // SAFETY: the function's contract.
    let Some(imp) = (unsafe { tensor_impl(obj, th) }) else {
        return;
    };
    if k == 1 {
        (0..IMPL_LINES).for_each(|l| prefetch(imp + 64 * l));
        return;
    }
    let w = match then {
        Then::Storage => STORAGE_WORD,
        Then::AutogradMeta => AUTOGRAD_META_WORD,
        Then::Version => VERSION_WORD,
    };
    // SAFETY: `imp` is the live TensorImpl the object owns (layout confirmed), which is far
    // larger than these first words; what it points to is only prefetched.
    let target = unsafe { word(imp, w) };
    prefetch(target);
    prefetch(target + 64);
}

/// Hints the tensors `objs(i + AHEAD[k])` will need, for each stage `k`, while the caller
/// works on entry `i` of `n`. `objs(j)` gives entry `j`'s objects (null where none).
///
/// # Safety
/// Every non-null pointer `objs` returns is a live Python object for as long as this call
/// runs (the caller holds it, or the list that holds it), and the GIL is held.
pub(crate) unsafe fn ahead<const K: usize>(
    th: &Torch,
    i: usize,
    n: usize,
    then: Then,
    objs: impl Fn(usize) -> [*mut ffi::PyObject; K],
) {
    for (k, d) in AHEAD.iter().enumerate() {
        if i + d < n {
            for obj in objs(i + d) {
                // SAFETY: the function's contract.
                unsafe { stage(k, obj, then, th) };
            }
        }
    }
}

/// Runs `f` over `objs` in chunks, `f(start, end)` for each, having hinted each chunk's lines
/// while the chunks before it ran: for a loop that is not ours (torch's, which waits on each
/// tensor's object, `TensorImpl` and `then` target in turn), the stages run one, two and three
/// chunks ahead.
///
/// # Safety
/// Every non-null pointer of `objs` is a live Python object for as long as this call runs (the
/// caller holds it, or the list that holds it), and the GIL is held.
pub(crate) unsafe fn chunked(
    th: &Torch,
    objs: &[*mut ffi::PyObject],
    then: Then,
    mut f: impl FnMut(usize, usize) -> PyResult<()>,
) -> PyResult<()> {
    const CHUNK: usize = 64;
    let n = objs.len();
    let hint = |k: usize, chunk: usize| {
        let lo = (chunk * CHUNK).min(n);
        for &obj in &objs[lo..(lo + CHUNK).min(n)] {
            // SAFETY: the function's contract.
            unsafe { stage(k, obj, then, th) };
        }
    };
    for k in 0..3 {
        hint(k, 0);
    }
    for chunk in 0..n.div_ceil(CHUNK) {
        hint(2, chunk + 1);
        hint(1, chunk + 2);
        hint(0, chunk + 3);
        f(chunk * CHUNK, ((chunk + 1) * CHUNK).min(n))?;
    }
    Ok(())
}

/// The smallest `tp_basicsize` of an exact tensor type for which `IMPL_WORD` is inside it.
const MIN_BASICSIZE: usize = (IMPL_WORD + 1) * std::mem::size_of::<usize>();

/// Whether torch's objects are laid out as the hints assume (checked once, when the step
/// first looks torch up).
pub(crate) fn layout_holds(py: Python<'_>) -> bool {
    check_layout(py).unwrap_or(false)
}

fn check_layout(py: Python<'_>) -> PyResult<bool> {
    let torch = py.import("torch")?;
    let t = torch.call_method1("empty", (1,))?;
    let p = torch.getattr("nn")?.getattr("Parameter")?.call1((&t,))?;
    for obj in [&t, &p] {
        if obj
            .get_type()
            .getattr("__basicsize__")?
            .extract::<usize>()?
            < MIN_BASICSIZE
        {
            return Ok(false);
        }
        let imp: usize = obj.getattr("_cdata")?.extract()?;
        let storage: usize = obj
            .call_method0("untyped_storage")?
            .getattr("_cdata")?
            .extract()?;
        // SAFETY: `obj` is alive (held here) and at least MIN_BASICSIZE bytes.
        if imp == 0 || unsafe { word(obj.as_ptr() as usize, IMPL_WORD) } != imp {
            return Ok(false);
        }
        // SAFETY: `imp` is the TensorImpl torch reports for the live `obj`, which is larger
        // than three words.
        if unsafe { word(imp, STORAGE_WORD) } != storage {
            return Ok(false);
        }
    }
    // The version counter: shared by a view (which bumps it too), not by `.data` (a tensor
    // autograd does not track), though both share the storage.
    let impl_of = |obj: &Bound<'_, PyAny>| -> PyResult<usize> { obj.getattr("_cdata")?.extract() };
    let (view, data) = (t.call_method1("view", (-1,))?, t.getattr("data")?);
    let imps = [impl_of(&t)?, impl_of(&view)?, impl_of(&data)?];
    if imps.contains(&0) || imps[0] == imps[1] || imps[0] == imps[2] {
        return Ok(false);
    }
    // SAFETY: live TensorImpls torch reports for objects held here, larger than six words.
    let [a, b, c] = imps.map(|imp| unsafe { word(imp, VERSION_WORD) });
    Ok(a != 0 && a == b && a != c && c != 0)
}
