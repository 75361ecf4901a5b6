//! torch's OpenMP runtime as the core's thread pool.
//!
//! After a parallel region (the backward pass, say) torch's OpenMP threads keep spinning for a
//! while before they sleep; a second pool started then competes with them for the cores. Running
//! the step on the same OpenMP threads instead hands them the work they are waiting for.

use std::ffi::{c_uint, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// libgomp's entry for `#pragma omp parallel`: runs `f(data)` on a team of `num_threads`.
type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

#[cfg(target_os = "linux")]
unsafe extern "C" {
    fn dlsym(handle: *mut c_void, symbol: *const std::ffi::c_char) -> *mut c_void;
}

/// `GOMP_parallel` of the OpenMP runtime already loaded in the process (torch's), if any.
///
/// Never in a child made by fork(): libgomp's team outlives fork() in memory but not its
/// threads, so a parallel region there never ends (torch's own ones included); the core's own
/// pool, rebuilt per process, runs the step instead.
fn gomp_parallel() -> Option<GompParallel> {
    static FOUND: OnceLock<Option<GompParallel>> = OnceLock::new();
    if FORKED.load(Ordering::Relaxed) {
        return None;
    }
    *FOUND.get_or_init(lookup)
}

/// Set in a child made by fork() (after `watch_fork`): the parent's OpenMP team is not to be
/// used there, whenever the child's first step comes.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Whether this process is a child made by fork() after the extension was loaded.
pub fn forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

extern "C" fn in_child() {
    FORKED.store(true, Ordering::Relaxed);
}

#[cfg(unix)]
unsafe extern "C" {
    fn pthread_atfork(
        prepare: Option<extern "C" fn()>,
        parent: Option<extern "C" fn()>,
        child: Option<extern "C" fn()>,
    ) -> std::ffi::c_int;
}

/// Makes every child made by fork() from now on step on the core's own pool (rebuilt per
/// process), never on the OpenMP team it inherited without its threads. Called once, when the
/// extension is loaded.
pub fn watch_fork() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        #[cfg(unix)]
        // SAFETY: registers a handler that only stores to an atomic, which is async-signal-safe
        // as a child handler of fork() must be.
        unsafe {
            pthread_atfork(None, None, Some(in_child));
        }
    });
}

/// Marks this process as a child made by fork() where Python says it is one although the
/// extension was loaded after the fork: a multiprocessing worker started by "fork" (DataLoader
/// workers among them), which imports the extension itself. Its parent's torch may have
/// started an OpenMP team this child has without its threads.
pub fn note_fork_worker(py: pyo3::Python<'_>) {
    use pyo3::prelude::*;
    let forked_worker = || -> PyResult<bool> {
        let mp = py.import("multiprocessing")?;
        let worker = !mp.call_method0("parent_process")?.is_none();
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("allow_none", true)?;
        let method = mp.call_method("get_start_method", (), Some(&kw))?;
        Ok(worker && method.extract::<Option<String>>()?.as_deref() == Some("fork"))
    };
    if forked_worker().unwrap_or(false) {
        FORKED.store(true, Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
fn lookup() -> Option<GompParallel> {
    // SAFETY: a null handle is RTLD_DEFAULT on Linux (glibc and musl): dlsym only searches the
    // global symbol table for this NUL-terminated name.
    let p = unsafe { dlsym(std::ptr::null_mut(), c"GOMP_parallel".as_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: GOMP_parallel has had this signature in the libgomp ABI since GCC 4.9, and the
    // OpenMP runtimes that stand in for libgomp (LLVM's, Intel's) export it alike.
    Some(unsafe { std::mem::transmute::<*mut c_void, GompParallel>(p) })
}

#[cfg(not(target_os = "linux"))]
fn lookup() -> Option<GompParallel> {
    None
}

/// Whether the process has an OpenMP runtime to run the step on.
pub fn available() -> bool {
    gomp_parallel().is_some()
}

struct Team<'a> {
    task: &'a (dyn Fn() + Sync),
    panicked: AtomicBool,
}

extern "C" fn run_member(data: *mut c_void) {
    // SAFETY: `data` is the `Team` that `fork_join` passes to GOMP_parallel, which returns only
    // after every member has returned, so the reference outlives this call.
    let team = unsafe { &*(data as *const Team<'_>) };
    // A panic must not unwind into C: record it and re-raise it on the calling thread.
    if std::panic::catch_unwind(AssertUnwindSafe(team.task)).is_err() {
        team.panicked.store(true, Ordering::Relaxed);
    }
}

/// A [`rustadam::ForkJoin`] on OpenMP threads; the task alone on this thread when none exists.
pub fn fork_join(n: usize, task: &(dyn Fn() + Sync)) {
    let Some(parallel) = gomp_parallel() else {
        task();
        return;
    };
    let team = Team {
        task,
        panicked: AtomicBool::new(false),
    };
    let threads = c_uint::try_from(n).unwrap_or(c_uint::MAX);
    // SAFETY: `parallel` is GOMP_parallel (see `lookup`); `run_member` reads `team` only while
    // this call runs, and GOMP_parallel returns after the whole team has finished.
    unsafe {
        parallel(
            run_member,
            &team as *const Team<'_> as *mut c_void,
            threads,
            0,
        )
    };
    if team.panicked.load(Ordering::Relaxed) {
        panic!("a thread of the OpenMP team panicked during the step");
    }
}
