//! The checked plan of one step: every buffer of every parameter of every group is read and
//! checked before anything is written, and the only way to a slice over foreign memory is
//! through a [`Plan`].
//!
//! A plan holds the storage of each buffer it will touch, so their memory outlives the step
//! whatever other threads do to the tensors while the GIL is released. The storages are taken
//! and the views checked against them in one last pass in which no Python code can run; from
//! there `step_plain` writes without Python code in between, and a plan handed to Python
//! checks again at `execute` that every storage still has its memory. The one precondition
//! left to the user is torch's own: nothing gives a stepped storage new memory while the
//! kernel runs.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use rustadam::layout::{self, Span};
use rustadam::{bf16, f16, AdamConfig, AnyTensor, Element, ExecOptions, Rounding, TensorRefs};
use smallvec::SmallVec;

use crate::config::Config;
use crate::prefetch::{self, Then};
use crate::registry;
use crate::tensor::{self, DType, Meta, Refusal, Torch};
use crate::threads;

/// The buffers of one parameter, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Param,
    Grad,
    ExpAvg,
    ExpAvgSq,
    MaxExpAvgSq,
    Compensation,
}

impl Role {
    const ALL: [Role; 6] = [
        Role::Param,
        Role::Grad,
        Role::ExpAvg,
        Role::ExpAvgSq,
        Role::MaxExpAvgSq,
        Role::Compensation,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::Param => "param",
            Role::Grad => "grad",
            Role::ExpAvg => "exp_avg",
            Role::ExpAvgSq => "exp_avg_sq",
            Role::MaxExpAvgSq => "max_exp_avg_sq",
            Role::Compensation => "compensation",
        }
    }

    fn written(self) -> bool {
        self != Role::Grad
    }
}

/// Why a parameter is not stepped by the core: `Deferred` ones may go to the torch path,
/// `Fatal` ones make the whole step fail.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Problem {
    /// The core does not take this buffer; torch's ops can.
    Deferred(Role, Refusal),
    /// A buffer of another dtype than the parameter.
    DTypeMismatch(Role),
    /// A buffer of another shape than the parameter.
    ShapeMismatch(Role),
    /// Two buffers of the parameter share memory.
    SharedWith(Role, Role),
    /// A written buffer whose elements may share memory (an expanded view).
    SelfOverlap(Role),
    /// The buffer's view does not fit its storage.
    Storage(Role, Refusal),
    /// Torch raised reading the buffer's metadata or its storage (a fake tensor made to pass
    /// for a parameter, whose device only a mode could answer): its message.
    Unreadable(Role, String),
}

impl Problem {
    fn message(&self, meta_shape: impl Fn(Role) -> String) -> String {
        match self {
            Problem::Deferred(r, why) | Problem::Storage(r, why) => format!("{}: {why}", r.name()),
            Problem::DTypeMismatch(r) => format!("its {} has another dtype than it", r.name()),
            Problem::ShapeMismatch(r) => format!(
                "its {} has shape {} but the parameter has {}",
                r.name(),
                meta_shape(*r),
                meta_shape(Role::Param)
            ),
            Problem::SharedWith(a, b) => {
                format!("its {} shares memory with its {}", a.name(), b.name())
            }
            Problem::Unreadable(r, e) => format!("its {} could not be read: {e}", r.name()),
            Problem::SelfOverlap(r) => format!(
                "its {} has elements that share memory (an expanded view?); it is written in \
                 place",
                r.name()
            ),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Problem::Deferred(..) => "unsupported",
            _ => "fatal",
        }
    }
}

/// One parameter's checked buffers.
struct Item {
    group: usize,
    /// Its position in the group's lists.
    index: usize,
    /// By `Role` order; the last two only when the group's config asks for them. Inline: a
    /// heap block per parameter made every step allocate (and fault in) memory afresh.
    bufs: [Option<Meta>; 6],
    step: u64,
    seed: u64,
    /// The order the kernel visits elements in: the dimensions, outermost first. It is the
    /// parameter's memory order when it is dense, else row-major; empty when nothing is copied.
    order: Vec<usize>,
    /// By `Role` order: the buffer lies in memory in `order`, so the kernel runs on it in
    /// place; the others are gathered into copies in that order (and written back).
    direct: [bool; 6],
    /// It shares memory with another parameter of the step: stepped alone, in order.
    sequential: bool,
}

impl Item {
    fn buf(&self, r: Role) -> Option<&Meta> {
        self.bufs[r as usize].as_ref()
    }
}

/// Everything one step will do, checked. Built by `plan()`, run once by `execute()`.
#[pyclass(module = "rustadam._core")]
pub(crate) struct Plan {
    configs: Vec<AdamConfig>,
    items: Vec<Item>,
    /// Parameters the core leaves to the torch path: (group, index, reason).
    #[pyo3(get)]
    deferred: Vec<(usize, usize, String)>,
    /// Every byte range the items touch, for the registry of running steps (taken by `run`).
    spans: Vec<Span>,
    /// Where the gradients' spans are in `spans` (read, unless `run` unscales them).
    grad_spans: std::ops::Range<usize>,
    done: bool,
}

