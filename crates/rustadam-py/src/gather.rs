//! The optimizer's usual step in one call: the lists of every group are gathered from the
//! parameters and the optimizer's state here, where the Python loop doing the same cost more
//! than the kernel on models of many small tensors.
//!
//! Only the plain case is taken: exact tensors, every parameter with a gradient already has
//! its state, with an int step count. Anything else (or anything the plan refuses) makes the
//! call return `None` having changed nothing, and the caller takes its general path, which
//! makes the same checks and names what it refuses. Nothing is remembered across calls.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyInt, PyList, PyString, PyType};
use rustadam::kernel::mix;
use rustadam::Rounding;

use crate::config::Config;
use crate::plan::{self, GroupInput};
use crate::prefetch::{self, Then};
use crate::tensor::{self, Torch};
use crate::threads;

/// `collections.defaultdict`, the type of `Optimizer.state`; looked up once.
fn defaultdict(py: Python<'_>) -> PyResult<&'static Py<PyType>> {
    static TYPE: OnceLock<Py<PyType>> = OnceLock::new();
    if let Some(t) = TYPE.get() {
        return Ok(t);
    }
    let t = py
        .import("collections")?
        .getattr("defaultdict")?
        .cast_into::<PyType>()?
        .unbind();
    Ok(TYPE.get_or_init(|| t))
}

/// `param_seed(seed, group, index)`: a parameter's stochastic-rounding seed, from the
/// optimizer's seed and the parameter's position (every path of `rustadam.Adam` uses this one).
#[pyfunction]
pub(crate) fn param_seed(seed: u64, group: usize, index: usize) -> u64 {
    // Python's mix_int takes the low 32 bits first, as these casts do.
    seed ^ (u64::from(mix(group as u32)) << 32) ^ u64::from(mix(index as u32))
}

/// The state dict of `p` when it is plain: an exact dict with an exact-int step below
/// 2**63 − 1 and the moments; `None` otherwise.
struct Entry<'py> {
    state: Bound<'py, PyDict>,
    step: u64,
    exp_avg: Bound<'py, PyAny>,
    exp_avg_sq: Bound<'py, PyAny>,
}

/// Hashes an object's address (its identity) for `States`.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only addresses are hashed here; anything else still hashes consistently.
        bytes
            .iter()
            .for_each(|&b| self.write_usize(self.0 as usize ^ usize::from(b)));
    }
    fn write_usize(&mut self, n: usize) {
        // Addresses share their low bits (alignment): spread every bit over the whole word.
        let h = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// The state entries by their keys' addresses.
type ById<'py> = HashMap<usize, Bound<'py, PyAny>, BuildHasherDefault<AddressHasher>>;

/// The optimizer's state, looked up by parameter. A dict lookup of a tensor calls
/// `Tensor.__hash__`, Python code, for every parameter; where it finds the same entries, the
/// keys' identities are read in one pass over the dict at the first lookup instead: every key
/// is exactly a tensor and torch hashes tensors by identity, so distinct keys never hash alike
/// and the dict never compares keys with `==`.
struct States<'py> {
    dict: Bound<'py, PyDict>,
    /// Built at the first lookup (a model on another device leaves before any); None inside
    /// where the dict's own lookup is used.
    by_id: Option<Option<ById<'py>>>,
}

impl<'py> States<'py> {
    fn new(dict: Bound<'py, PyDict>) -> Self {
        Self { dict, by_id: None }
    }

    /// `dict[p]`, or None where `p` has no entry.
    fn get(&mut self, th: &Torch, p: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        if self.by_id.is_none() {
            self.by_id = Some(self.index(th)?);
        }
        match self.by_id.as_ref().and_then(Option::as_ref) {
            Some(map) => Ok(map.get(&(p.as_ptr() as usize)).cloned()),
            None => self.dict.get_item(p),
        }
    }

    fn index(&self, th: &Torch) -> PyResult<Option<ById<'py>>> {
        if !th.hashes_by_identity(self.dict.py())? {
            return Ok(None);
        }
        let mut map = HashMap::with_capacity_and_hasher(self.dict.len(), Default::default());
        for (key, value) in self.dict.iter() {
            if !tensor::is_exact_tensor(&key, th) {
                return Ok(None);
            }
            map.insert(key.as_ptr() as usize, value);
        }
        Ok(Some(map))
    }
}

