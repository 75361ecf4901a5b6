//! Many tensors per call: chunking and the thread pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::prelude::*;

use crate::kernel::{
    self, Bufs, Coeffs, Element, Mode, SimdLevel, StepScalars, Work, KAHAN, NEAREST, STOCHASTIC,
};
use crate::{AdamConfig, AdamError, Rounding};

/// One tensor's buffers for a step: the parameter θ, its gradient g, the moments m and v,
/// and `step`, the update count t *after* this update (1 on the first update).
///
/// Build it with [`TensorRefs::new`] and add what the config needs: `max_exp_avg_sq` for
/// AMSGrad, `compensation` for Kahan rounding of a 16-bit tensor, a `seed` for stochastic
/// rounding.
///
/// ```
/// use rustadam::{bf16, step_tensors, AdamConfig, AnyTensor, ExecOptions, Rounding, TensorRefs};
/// let cfg = AdamConfig::default().amsgrad(true).rounding(Rounding::Kahan);
/// let mut p = vec![bf16::ONE; 4];
/// let g = vec![bf16::from_f32(0.5); 4];
/// let (mut m, mut v, mut vmax, mut c) = (vec![bf16::ZERO; 4], vec![bf16::ZERO; 4], vec![bf16::ZERO; 4], vec![bf16::ZERO; 4]);
/// let t = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1)
///     .with_max_exp_avg_sq(&mut vmax)
///     .with_compensation(&mut c);
/// step_tensors(&cfg, &mut [AnyTensor::from(t)], &ExecOptions::default()).unwrap();
/// // The update, about α = 1e-3, is below half an ulp of 1.0: kept in the compensation.
/// assert_eq!(p[0], bf16::ONE);
/// assert!(c[0].to_f32() < -9e-4);
/// ```
#[derive(Debug)]
#[non_exhaustive]
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
    /// The running maximum of v, updated in place; required with AMSGrad, zeros at first.
    pub max_exp_avg_sq: Option<&'a mut [E]>,
    /// The Kahan compensation, updated in place; required with [`Rounding::Kahan`] for
    /// bfloat16 and float16 tensors (f32 and f64 round to nearest and ignore it), zeros at first.
    ///
    /// [`Rounding::Kahan`]: crate::Rounding::Kahan
    pub compensation: Option<&'a mut [E]>,
    /// The seed of stochastic rounding; give each tensor its own.
    pub seed: u64,
}

impl<'a, E> TensorRefs<'a, E> {
    /// The buffers every step needs; no AMSGrad maximum, no compensation, seed 0.
    pub fn new(
        param: &'a mut [E],
        grad: &'a [E],
        exp_avg: &'a mut [E],
        exp_avg_sq: &'a mut [E],
        step: u64,
    ) -> Self {
        Self {
            param,
            grad,
            exp_avg,
            exp_avg_sq,
            step,
            max_exp_avg_sq: None,
            compensation: None,
            seed: 0,
        }
    }

    /// Adds the AMSGrad maximum of v.
    pub fn with_max_exp_avg_sq(mut self, max_exp_avg_sq: &'a mut [E]) -> Self {
        self.max_exp_avg_sq = Some(max_exp_avg_sq);
        self
    }

    /// Adds the Kahan compensation buffer.
    pub fn with_compensation(mut self, compensation: &'a mut [E]) -> Self {
        self.compensation = Some(compensation);
        self
    }

    /// Sets the seed of stochastic rounding.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
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
/// be started on fewer threads (it then does all the work on those), but at least once.
/// [`step_tensors`] checks that all the work was done and returns [`AdamError::Incomplete`]
/// otherwise.
///
/// The default is the crate's own rayon pool. A host with a thread pool of its own can pass
/// one, so that two pools do not compete for the cores: the Python bindings pass torch's
/// OpenMP runtime, whose threads still spin for a while after torch's last parallel region.
pub type ForkJoin = fn(n: usize, task: &(dyn Fn() + Sync));

/// How a call runs: threads, SIMD level, chunk length, thread pool. Results never depend on
/// these.
#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    /// Worker threads; 0 or 1 runs on the calling thread; at most [`max_threads`].
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

impl ExecOptions {
    /// Checks `num_threads ≤` [`max_threads`] ([`AdamError::TooManyThreads`] otherwise).
    ///
    /// ```
    /// use rustadam::{max_threads, ExecOptions};
    /// let ok = ExecOptions { num_threads: 0, ..ExecOptions::default() };
    /// assert!(ok.validate().is_ok());
    /// let bad = ExecOptions { num_threads: max_threads() + 1, ..ExecOptions::default() };
    /// assert!(bad.validate().is_err());
    /// ```
    pub fn validate(&self) -> Result<(), AdamError> {
        let max = max_threads();
        if self.num_threads > max {
            return Err(AdamError::TooManyThreads {
                requested: self.num_threads,
                max,
            });
        }
        Ok(())
    }