/// A group's lists, as the Python side passes them (a tuple in this order).
pub(crate) struct GroupInput<'py> {
    pub(crate) config: Bound<'py, Config>,
    pub(crate) params: Vec<Bound<'py, PyAny>>,
    pub(crate) grads: Vec<Bound<'py, PyAny>>,
    pub(crate) exp_avgs: Vec<Bound<'py, PyAny>>,
    pub(crate) exp_avg_sqs: Vec<Bound<'py, PyAny>>,
    pub(crate) max_exp_avg_sqs: Option<Vec<Bound<'py, PyAny>>>,
    pub(crate) compensations: Option<Vec<Option<Bound<'py, PyAny>>>>,
    pub(crate) steps: Vec<u64>,
    pub(crate) seeds: Vec<u64>,
}

impl<'py> GroupInput<'py> {
    /// Parameter `i`'s buffers, by `Role` order.
    fn objects(&self, i: usize) -> [Option<&Bound<'py, PyAny>>; 6] {
        [
            Some(&self.params[i]),
            Some(&self.grads[i]),
            Some(&self.exp_avgs[i]),
            Some(&self.exp_avg_sqs[i]),
            self.max_exp_avg_sqs.as_ref().map(|v| &v[i]),
            self.compensations.as_ref().and_then(|v| v[i].as_ref()),
        ]
    }
}

/// An error naming the group, parameter and reason, as a Python `rustadam._core.StepError`.
fn refused(group: usize, index: usize, kind: &str, reason: String) -> PyErr {
    crate::StepError::new_err((group, index, kind.to_string(), reason))
}