fn entry<'py>(
    th: &Torch,
    states: &mut States<'py>,
    p: &Bound<'py, PyAny>,
) -> PyResult<Option<Entry<'py>>> {
    let py = p.py();
    let Some(state) = states.get(th, p)? else {
        return Ok(None);
    };
    let Ok(state) = state.cast_into_exact::<PyDict>() else {
        return Ok(None);
    };
    // Setting "step" after the writes compares it with keys of the same hash: only str keys
    // are sure to run no Python code there (and to raise nothing).
    // (Walked in place: `keys()` would build a list per parameter per step.)
    if state
        .iter()
        .any(|(k, _)| !k.is_exact_instance_of::<PyString>())
    {
        return Ok(None);
    }
    let Some(step) = state.get_item(intern!(py, "step"))? else {
        return Ok(None);
    };
    // An exact int (not a bool, not a tensor): the general path converts or refuses others.
    let step = match step.cast_exact::<PyInt>() {
        Ok(i) => match i.extract::<u64>() {
            Ok(t) if t < i64::MAX as u64 => t,
            _ => return Ok(None),
        },
        Err(_) => return Ok(None),
    };
    let (Some(exp_avg), Some(exp_avg_sq)) = (
        state.get_item(intern!(py, "exp_avg"))?,
        state.get_item(intern!(py, "exp_avg_sq"))?,
    ) else {
        return Ok(None);
    };
    Ok(Some(Entry {
        state,
        step,
        exp_avg,
        exp_avg_sq,
    }))
}

/// One group's lists, or `None` where a parameter is not plain.
fn group_input<'py>(
    th: &Torch,
    states: &mut States<'py>,
    gi: usize,
    config: Bound<'py, Config>,
    params: &Bound<'py, PyAny>,
    seed: u64,
    dicts: &mut Vec<(Bound<'py, PyDict>, u64)>,
) -> PyResult<Option<GroupInput<'py>>> {
    let py = params.py();
    let Ok(params) = params.cast_exact::<PyList>() else {
        return Ok(None);
    };
    let cfg = config.get().inner;
    let stochastic = cfg.rounding == Rounding::Stochastic;
    let kahan = cfg.rounding == Rounding::Kahan;
    let mut g = GroupInput {
        config,
        params: Vec::with_capacity(params.len()),
        grads: Vec::with_capacity(params.len()),
        exp_avgs: Vec::with_capacity(params.len()),
        exp_avg_sqs: Vec::with_capacity(params.len()),
        max_exp_avg_sqs: cfg.amsgrad.then(Vec::new),
        compensations: kahan.then(Vec::new),
        steps: Vec::with_capacity(params.len()),
        seeds: Vec::with_capacity(params.len()),
    };
    let n = params.len();
    for (i, p) in params.iter().enumerate() {
        // SAFETY: the list holds its items while this runs, the GIL is held, and an index past
        // its end (Python code run by a lookup below may shrink it) gives null, not an item.
        unsafe {
            prefetch::ahead(th, i, n, Then::AutogradMeta, |j| {
                let item = ffi::PyList_GetItem(params.as_ptr(), j as ffi::Py_ssize_t);
                if item.is_null() {
                    ffi::PyErr_Clear();
                }
                [item]
            });
        }
        if !tensor::is_exact_tensor(&p, th) {
            return Ok(None);
        }
        // A model on another device goes to the general path at once, before any state is
        // looked up: its first parameter tells. (The plan refuses any other parameter not on
        // the CPU, after the gathering; asking each one here cost more than that rare case.)
        if i == 0 && !p.getattr(intern!(py, "is_cpu"))?.is_truthy()? {
            return Ok(None);
        }
        let grad = p.getattr(intern!(py, "grad"))?;
        if grad.is_none() {
            continue;
        }
        if !tensor::is_exact_tensor(&grad, th) {
            return Ok(None);
        }
        let Some(e) = entry(th, states, &p)? else {
            return Ok(None);
        };
        if let Some(maxs) = g.max_exp_avg_sqs.as_mut() {
            match e.state.get_item(intern!(py, "max_exp_avg_sq"))? {
                Some(m) => maxs.push(m),
                None => return Ok(None),
            }
        }
        if let Some(comps) = g.compensations.as_mut() {
            let c = e.state.get_item(intern!(py, "compensation"))?;
            comps.push(c.filter(|c| !c.is_none()));
        }
        g.params.push(p);
        g.grads.push(grad);
        g.exp_avgs.push(e.exp_avg);
        g.exp_avg_sqs.push(e.exp_avg_sq);
        g.steps.push(e.step + 1);
        g.seeds.push(if stochastic {
            param_seed(seed, gi, i)
        } else {
            0
        });
        dicts.push((e.state, e.step + 1));
    }
    Ok(Some(g))
}

