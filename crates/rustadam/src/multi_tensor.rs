//! Many tensors per call: chunking and the thread pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::kernel::{self, Coeffs, Element, Mode, SimdLevel, StepScalars, Work};
use crate::{AdamConfig, AdamError};

/// One tensor's buffers for a step: the parameter θ, its gradient g, the moments m and v,
/// and `step`, the update count t *after* this update (1 on the first update).
#[derive(Debug)]
pub struct TensorRefs<'a, E> {
    /// θ, updated in place.
    pub param: &'a mut [E],
    /// g, read only.
    pub grad: &'a [E],
    /// m, updated in place.
    pub exp_avg: &'a mut [E],
    /// v, updated in place.
    pub exp_avg_sq: &'a mut [E],
    /// t, the count of updates including this one (≥ 1).
    pub step: u64,
}

/// A tensor of any supported element type, so one call can take a mixed group.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyTensor<'a> {
    /// `f32` buffers.
    F32(TensorRefs<'a, f32>),
    /// `f64` buffers.
    F64(TensorRefs<'a, f64>),
    /// bfloat16 buffers, computed in `f32`.
    BF16(TensorRefs<'a, half::bf16>),
    /// IEEE binary16 buffers, computed in `f32`.
    F16(TensorRefs<'a, half::f16>),
}

macro_rules! any_tensor_from {
    ($t:ty, $variant:ident) => {
        impl<'a> From<TensorRefs<'a, $t>> for AnyTensor<'a> {
            fn from(t: TensorRefs<'a, $t>) -> Self {
                Self::$variant(t)
            }
        }
    };
}
any_tensor_from!(f32, F32);
any_tensor_from!(f64, F64);
any_tensor_from!(half::bf16, BF16);
any_tensor_from!(half::f16, F16);

/// Applies `$body` to the `TensorRefs` inside any variant (the element type differs per arm).
macro_rules! with_refs {
    ($any:expr, $t:ident => $body:expr) => {
        match $any {
            AnyTensor::F32($t) => $body,
            AnyTensor::F64($t) => $body,
            AnyTensor::BF16($t) => $body,
            AnyTensor::F16($t) => $body,
        }
    };
}

/// Runs a task on `n` threads at once and returns when every one has finished; the task may
/// be started on fewer threads (it then does all the work on those).
///
/// The default is the crate's own rayon pool. A host with a thread pool of its own can pass
/// one, so that two pools do not compete for the cores: the Python bindings pass torch's
/// OpenMP runtime, whose threads still spin for a while after torch's last parallel region.
pub type ForkJoin = fn(n: usize, task: &(dyn Fn() + Sync));

/// How a call runs: threads, SIMD level, chunk length, thread pool. Results never depend on
/// these.
#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    /// Worker threads; 0 or 1 runs on the calling thread.
    pub num_threads: usize,
    /// The SIMD level; `None` picks the best this CPU runs.
    pub simd: Option<SimdLevel>,
    /// Elements per chunk, the unit of work handed to a thread.
    pub chunk_len: usize,
    /// The thread pool; `None` is the crate's rayon pool.
    pub fork_join: Option<ForkJoin>,
}

impl PartialEq for ExecOptions {
    fn eq(&self, other: &Self) -> bool {
        let same_pool = match (self.fork_join, other.fork_join) {
            (None, None) => true,
            (Some(a), Some(b)) => std::ptr::fn_addr_eq(a, b),
            _ => false,
        };
        (self.num_threads, self.simd, self.chunk_len)
            == (other.num_threads, other.simd, other.chunk_len)
            && same_pool
    }
}

/// Below this many elements in a call, waking the pool costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            num_threads: available_parallelism(),
            simd: None,
            chunk_len: 1 << 16,
            fork_join: None,
        }
    }
}

/// The machine's parallelism, asked once: the query reads cgroup files (tens of µs).
fn available_parallelism() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A contiguous piece of one tensor, with that tensor's coefficients.
struct Chunk<'a, E: Element> {
    k: Coeffs<E::Compute>,
    p: &'a mut [E],
    g: &'a [E],
    m: &'a mut [E],
    v: &'a mut [E],
}

