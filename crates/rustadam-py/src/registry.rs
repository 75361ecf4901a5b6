//! The memory that running steps use, process-wide.
//!
//! Two steps that share a buffer (two optimizers over one parameter, one optimizer stepped from
//! two threads) would write the same memory from two threads at once while the GIL is released.
//! Each step registers the byte ranges it touches before it releases the GIL; a step whose ranges
//! meet those of a running step (where either writes) is refused instead.

use std::sync::Mutex;

use pyo3::exceptions::PyRuntimeError;
use pyo3::PyResult;
use rustadam::layout::{self, Span};

/// The spans of each running step, by a number unique to the step, and the process they run
/// in: a child made by fork() while another thread of its parent was stepping inherits that
/// step's claim but not the thread, so claims of another process are dropped.
static RUNNING: Mutex<Claims> = Mutex::new((0, Vec::new()));

/// (process id, [(step number, spans)]).
type Claims = (u32, Vec<(u64, Vec<Span>)>);

/// The running steps of this process.
fn running() -> std::sync::MutexGuard<'static, Claims> {
    let mut guard = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    if guard.0 != pid {
        *guard = (pid, Vec::new());
    }
    guard
}
static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A step's claim on its memory; dropping it releases the claim.
pub(crate) struct Borrow(u64);

impl Drop for Borrow {
    fn drop(&mut self) {
        running().1.retain(|(id, _)| *id != self.0);
    }
}

/// Claims `spans` for a step; RuntimeError if a running step uses any of them where one writes.
pub(crate) fn borrow(spans: Vec<Span>) -> PyResult<Borrow> {
    let mut guard = running();
    let running = &mut guard.1;
    if !running.is_empty() {
        let mine = spans.len();
        let mut all = spans.clone();
        for (_, other) in running.iter() {
            all.extend_from_slice(other);
        }
        if layout::conflicts(&all)
            .iter()
            .any(|&(a, b)| a < mine && b >= mine)
        {
            return Err(PyRuntimeError::new_err(
                "another rustadam step is running on memory this step uses (is step() called \
                 from two threads at once, or by two optimizers that share a parameter?); \
                 nothing was changed",
            ));
        }
    }
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    running.push((id, spans));
    Ok(Borrow(id))
}