    /// Makes ready what a threaded call with these options needs (the crate's thread pool,
    /// built on first use), so that a host running one step as several calls can fail before
    /// the first call writes instead of between two calls. Each call is all or nothing by
    /// itself; the pool is the one thing a later call could fail to get.
    ///
    /// ```
    /// let opts = rustadam::ExecOptions { num_threads: 2, ..Default::default() };
    /// opts.prepare().unwrap();
    /// ```
    pub fn prepare(&self) -> Result<(), AdamError> {
        self.validate()?;
        if self.num_threads > 1 && self.fork_join.is_none() {
            pool(self.num_threads)?;
        }
        Ok(())
    }
}

/// The most threads a call may ask for: 1024, or the machine's parallelism if larger. A bound,
/// so that a wrong value cannot make the crate start millions of threads.
pub fn max_threads() -> usize {
    available_parallelism().max(1024)
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
    b: Bufs<'a, E>,
}

enum Job<'a> {
    F32(Chunk<'a, f32>),
    F64(Chunk<'a, f64>),
    BF16(Chunk<'a, half::bf16>),
    F16(Chunk<'a, half::f16>),
}

/// Runs a 16-bit chunk with the rounding `work` asks for.
fn run_half<E: Element>(level: SimdLevel, work: Work, c: &mut Chunk<'_, E>) {
    match work.rounding() {
        Rounding::Nearest => kernel::run::<E, NEAREST>(level, work, &c.k, &mut c.b),
        Rounding::Stochastic => kernel::run::<E, STOCHASTIC>(level, work, &c.k, &mut c.b),
        Rounding::Kahan => kernel::run::<E, KAHAN>(level, work, &c.k, &mut c.b),
    }
}

impl Job<'_> {
    fn len(&self) -> usize {
        match self {
            Job::F32(c) => c.b.p.len(),
            Job::F64(c) => c.b.p.len(),
            Job::BF16(c) => c.b.p.len(),
            Job::F16(c) => c.b.p.len(),
        }
    }

    fn run(&mut self, level: SimdLevel, work: Work) {
        match self {
            // f32 and f64 hold the update well enough: they always round to nearest.
            Job::F32(c) => kernel::run::<f32, NEAREST>(level, work, &c.k, &mut c.b),
            Job::F64(c) => kernel::run::<f64, NEAREST>(level, work, &c.k, &mut c.b),
            Job::BF16(c) => run_half(level, work, c),
            Job::F16(c) if work.rounding() == Rounding::Nearest => {
                kernel::run_f16_nearest(level, work, &c.k, &mut c.b)
            }
            Job::F16(c) => run_half(level, work, c),
        }
    }
}

/// Whether Kahan rounding needs a compensation buffer for this element type.
fn needs_compensation<E: Element>(cfg: &AdamConfig) -> bool {
    cfg.rounding == Rounding::Kahan && std::mem::size_of::<E>() == 2
}

fn check<E: Element>(
    cfg: &AdamConfig,
    index: usize,
    t: &TensorRefs<'_, E>,
) -> Result<(), AdamError> {
    if t.step == 0 {
        return Err(AdamError::ZeroStep { tensor: index });
    }
    let expected = t.param.len();
    let optional = [
        (
            "max_exp_avg_sq",
            t.max_exp_avg_sq.as_deref(),
            cfg.amsgrad,
            "amsgrad",
        ),
        (
            "compensation",
            t.compensation.as_deref(),
            needs_compensation::<E>(cfg),
            "rounding=kahan",
        ),
    ];
    for (buffer, got, needed, needed_by) in optional {
        if needed && got.is_none() {
            return Err(AdamError::MissingBuffer {
                tensor: index,
                buffer,
                needed_by,
            });
        }
    }
    let lengths = [
        ("grad", Some(t.grad.len())),
        ("exp_avg", Some(t.exp_avg.len())),
        ("exp_avg_sq", Some(t.exp_avg_sq.len())),
        ("max_exp_avg_sq", t.max_exp_avg_sq.as_ref().map(|b| b.len())),
        ("compensation", t.compensation.as_ref().map(|b| b.len())),
    ];
    for (buffer, got) in lengths {
        if let Some(got) = got.filter(|&got| got != expected) {
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

/// Splits off the first `len` elements (all of them when shorter; an unused buffer is empty).
fn head<'a, E>(rest: &mut &'a mut [E], len: usize) -> &'a mut [E] {
    let len = len.min(rest.len());
    let (head, tail) = std::mem::take(rest).split_at_mut(len);
    *rest = tail;
    head
}

fn push_chunks<'a, E: Element>(
    jobs: &mut Vec<Job<'a>>,
    cfg: &AdamConfig,
    t: &'a mut TensorRefs<'_, E>,
    chunk_len: usize,
    wrap: fn(Chunk<'a, E>) -> Job<'a>,
    last: &mut Option<(u64, StepScalars)>,
) {
    // The tensors of a call mostly share their step count: two `powf` per tensor were a
    // visible share of a step over thousands of small tensors.
    let scalars = match *last {
        Some((step, s)) if step == t.step => s,
        _ => {
            let s = StepScalars::new(cfg, t.step);
            *last = Some((t.step, s));
            s
        }
    };
    let k = Coeffs::new(&scalars, kernel::stochastic_key(t.seed, t.step));
    let n = t.param.len();
    let (mut p, mut m, mut v) = (&mut *t.param, &mut *t.exp_avg, &mut *t.exp_avg_sq);
    let g: &'a [E] = t.grad;
    // Buffers the config does not use stay empty, and are never touched.
    let mut vmax: &mut [E] = match &mut t.max_exp_avg_sq {
        Some(b) if cfg.amsgrad => b,
        _ => &mut [],
    };
    let mut comp: &mut [E] = match &mut t.compensation {
        Some(b) if needs_compensation::<E>(cfg) => b,
        _ => &mut [],
    };
    for offset in (0..n).step_by(chunk_len) {
        let b = Bufs {
            p: head(&mut p, chunk_len),
            g: &g[offset..(offset + chunk_len).min(n)],
            m: head(&mut m, chunk_len),
            v: head(&mut v, chunk_len),
            vmax: head(&mut vmax, chunk_len),
            comp: head(&mut comp, chunk_len),
            offset,
        };
        jobs.push(wrap(Chunk { k, b }));
    }
}

/// One Adam step over many tensors in one call, split into chunks run on a thread pool.
///
/// Every tensor is checked (lengths, `step ≥ 1`, the buffers AMSGrad and Kahan rounding need),
/// the config validated and the options checked before anything is written, so such an error
/// leaves all buffers unchanged. Only [`AdamError::Incomplete`], a host [`ForkJoin`] that did
/// not run the work, comes after writing.
///
/// ```
/// use rustadam::{step_tensors, AdamConfig, AnyTensor, ExecOptions, TensorRefs};
/// let (mut p, g, mut m, mut v) = (vec![1.0f32; 3], vec![0.5f32; 3], vec![0.0f32; 3], vec![0.0f32; 3]);
/// let t = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1);
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
    opts.validate()?;
    let mut total = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        with_refs!(t, t => check(cfg, i, t))?;
        total += with_refs!(t, t => t.param.len());
    }
    let chunk_len = opts.chunk_len.max(1);
    let level = opts.simd.unwrap_or_else(SimdLevel::detect);
    let mut jobs = Vec::with_capacity(tensors.len() + total / chunk_len);
    let mut last = None;
    for t in tensors.iter_mut() {
        let last = &mut last;
        match t {
            AnyTensor::F32(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F32, last),
            AnyTensor::F64(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F64, last),
            AnyTensor::BF16(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::BF16, last),
            AnyTensor::F16(t) => push_chunks(&mut jobs, cfg, t, chunk_len, Job::F16, last),
        }
    }
    if opts.num_threads <= 1 || total < PARALLEL_MIN_ELEMS || jobs.len() < 2 {
        jobs.iter_mut().for_each(|j| j.run(level, work));
        return Ok(());
    }
    // One contiguous run of chunks per thread, of about equal elements: each thread streams
    // through its own stretch of memory, and no more threads work than were asked for.
    let parts = split_even(&mut jobs, opts.num_threads, total);
    if let Some(fork_join) = opts.fork_join {
        // A thread takes the next unclaimed run until none is left, so all the work is done
        // however many threads the pool really starts, if it starts one at all: count to know.
        let parts: Vec<Mutex<&mut [Job<'_>]>> = parts.into_iter().map(Mutex::new).collect();
        let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
        fork_join(opts.num_threads, &|| {
            while let Some(part) = parts.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut part = part.lock().unwrap_or_else(|e| e.into_inner());
                part.iter_mut().for_each(|j| j.run(level, work));
                done.fetch_add(1, Ordering::Release);
            }
        });
        let done = done.load(Ordering::Acquire);
        if done != parts.len() {
            return Err(AdamError::Incomplete {
                done,
                parts: parts.len(),
            });
        }
    } else {
        pool(opts.num_threads)?.install(|| {
            parts
                .into_par_iter()
                .for_each(|part| part.iter_mut().for_each(|j| j.run(level, work)))
        });
    }
    Ok(())
}

/// Splits the chunks into at most `n` contiguous runs of about `total / n` elements each.
fn split_even<'j, 'a>(
    mut jobs: &'j mut [Job<'a>],
    n: usize,
    total: usize,
) -> Vec<&'j mut [Job<'a>]> {
    let target = total.div_ceil(n.max(1)).max(1);
    let mut parts = Vec::with_capacity(n);
    while !jobs.is_empty() {
        let (mut end, mut sum) = (0, 0);
        while end < jobs.len() && (sum < target || end == 0) {
            sum += jobs[end].len();
            end += 1;
        }
        let (head, tail) = std::mem::take(&mut jobs).split_at_mut(end);
        parts.push(head);
        jobs = tail;
    }
    parts
}