/// Reads and checks one parameter's buffers into a new last element of `items` (built in
/// place: an item is large); on a problem nothing is added.
fn read_item(
    th: &Torch,
    items: &mut Vec<Item>,
    (group, index): (usize, usize),
    objs: &[Option<&Bound<'_, PyAny>>; 6],
    step: u64,
    seed: u64,
) -> PyResult<Result<(), Problem>> {
    items.push(Item {
        group,
        index,
        bufs: Default::default(),
        step,
        seed,
        order: Vec::new(),
        direct: [false; 6],
        sequential: false,
    });
    let item = items.last_mut().expect("just pushed");
    let mut problem = None;
    for ((r, obj), slot) in Role::ALL.iter().zip(objs).zip(item.bufs.iter_mut()) {
        let Some(obj) = obj else { continue };
        let what = || format!("param_groups[{group}] {}s[{index}]", r.name());
        match tensor::read(obj, th, what) {
            Ok(Ok(m)) => *slot = Some(m),
            Ok(Err(why @ (Refusal::OutsideStorage { .. } | Refusal::NoData))) => {
                problem = Some(Ok(Problem::Storage(*r, why)));
                break;
            }
            Ok(Err(why)) => {
                problem = Some(Ok(Problem::Deferred(*r, why)));
                break;
            }
            // Torch's own error: named as this buffer's. (A TypeError names it already;
            // anything else, KeyboardInterrupt say, is not about the buffer.)
            Err(e) if e.is_instance_of::<PyRuntimeError>(obj.py()) => {
                let why = e.value(obj.py()).to_string();
                problem = Some(Ok(Problem::Unreadable(*r, why)));
                break;
            }
            Err(e) => {
                problem = Some(Err(e));
                break;
            }
        }
    }
    let result = match problem {
        Some(p) => p.map(Err),
        None => Ok(check_item(item)),
    };
    if !matches!(result, Ok(Ok(()))) {
        items.pop();
    }
    result
}

/// The checks between one parameter's own buffers.
fn check_item(item: &mut Item) -> Result<(), Problem> {
    let p = item.buf(Role::Param).expect("a parameter");
    for &r in &Role::ALL[1..] {
        let Some(b) = item.buf(r) else { continue };
        if (b.dtype, b.complex) != (p.dtype, p.complex) {
            return Err(Problem::DTypeMismatch(r));
        }
        if b.shape != p.shape {
            return Err(Problem::ShapeMismatch(r));
        }
    }
    // Dense buffers (the usual case) cannot overlap themselves: one layout test each.
    let mut dense = [false; 6];
    for &r in &Role::ALL {
        let Some(b) = item.buf(r) else { continue };
        dense[r as usize] = b.is_dense();
        if r.written()
            && b.numel > 1
            && !dense[r as usize]
            && !layout::is_non_overlapping(&b.shape, &b.strides)
        {
            return Err(Problem::SelfOverlap(r));
        }
    }
    let mut roles: SmallVec<[Role; 6]> = SmallVec::new();
    let mut spans: SmallVec<[Span; 6]> = SmallVec::new();
    for &r in &Role::ALL {
        if let Some(b) = item.buf(r) {
            roles.push(r);
            spans.push(span(r, b));
        }
    }
    if let Some((a, b)) = layout::first_conflict(&spans) {
        return Err(Problem::SharedWith(roles[b], roles[a]));
    }
    // The kernel walks a dense parameter in its memory order and any other row-major: the
    // element index of stochastic rounding is then the one every path uses (the offset in a
    // dense parameter's memory, else the row-major index).
    let row_major;
    let reference: &[isize] = if dense[Role::Param as usize] {
        &p.strides
    } else {
        row_major = layout::row_major_strides(&p.shape);
        &row_major
    };
    let mut direct = [false; 6];
    for (k, (d, b)) in direct.iter_mut().zip(&item.bufs).enumerate() {
        *d = b
            .as_ref()
            .is_some_and(|b| b.numel <= 1 || (dense[k] && same_placement(b, reference)));
    }
    // Only copies need the order: the common case, every buffer in place, skips it.
    let copied = item.bufs.iter().zip(direct).any(|(b, d)| b.is_some() && !d);
    let order = if copied {
        layout::memory_order(&p.shape, reference)
    } else {
        Vec::new()
    };
    (item.order, item.direct) = (order, direct);
    Ok(())
}

/// Whether a view has the given strides where it places elements (length-1 dimensions may
/// have any stride).
fn same_placement(a: &Meta, strides: &[isize]) -> bool {
    a.shape
        .iter()
        .zip(a.strides.iter().zip(strides))
        .all(|(&n, (sa, sb))| n <= 1 || sa == sb)
}

fn span(r: Role, m: &Meta) -> Span {
    let (start, end) = m.byte_span();
    Span {
        start,
        end,
        written: r.written(),
    }
}

/// Reads and checks every buffer of every group; see `plan` in the module.
pub(crate) fn build(py: Python<'_>, groups: &[GroupInput<'_>], strict: bool) -> PyResult<Plan> {
    let th = tensor::torch(py)?;
    let _no_modes = tensor::NoModes::enter(py, th)?;
    let mut configs = Vec::with_capacity(groups.len());
    let mut items = Vec::with_capacity(groups.iter().map(|g| g.params.len()).sum());
    let mut deferred = Vec::new();
    for (gi, g) in groups.iter().enumerate() {
        let cfg = g.config.get().inner;
        let n = g.params.len();
        let lengths = [
            g.grads.len(),
            g.exp_avgs.len(),
            g.exp_avg_sqs.len(),
            g.steps.len(),
            g.seeds.len(),
            g.max_exp_avg_sqs.as_ref().map_or(n, Vec::len),
            g.compensations.as_ref().map_or(n, Vec::len),
        ];
        if lengths.iter().any(|&l| l != n) {
            return Err(PyValueError::new_err(format!(
                "group {gi}: every list must have one entry per parameter"
            )));
        }
        if cfg.amsgrad != g.max_exp_avg_sqs.is_some() {
            return Err(PyValueError::new_err(format!(
                "group {gi}: max_exp_avg_sqs must be given exactly when amsgrad is set"
            )));
        }
        let objs_at = |i: usize| g.objects(i);
        for i in 0..n {
            // SAFETY: the objects are held by `groups` for the whole call; the GIL is held.
            unsafe {
                prefetch::ahead(th, i, n, Then::Storage, |j| {
                    objs_at(j).map(|o| o.map_or(std::ptr::null_mut(), |o| o.as_ptr()))
                });
            }
            if g.steps[i] == 0 || g.steps[i] > i64::MAX as u64 {
                return Err(refused(
                    gi,
                    i,
                    "fatal",
                    format!(
                        "its step count after this update would be {}; it counts updates \
                         from 1 and must fit in 63 bits",
                        g.steps[i]
                    ),
                ));
            }
            let objs = objs_at(i);
            match read_item(th, &mut items, (gi, i), &objs, g.steps[i], g.seeds[i])? {
                Ok(()) => {
                    let item = items.last().expect("read_item added it");
                    let half = matches!(
                        item.buf(Role::Param).map(|p| p.dtype),
                        Some(DType::BF16 | DType::F16)
                    );
                    if cfg.rounding == Rounding::Kahan
                        && half
                        && item.buf(Role::Compensation).is_none()
                    {
                        return Err(refused(
                            gi,
                            i,
                            "fatal",
                            "rounding='kahan' needs a compensation buffer for a 16-bit parameter"
                                .into(),
                        ));
                    }
                }
                Err(problem @ Problem::Deferred(..)) if !strict => {
                    deferred.push((gi, i, problem.message(|_| String::new())));
                }
                Err(problem) => {
                    let shape_of = |r: Role| {
                        objs[r as usize]
                            .and_then(|o| o.getattr("shape").ok())
                            .map_or_else(String::new, |s| s.to_string())
                    };
                    return Err(refused(gi, i, problem.kind(), problem.message(shape_of)));
                }
            }
        }
        configs.push(cfg);
    }
    hold_storages(py, th, groups, &mut items)?;
    let (spans, grad_spans) = mark_shared(&mut items);
    // A parameter listed twice shares all its memory with itself: only such items can be one.
    let mut seen = std::collections::HashSet::new();
    for it in items.iter().filter(|it| it.sequential) {
        if !seen.insert(groups[it.group].params[it.index].as_ptr()) {
            return Err(refused(
                it.group,
                it.index,
                "fatal",
                "it is listed twice; list each parameter once".into(),
            ));
        }
    }
    Ok(Plan {
        configs,
        items,
        deferred,
        spans,
        grad_spans,
        done: false,
    })
}