/// `step_plain(groups, state, *, seed, num_threads)`: one step of `rustadam.Adam` when every
/// parameter is plain (see the module). `groups` is a list of `(Config, params)`, `state` the
/// optimizer's state. Returns the tensors written (for autograd's version counters) after
/// stepping and advancing every step count, or `None` having changed nothing.
#[pyfunction]
#[pyo3(signature = (groups, state, *, seed, num_threads))]
pub(crate) fn step_plain<'py>(
    py: Python<'py>,
    groups: Bound<'py, PyList>,
    state: Bound<'py, PyAny>,
    seed: u64,
    num_threads: usize,
) -> PyResult<Option<Bound<'py, PyList>>> {
    let th = tensor::torch(py)?;
    // A dict subclass of the user's could look parameters up its own way.
    if !(state.get_type().is(defaultdict(py)?.bind(py)) || state.is_exact_instance_of::<PyDict>()) {
        return Ok(None);
    }
    let mut states = States::new(state.cast_into::<PyDict>()?);
    let mut inputs = Vec::with_capacity(groups.len());
    let mut dicts = Vec::new();
    for (gi, group) in groups.iter().enumerate() {
        let (config, params): (Bound<'py, Config>, Bound<'py, PyAny>) = group.extract()?;
        match group_input(th, &mut states, gi, config, &params, seed, &mut dicts)? {
            Some(g) => inputs.push(g),
            None => return Ok(None),
        }
    }
    // One state dict for two parameters counts twice (as torch's loop does): the general path.
    let mut seen: HashSet<usize, BuildHasherDefault<AddressHasher>> =
        HashSet::with_capacity_and_hasher(dicts.len(), Default::default());
    if !dicts.iter().all(|(d, _)| seen.insert(d.as_ptr() as usize)) {
        return Ok(None);
    }
    let written = PyList::empty(py);
    for g in &inputs {
        for list in [&g.params, &g.exp_avgs, &g.exp_avg_sqs] {
            for t in list {
                written.append(t)?;
            }
        }
        for t in g.max_exp_avg_sqs.iter().flatten() {
            written.append(t)?;
        }
        for t in g.compensations.iter().flatten().flatten() {
            written.append(t)?;
        }
    }
    // Strict: a buffer the core does not take is refused, not deferred; the general path
    // then finds it again and routes or names it. Other exceptions (KeyboardInterrupt,
    // MemoryError) are not refusals: they propagate.
    // From the storages' hold to the writes no Python code may run: a collection's finalizer
    // could free a checked buffer's memory (`resize_`). `inputs` also outlives the writes, so
    // that no tensor it holds is freed (a weakref callback) in between.
    let _paused = tensor::NoCollection::enter(py, th)?;
    let mut plan = match plan::build(py, &inputs, true) {
        Ok(plan) => plan,
        Err(e)
            if e.is_instance_of::<PyRuntimeError>(py)
                || e.is_instance_of::<PyTypeError>(py)
                || e.is_instance_of::<PyValueError>(py) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    plan.run(py, threads::options(num_threads, None, None)?, false, None)?;
    drop(_paused);
    drop(inputs);
    plan::commit(py, dicts, Some(&written))?;
    Ok(Some(written))
}