/// The process's pool and the process it belongs to.
type Pool = Mutex<Option<(u32, Arc<rayon::ThreadPool>)>>;
static POOL: Pool = Mutex::new(None);
/// How many pools were built, for the tests.
static POOLS_BUILT: AtomicUsize = AtomicUsize::new(0);

/// The crate's pool, with at least `num_threads` threads: one per process, built on first use
/// and kept, since building one costs far more than a step. It is rebuilt only to grow, to at
/// least twice its size, so that rising thread counts rebuild it a few times at most; the work
/// is split into `num_threads` parts, so a larger pool never runs more threads than asked for.
fn pool(num_threads: usize) -> Result<Arc<rayon::ThreadPool>, AdamError> {
    let pid = std::process::id();
    let mut slot = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let mut current = 0;
    if let Some((owner, p)) = slot.as_ref() {
        if *owner == pid {
            if p.current_num_threads() >= num_threads {
                return Ok(Arc::clone(p));
            }
            current = p.current_num_threads();
        }
    }
    let size = num_threads
        .max(available_parallelism())
        .max(2 * current)
        .min(max_threads().max(num_threads));
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(size)
            .thread_name(|i| format!("rustadam-{i}"))
            .build()
            .map_err(|e| AdamError::ThreadPool(e.to_string()))?,
    );
    POOLS_BUILT.fetch_add(1, Ordering::Relaxed);
    if let Some((owner, old)) = slot.replace((pid, Arc::clone(&p))) {
        if owner != pid {
            // A child made by fork() inherits the parent's pool but not its threads: dropping
            // it would signal threads that do not exist here, so it is left alone.
            std::mem::forget(old);
        }
        // The process's own smaller pool is dropped; its threads end once idle.
    }
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Varying the thread count keeps one pool per process and rebuilds it only a few times.
    #[test]
    fn one_pool_whatever_the_thread_count() {
        let n = 2 * PARALLEL_MIN_ELEMS;
        let (mut p, g, mut m, mut v) = (
            vec![1.0f32; n],
            vec![0.5f32; n],
            vec![0.0f32; n],
            vec![0.0f32; n],
        );
        let before = POOLS_BUILT.load(Ordering::Relaxed);
        for threads in (1..=40).chain((1..=40).rev()) {
            let opts = ExecOptions {
                num_threads: threads,
                simd: None,
                chunk_len: 1024,
                fork_join: None,
            };
            let t = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1);
            step_tensors(&AdamConfig::default(), &mut [AnyTensor::from(t)], &opts).unwrap();
            if threads == 1 {
                continue; // the calling thread, no pool
            }
            let slot = POOL.lock().unwrap();
            let (owner, pool) = slot.as_ref().expect("a pool after a threaded call");
            assert_eq!(*owner, std::process::id());
            assert!(pool.current_num_threads() >= threads);
        }
        // Doubling from the machine's parallelism up to 40: a handful of builds, not 40.
        let built = POOLS_BUILT.load(Ordering::Relaxed) - before;
        assert!(built <= 7, "{built} pools built");
    }

    /// Parts of equal size, at most as many as threads, covering every chunk in order.
    #[test]
    fn split_even_covers_everything() {
        let mut bufs: Vec<[Vec<f32>; 4]> = (0..10)
            .map(|_| [vec![0.0; 5], vec![0.0; 5], vec![0.0; 5], vec![0.0; 5]])
            .collect();
        let mut jobs: Vec<Job<'_>> = bufs
            .iter_mut()
            .map(|[p, g, m, v]| {
                Job::F32(Chunk {
                    k: Coeffs::new(&StepScalars::new(&AdamConfig::default(), 1), 0),
                    b: Bufs {
                        p,
                        g,
                        m,
                        v,
                        vmax: &mut [],
                        comp: &mut [],
                        offset: 0,
                    },
                })
            })
            .collect();
        for n in 1..=12 {
            let parts = split_even(&mut jobs, n, 50);
            assert!(parts.len() <= n, "{n} threads: {} parts", parts.len());
            assert_eq!(parts.iter().map(|p| p.len()).sum::<usize>(), 10);
        }
    }
}