/// Records a step just written, inside the call that wrote it (back in Python a
/// KeyboardInterrupt could land between the two): each state's `"step"` set to its count, then
/// the version counter of every tensor of `written` bumped (torch is looked up only for that).
pub(crate) fn commit<'py, T: IntoPyObject<'py>>(
    py: Python<'py>,
    counts: impl IntoIterator<Item = (Bound<'py, PyDict>, T)>,
    written: Option<&Bound<'py, PyList>>,
) -> PyResult<()> {
    let key = pyo3::intern!(py, "step");
    for (state, t) in counts {
        state.set_item(key, t)?;
    }
    match written {
        Some(w) if !w.is_empty() => tensor::torch(py)?.increment_version(w),
        _ => Ok(()),
    }
}

/// Holds the storage of every buffer the core will touch and checks each view against its
/// storage's memory, in one pass in which no Python code can run: nothing here releases the
/// GIL (the reads before, `is_neg()`, did), and the collector, which could run finalizers in
/// an allocation, is paused. What `step_plain` checks here is what it writes.
fn hold_storages(
    py: Python<'_>,
    th: &Torch,
    groups: &[GroupInput<'_>],
    items: &mut [Item],
) -> PyResult<()> {
    let _paused = tensor::NoCollection::enter(py, th)?;
    let n = items.len();
    for k in 0..n {
        let objs = |j: usize| groups[items[j].group].objects(items[j].index);
        // SAFETY: the objects are held by `groups` for the whole call; the GIL is held.
        unsafe {
            prefetch::ahead(th, k, n, Then::Storage, |j| {
                objs(j).map(|o| o.map_or(std::ptr::null_mut(), |o| o.as_ptr()))
            });
        }
        let buffers = objs(k);
        let it = &mut items[k];
        for ((r, obj), slot) in Role::ALL.iter().zip(buffers).zip(it.bufs.iter_mut()) {
            let (Some(obj), Some(m)) = (obj, slot.as_mut()) else {
                continue;
            };
            let problem = match tensor::hold(obj, th, m) {
                Ok(Ok(())) => continue,
                Ok(Err(why)) => Problem::Storage(*r, why),
                // Torch's own error (a storage it calls invalid): named as this buffer's.
                Err(e) if e.is_instance_of::<PyRuntimeError>(py) => {
                    Problem::Unreadable(*r, e.value(py).to_string())
                }
                Err(e) => return Err(e),
            };
            return Err(refused(
                it.group,
                it.index,
                problem.kind(),
                problem.message(|_| String::new()),
            ));
        }
    }
    Ok(())
}

/// Parameters whose buffers share memory with another parameter's (where one writes) are
/// stepped alone, in order, as a loop over the parameters would. Returns every span, and where
/// the gradients' are among them.
fn mark_shared(items: &mut [Item]) -> (Vec<Span>, std::ops::Range<usize>) {
    let mut spans = Vec::with_capacity(items.len() * 4);
    let mut owner = Vec::with_capacity(items.len() * 4);
    let mut grad_spans = 0..0;
    // Role by role: the parameters (or gradients, or moments) were usually allocated one
    // after another, so each role's spans come in address order, which the sort exploits.
    for &r in &Role::ALL {
        if r == Role::Grad {
            grad_spans.start = spans.len();
        }
        for (k, item) in items.iter().enumerate() {
            if let Some(b) = item.buf(r) {
                spans.push(span(r, b));
                owner.push(k);
            }
        }
        if r == Role::Grad {
            grad_spans.end = spans.len();
        }
    }
    for (a, b) in layout::conflicts(&spans) {
        if owner[a] != owner[b] {
            items[owner[a]].sequential = true;
            items[owner[b]].sequential = true;
        }
    }
    (spans, grad_spans)
}

/// Divides a gradient by `scale` in place, each element rounded as torch's `grad.div_(scale)`
/// rounds it: in the type's arithmetic (float32 for 16-bit types), a complex element times the
/// reciprocal of the scale, as torch divides a complex number by a real one.
///
/// # Safety
/// `m` comes from a [`Plan`] with elements of type `E`, no two of its elements share memory,
/// and no other thread reads or writes it during the call.
unsafe fn divide<E: Element>(m: &Meta, scale: f64) {
    let s = <E::Compute as rustadam::Real>::from_f64(scale);
    let one = <E::Compute as rustadam::Real>::from_f64(1.0);
    let recip = one / s;
    let complex = m.complex;
    let at = |e: *mut E| {
        // SAFETY: `e` is an element of the view (the function's contract).
        unsafe {
            let x = e.read().load();
            e.write(E::store(if complex { x * recip } else { x / s }));
        }
    };
    let base = m.ptr as *mut E;
    if m.is_dense() {
        if let Some((lo, hi)) = m.range {
            // SAFETY: a dense view's elements are the slots `lo..=hi` from `ptr`.
            (lo..=hi).for_each(|i| at(unsafe { base.offset(i) }));
        }
        return;
    }
    let order = layout::memory_order(&m.shape, &m.strides);
    layout::slabs(
        &m.shape,
        &m.strides,
        &order,
        |off, (rows, rs), (cols, cs)| {
            for r in 0..rows as isize {
                for c in 0..cols as isize {
                    // SAFETY: the slab lies inside the view.
                    at(unsafe { base.offset(off + r * rs + c * cs) });
                }
            }
        },
    );
}

/// Copies a `rows × cols` block between two strided layouts (strides as (row, column)); in
/// square tiles where a side is not contiguous along its rows, so that a transposed side is
/// read or written a few cache lines at a time.
///
/// # Safety
/// Every element of both blocks is valid to read (`src`) or write (`dst`), and they do not
/// overlap.
unsafe fn copy_2d<E: Copy>(
    src: *const E,
    (sr, sc): (isize, isize),
    dst: *mut E,
    (dr, dc): (isize, isize),
    (rows, cols): (usize, usize),
) {
    if sc == 1 && dc == 1 {
        for r in 0..rows as isize {
            // SAFETY: the function's contract; a row is `cols` consecutive elements.
            unsafe { std::ptr::copy_nonoverlapping(src.offset(r * sr), dst.offset(r * dr), cols) };
        }
        return;
    }
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0 as isize..(r0 + TILE).min(rows) as isize {
                for c in c0 as isize..(c0 + TILE).min(cols) as isize {
                    // SAFETY: the function's contract.
                    unsafe {
                        dst.offset(r * dr + c * dc)
                            .write(src.offset(r * sr + c * sc).read())
                    };
                }
            }
        }
    }
}