enum Job<'a> {
    F32(Chunk<'a, f32>),
    F64(Chunk<'a, f64>),
    BF16(Chunk<'a, half::bf16>),
    F16(Chunk<'a, half::f16>),
}

impl Job<'_> {
    fn len(&self) -> usize {
        match self {
            Job::F32(c) => c.p.len(),
            Job::F64(c) => c.p.len(),
            Job::BF16(c) => c.p.len(),
            Job::F16(c) => c.p.len(),
        }
    }

    fn run(&mut self, level: SimdLevel, work: Work) {
        match self {
            Job::F32(c) => kernel::run(level, work, &c.k, c.p, c.g, c.m, c.v),
            Job::F64(c) => kernel::run(level, work, &c.k, c.p, c.g, c.m, c.v),
            Job::BF16(c) => kernel::run(level, work, &c.k, c.p, c.g, c.m, c.v),
            Job::F16(c) => kernel::run(level, work, &c.k, c.p, c.g, c.m, c.v),
        }
    }
}

fn check<E>(index: usize, t: &TensorRefs<'_, E>) -> Result<(), AdamError> {
    if t.step == 0 {
        return Err(AdamError::ZeroStep { tensor: index });
    }
    let expected = t.param.len();
    for (buffer, got) in [
        ("grad", t.grad.len()),
        ("exp_avg", t.exp_avg.len()),
        ("exp_avg_sq", t.exp_avg_sq.len()),
    ] {
        if got != expected {
            return Err(AdamError::LengthMismatch {
                tensor: index,
                buffer,
                expected,
                got,
            });
        }
    }
    Ok(())
}

fn push_chunks<'a, E: Element>(
    jobs: &mut Vec<Job<'a>>,
    cfg: &AdamConfig,
    t: &'a mut TensorRefs<'_, E>,
    chunk_len: usize,
    wrap: fn(Chunk<'a, E>) -> Job<'a>,
) {
    let k = Coeffs::new(&StepScalars::new(cfg, t.step));
    let pieces = t
        .param
        .chunks_mut(chunk_len)
        .zip(t.grad.chunks(chunk_len))
        .zip(t.exp_avg.chunks_mut(chunk_len))
        .zip(t.exp_avg_sq.chunks_mut(chunk_len));
    for (((p, g), m), v) in pieces {
        jobs.push(wrap(Chunk { k, p, g, m, v }));
    }
}

/// One Adam step over many tensors in one call, split into chunks run on a thread pool.
///
/// Every tensor is checked (lengths, `step ≥ 1`) and the config validated before anything is
/// written, so an error leaves all buffers unchanged.
///
/// ```
/// use rustadam::{step_tensors, AdamConfig, AnyTensor, ExecOptions, TensorRefs};
/// let (mut p, g, mut m, mut v) = (vec![1.0f32; 3], vec![0.5f32; 3], vec![0.0f32; 3], vec![0.0f32; 3]);
/// let t = TensorRefs { param: &mut p, grad: &g, exp_avg: &mut m, exp_avg_sq: &mut v, step: 1 };
/// step_tensors(&AdamConfig::default(), &mut [AnyTensor::from(t)], &ExecOptions::default()).unwrap();
/// // The first step moves every element by about α.
/// assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
/// ```
pub fn step_tensors(
    cfg: &AdamConfig,
    tensors: &mut [AnyTensor<'_>],
    opts: &ExecOptions,
) -> Result<(), AdamError> {
    execute(cfg, tensors, opts, Work::Adam(Mode::of(cfg)))
}

/// The machine's limit for [`step_tensors`]: the same loads and stores, the same chunks and
/// threads, with trivial arithmetic (θ += g, m += g, v += g). For benchmarks only: it changes
/// the buffers meaninglessly.
pub fn roofline(tensors: &mut [AnyTensor<'_>], opts: &ExecOptions) -> Result<(), AdamError> {
    execute(&AdamConfig::default(), tensors, opts, Work::Roofline)
}

fn execute(
    cfg: &AdamConfig,
    tensors: &mut [AnyTensor<'_>],
    opts: &ExecOptions,
    work: Work,
) -> Result<(), AdamError> {
    cfg.validate()?;
    let mut total = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        with_refs!(t, t => check(i, t))?;
        total += with_refs!(t, t => t.param.len());
    }
    let chunk_len = opts.chunk_len.max(1);
    let level = opts.simd.unwrap_or_else(SimdLevel::detect);
    let mut jobs = Vec::with_capacity(tensors.len() + total / chunk_len);
    for t in tensors.iter_mut() {
        match t {
            AnyTensor::F32(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F32),
            AnyTensor::F64(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F64),
            AnyTensor::BF16(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::BF16),
            AnyTensor::F16(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F16),
        }
    }
    if opts.num_threads <= 1 || total < PARALLEL_MIN_ELEMS || jobs.len() < 2 {
        jobs.iter_mut().for_each(|j| j.run(level, work));
    } else if let Some(fork_join) = opts.fork_join {
        // One contiguous run of chunks per thread, of about equal elements: each thread streams
        // through its own stretch of memory. A thread takes the next unclaimed run until none is
        // left, so all the work is done however many threads the pool really starts.
        let parts = split_even(&mut jobs, opts.num_threads, total);
        let next = AtomicUsize::new(0);
        fork_join(opts.num_threads, &|| {
            while let Some(part) = parts.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
                part.iter_mut().for_each(|j| j.run(level, work));
            }
        });
    } else {
        pool(opts.num_threads)?.install(|| jobs.par_iter_mut().for_each(|j| j.run(level, work)));
    }
    Ok(())
}

/// Splits the chunks into `n` contiguous runs of about `total / n` elements each.
fn split_even<'j, 'a>(
    mut jobs: &'j mut [Job<'a>],
    n: usize,
    total: usize,
) -> Vec<Mutex<&'j mut [Job<'a>]>> {
    let target = total.div_ceil(n.max(1)).max(1);
    let mut parts = Vec::with_capacity(n);
    while !jobs.is_empty() {
        let (mut end, mut sum) = (0, 0);
        while end < jobs.len() && (sum < target || end == 0) {
            sum += jobs[end].len();
            end += 1;
        }
        let (head, tail) = std::mem::take(&mut jobs).split_at_mut(end);
        parts.push(Mutex::new(head));
        jobs = tail;
    }
    parts
}

/// One pool per thread count, built on first use and kept: building one costs far more than a step.
fn pool(num_threads: usize) -> Result<Arc<rayon::ThreadPool>, AdamError> {
    // Keyed by process too: a child made by fork() inherits the pool but not its threads, so
    // it needs pools of its own (the parent's are kept, never used, never joined).
    type Pools = Mutex<Vec<(u32, usize, Arc<rayon::ThreadPool>)>>;
    static POOLS: OnceLock<Pools> = OnceLock::new();
    let pid = std::process::id();
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, p)) = pools
        .iter()
        .find(|(owner, n, _)| *owner == pid && *n == num_threads)
    {
        return Ok(Arc::clone(p));
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(|i| format!("rustadam-{i}"))
            .build()
            .map_err(|e| AdamError::ThreadPool(e.to_string()))?,
    );
    pools.push((pid, num_threads, Arc::clone(&p)));
    Ok(p)
}