/// Each slab of the view in `order` (see [`layout::slabs`]) with the place of its `rows · cols`
/// elements in a dense copy laid out in that order: `f(view offset, (row, column) strides,
/// copy offset, (rows, cols))`.
fn slabs_and_copy(
    m: &Meta,
    order: &[usize],
    mut f: impl FnMut(isize, (isize, isize), usize, (usize, usize)),
) {
    let mut k = 0;
    layout::slabs(
        &m.shape,
        &m.strides,
        order,
        |off, (rows, rs), (cols, cs)| {
            f(off, (rs, cs), k, (rows, cols));
            k += rows * cols;
        },
    );
}

/// A buffer's elements copied out in `order`.
///
/// # Safety
/// `m` comes from a [`Plan`]: every offset of its view lies in a storage the plan holds, with
/// elements of type `E`, and no other thread writes them during the call.
unsafe fn gather<E: Copy>(m: &Meta, order: &[usize]) -> Vec<E> {
    let mut out: Vec<E> = Vec::with_capacity(m.numel);
    let (src, dst) = (m.ptr as *const E, out.as_mut_ptr());
    slabs_and_copy(m, order, |off, strides, k, (rows, cols)| {
        // SAFETY: the slab is inside the checked view (the function's contract); the output
        // has room for all `numel` elements and the slabs fill it once, in order.
        unsafe {
            let dense = (cols as isize, 1);
            copy_2d(src.offset(off), strides, dst.add(k), dense, (rows, cols));
        }
    });
    // SAFETY: the slabs wrote every one of the `numel` elements.
    unsafe { out.set_len(m.numel) };
    out
}

/// Writes `data` back into a buffer in `order`.
///
/// # Safety
/// As for [`gather`], and no two elements of the view share memory (checked for written
/// buffers by `check_item`); `data` has one value per element.
unsafe fn scatter<E: Copy>(m: &Meta, order: &[usize], data: &[E]) {
    assert_eq!(data.len(), m.numel, "one value per element");
    let (src, dst) = (data.as_ptr(), m.ptr as *mut E);
    slabs_and_copy(m, order, |off, strides, k, (rows, cols)| {
        // SAFETY: as the function's contract states; `data` is our own copy, apart from the
        // view, with `rows · cols` values from `k`.
        unsafe {
            let dense = (cols as isize, 1);
            copy_2d(src.add(k), dense, dst.offset(off), strides, (rows, cols));
        }
    });
}

/// A dense buffer as a mutable slice.
///
/// # Safety
/// `m` comes from a [`Plan`], is dense (so its elements are the `numel` slots from `ptr`),
/// and no other slice or thread touches that memory while the returned slice lives.
unsafe fn slice_mut<'a, E>(m: &Meta) -> &'a mut [E] {
    if m.numel == 0 {
        return &mut [];
    }
    // SAFETY: as the function's contract states.
    unsafe { std::slice::from_raw_parts_mut(m.ptr as *mut E, m.numel) }
}

/// A dense buffer as a shared slice.
///
/// # Safety
/// As for [`slice_mut`], except that other shared slices may overlap it.
unsafe fn slice<'a, E>(m: &Meta) -> &'a [E] {
    if m.numel == 0 {
        return &[];
    }
    // SAFETY: as the function's contract states.
    unsafe { std::slice::from_raw_parts(m.ptr as *const E, m.numel) }
}

/// The buffers of one parameter for the kernel: slices of its own memory where a buffer lies in
/// the item's order, copies gathered in that order (and scattered back) where it does not.
struct Work<'a, E> {
    item: &'a Item,
    /// By `Role` order; `None` for a buffer used in place (or absent).
    copies: [Option<Vec<E>>; 6],
}

impl<'a, E: Element> Work<'a, E> {
    /// # Safety
    /// `item` comes from a [`Plan`] whose buffers have element type `E`, and no other
    /// `Work` of this call covers memory of `item` unless both only read it.
    unsafe fn new(item: &'a Item) -> Self {
        let copies = std::array::from_fn(|k| match &item.bufs[k] {
            // SAFETY: the contract of `new`.
            Some(m) if !item.direct[k] => Some(unsafe { gather(m, &item.order) }),
            _ => None,
        });
        Self { item, copies }
    }

    /// The kernel's view of the buffers.
    ///
    /// # Safety
    /// As for [`Work::new`]; the refs must be dropped before `finish`.
    unsafe fn refs(&mut self) -> TensorRefs<'_, E> {
        let item = self.item;
        // Gradients may share memory with each other (they are only read), so a gradient is
        // never made a mutable slice.
        let mut slots: [Option<&mut [E]>; 6] = Default::default();
        let mut grad: &[E] = &[];
        for (((b, c), r), slot) in item
            .bufs
            .iter()
            .zip(self.copies.iter_mut())
            .zip(Role::ALL)
            .zip(slots.iter_mut())
        {
            match (b, c) {
                (None, _) => {}
                (Some(_), Some(c)) => {
                    if r.written() {
                        *slot = Some(c.as_mut_slice());
                    } else {
                        grad = c.as_slice();
                    }
                }
                // SAFETY: a direct buffer is dense in the item's order (contract of `new`).
                (Some(m), None) if r.written() => *slot = Some(unsafe { slice_mut(m) }),
                (Some(m), None) => {
                    // SAFETY: as above; a shared slice.
                    grad = unsafe { slice(m) };
                }
            }
        }
        let mut take = |r: Role| slots[r as usize].take();
        let param = take(Role::Param).expect("param");
        let exp_avg = take(Role::ExpAvg).expect("exp_avg");
        let exp_avg_sq = take(Role::ExpAvgSq).expect("exp_avg_sq");
        let mut refs =
            TensorRefs::new(param, grad, exp_avg, exp_avg_sq, item.step).with_seed(item.seed);
        if let Some(b) = take(Role::MaxExpAvgSq) {
            refs = refs.with_max_exp_avg_sq(b);
        }
        if let Some(b) = take(Role::Compensation) {
            refs = refs.with_compensation(b);
        }
        refs
    }

    /// Scatters gathered copies back into the written buffers.
    ///
    /// # Safety
    /// As for [`Work::new`].
    unsafe fn finish(self) {
        let item = self.item;
        for (r, (b, c)) in Role::ALL.iter().zip(item.bufs.iter().zip(&self.copies)) {
            if let (true, Some(m), Some(c)) = (r.written(), b, c) {
                // SAFETY: the contract of `new`; written buffers were checked non-overlapping.
                unsafe { scatter(m, &item.order, c) };
            }
        }
    }
}

/// The `Work`s of the items whose element type is `E`.
///
/// # Safety
/// As for [`Work::new`].
unsafe fn works<'a, E: Element>(items: &[&'a Item]) -> Vec<Work<'a, E>> {
    items
        .iter()
        .filter(|it| it.buf(Role::Param).map(|p| p.dtype) == Some(dtype_of::<E>()))
        // SAFETY: the filter gives buffers of type `E`; the rest is the function's contract.
        .map(|it| unsafe { Work::new(it) })
        .collect()
}

/// Appends the kernel's view of each `Work` to `tensors`.
///
/// # Safety
/// As for [`Work::refs`].
unsafe fn push_refs<'a, E: Element>(tensors: &mut Vec<AnyTensor<'a>>, works: &'a mut [Work<'_, E>])
where
    AnyTensor<'a>: From<TensorRefs<'a, E>>,
{
    for w in works {
        // SAFETY: the function's contract.
        tensors.push(AnyTensor::from(unsafe { w.refs() }));
    }
}

/// Scatters every `Work`'s copies back.
///
/// # Safety
/// As for [`Work::finish`].
unsafe fn finish_all<E: Element>(works: Vec<Work<'_, E>>) {
    for w in works {
        // SAFETY: the function's contract.
        unsafe { w.finish() };
    }
}

/// Runs the kernel over `items` (all of one group), one call for all of them.
///
/// # Safety
/// The items come from a [`Plan`] and touch no memory another item of the call writes.
unsafe fn run_group(
    cfg: &AdamConfig,
    items: &[&Item],
    opts: &ExecOptions,
    roofline: bool,
) -> Result<(), String> {
    // SAFETY: the function's contract; the refs are dropped at the end of the
    // inner block, before the copies are scattered back.
    unsafe {
        let (mut w32, mut w64) = (works::<f32>(items), works::<f64>(items));
        let (mut wbf, mut wf16) = (works::<bf16>(items), works::<f16>(items));
        {
            let mut tensors: Vec<AnyTensor<'_>> = Vec::with_capacity(items.len());
            push_refs(&mut tensors, &mut w32);
            push_refs(&mut tensors, &mut w64);
            push_refs(&mut tensors, &mut wbf);
            push_refs(&mut tensors, &mut wf16);
            if roofline {
                rustadam::roofline(&mut tensors, opts)
            } else {
                rustadam::step_tensors(cfg, &mut tensors, opts)
            }
            .map_err(|e| e.to_string())?;
        }
        finish_all(w32);
        finish_all(w64);
        finish_all(wbf);
        finish_all(wf16);
    }
    Ok(())
}

fn dtype_of<E: 'static>() -> DType {
    use std::any::TypeId;
    let t = TypeId::of::<E>();
    if t == TypeId::of::<f32>() {
        DType::F32
    } else if t == TypeId::of::<f64>() {
        DType::F64
    } else if t == TypeId::of::<bf16>() {
        DType::BF16
    } else {
        DType::F16
    }
}

impl Plan {
    /// Runs the plan: first every parameter that shares no memory with another (one kernel
    /// call per group), then the others one at a time in order.
    pub(crate) fn run(
        &mut self,
        py: Python<'_>,
        opts: ExecOptions,
        roofline: bool,
        unscale: Option<f64>,
    ) -> PyResult<()> {
        if self.done {
            return Err(PyRuntimeError::new_err("this plan has already run"));
        }
        self.done = true;
        let mut spans = std::mem::take(&mut self.spans);
        if unscale.is_some() {
            self.check_unscale()?;
            spans[self.grad_spans.clone()]
                .iter_mut()
                .for_each(|s| s.written = true);
        }
        let _borrow = registry::borrow(spans)?;
        let (configs, items) = (&self.configs, &self.items);
        // Several kernel calls make one step: what a later one needs is got before the first
        // writes (each call alone is all or nothing).
        let mut batched = vec![false; configs.len()];
        let mut calls = 0;
        for it in items {
            if it.sequential || !std::mem::replace(&mut batched[it.group], true) {
                calls += 1;
            }
        }
        if calls > 1 {
            opts.prepare()
                .map_err(|e| PyRuntimeError::new_err(format!("{e}; nothing was written")))?;
        }
        py.detach(|| -> Result<(), String> {
            if let Some(scale) = unscale {
                for g in items.iter().filter_map(|it| it.buf(Role::Grad)) {
                    // SAFETY: a checked gradient (`check_unscale`: no element shares memory
                    // with another), claimed as written in the registry, divided before any
                    // kernel reads it.
                    unsafe {
                        match g.dtype {
                            DType::F32 => divide::<f32>(g, scale),
                            DType::F64 => divide::<f64>(g, scale),
                            DType::BF16 => divide::<bf16>(g, scale),
                            DType::F16 => divide::<f16>(g, scale),
                        }
                    }
                }
            }
            for (gi, cfg) in configs.iter().enumerate() {
                let batch: Vec<&Item> = items
                    .iter()
                    .filter(|it| it.group == gi && !it.sequential)
                    .collect();
                // SAFETY: the items come from this plan and share no memory with each other.
                unsafe { run_group(cfg, &batch, &opts, roofline)? };
            }
            for it in items.iter().filter(|it| it.sequential) {
                // SAFETY: one item alone; its own buffers were checked not to share memory.
                unsafe { run_group(&configs[it.group], &[it], &opts, roofline)? };
            }
            Ok(())
        })
        .map_err(PyRuntimeError::new_err)
    }
}

#[pymethods]
impl Plan {
    /// How many parameters the core steps.
    fn __len__(&self) -> usize {
        self.items.len()
    }

    /// Runs the checked step (once). `num_threads` threads; `pool` and `simd` default to the
    /// environment (see `threads::options`). With `grad_scale`, every gradient is first divided
    /// by it in place (GradScaler's protocol for fused optimizers), in the same call as the
    /// step, so that a step refused here leaves them as they were. The version counter of
    /// every tensor of `written` is bumped, and each `states[i]["step"]` set to `steps[i]`,
    /// inside this call too (back in Python a KeyboardInterrupt could land between the writes
    /// and the bookkeeping).
    #[pyo3(signature = (
        *, num_threads, pool=None, simd=None, states=None, steps=None, written=None,
        grad_scale=None
    ))]
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        py: Python<'_>,
        num_threads: Bound<'_, PyAny>,
        pool: Option<&str>,
        simd: Option<&str>,
        states: Option<Vec<Bound<'_, PyDict>>>,
        steps: Option<Vec<Bound<'_, PyAny>>>,
        written: Option<Bound<'_, PyList>>,
        grad_scale: Option<f64>,
    ) -> PyResult<()> {
        let (states, steps) = (states.unwrap_or_default(), steps.unwrap_or_default());
        if states.len() != steps.len() {
            return Err(PyValueError::new_err(
                "states and steps must have one entry each",
            ));
        }
        let opts = threads::options(threads::count(&num_threads)?, pool, simd)?;
        if let Some(w) = &written {
            tensor::torch(py)?.check_tensors(w)?;
        }
        // No collection (finalizers: any Python code) between the re-check and the writes.
        let _paused = tensor::NoCollection::enter(py, tensor::torch(py)?)?;
        self.check_in_place(py)?;
        self.run(py, opts, false, grad_scale)?;
        commit(py, states.into_iter().zip(steps), written.as_ref())
    }

    /// The machine's limit for `execute` on the same buffers: the same loads, stores, chunks
    /// and threads with trivial arithmetic. For benchmarks: it overwrites the buffers.
    #[pyo3(signature = (*, num_threads))]
    fn roofline(&mut self, py: Python<'_>, num_threads: Bound<'_, PyAny>) -> PyResult<()> {
        let opts = threads::options(threads::count(&num_threads)?, None, None)?;
        let _paused = tensor::NoCollection::enter(py, tensor::torch(py)?)?;
        self.check_in_place(py)?;
        self.run(py, opts, true, None)
    }
}

impl Plan {
    /// What dividing the gradients in place needs, checked before anything is written: no
    /// gradient with elements that share memory (an expanded view), which `div_` refuses too.
    fn check_unscale(&self) -> PyResult<()> {
        for it in &self.items {
            let Some(g) = it.buf(Role::Grad) else {
                continue;
            };
            if g.numel > 1 && !g.is_dense() && !layout::is_non_overlapping(&g.shape, &g.strides) {
                return Err(refused(
                    it.group,
                    it.index,
                    "fatal",
                    "its grad has elements that share memory (an expanded view?): GradScaler's \
                     scale cannot divide it in place; nothing was written"
                        .into(),
                ));
            }
        }
        Ok(())
    }

    /// Python code may have run since the plan was built (it is a Python object): every held
    /// storage must still have the memory its buffer was checked in, or nothing is written.
    fn check_in_place(&self, py: Python<'_>) -> PyResult<()> {
        let th = tensor::torch(py)?;
        for it in &self.items {
            for (r, b) in Role::ALL.iter().zip(&it.bufs) {
                let Some(m) = b else { continue };
                if !tensor::still_in_place(py, m, th)? {
                    return Err(refused(
                        it.group,
                        it.index,
                        "fatal",
                        format!(
                            "the memory of its {} moved after the step was checked (its \
                             storage was resized or moved, by share_memory_() say); nothing \
                             was written",
                            r.name()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Reads and checks one step: `groups` is a list of tuples `(config, params, grads, exp_avgs,
/// exp_avg_sqs, max_exp_avg_sqs or None, compensations or None, steps, seeds)`; `steps[i]` is
/// t after this update. Every list element must be exactly a `torch.Tensor` or
/// `torch.nn.Parameter` (TypeError otherwise). Raises `StepError(group, index, kind, reason)`
/// for a parameter no backend may step (or, with `strict`, that the core does not take); the
/// plan's `deferred` lists those the torch path may take. Nothing is written.
#[pyfunction]
#[pyo3(signature = (groups, *, strict=false))]
pub(crate) fn plan(py: Python<'_>, groups: Bound<'_, PyList>, strict: bool) -> PyResult<Plan> {
    type Tuple<'py> = (
        Bound<'py, Config>,
        Vec<Bound<'py, PyAny>>,
        Vec<Bound<'py, PyAny>>,
        Vec<Bound<'py, PyAny>>,
        Vec<Bound<'py, PyAny>>,
        Option<Vec<Bound<'py, PyAny>>>,
        Option<Vec<Option<Bound<'py, PyAny>>>>,
        Vec<u64>,
        Vec<u64>,
    );
    let mut inputs = Vec::with_capacity(groups.len());
    for g in groups.iter() {
        let t: Tuple<'_> = g
            .extract()
            .map_err(|e| PyTypeError::new_err(format!("plan: {e}")))?;
        inputs.push(GroupInput {
            config: t.0,
            params: t.1,
            grads: t.2,
            exp_avgs: t.3,
            exp_avg_sqs: t.4,
            max_exp_avg_sqs: t.5,
            compensations: t.6,
            steps: t.7,
            seeds: t.8,
        });
    }
    build(py, &inputs, strict)
}
