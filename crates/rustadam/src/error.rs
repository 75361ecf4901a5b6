//! The error type of the core.

use std::fmt;

/// Everything the core can refuse, with the value or tensor at fault.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AdamError {
    /// `lr` is negative or NaN.
    InvalidLr(f64),
    /// `eps` is negative or NaN.
    InvalidEps(f64),
    /// A beta outside `[0, 1)`; `index` is 0 for β1 and 1 for β2.
    InvalidBeta {
        /// 0 for β1, 1 for β2.
        index: usize,
        /// The value given.
        value: f64,
    },
    /// A negative or NaN weight decay.
    InvalidWeightDecay(f64),
    /// The step count `t` of a tensor is 0; it counts updates and starts at 1.
    ZeroStep {
        /// Position of the tensor in the call.
        tensor: usize,
    },
    /// A buffer's length differs from its parameter's.
    LengthMismatch {
        /// Position of the tensor in the call.
        tensor: usize,
        /// Which buffer: `grad`, `exp_avg`, `exp_avg_sq`, `max_exp_avg_sq` or `compensation`.
        buffer: &'static str,
        /// The parameter's length.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// A buffer the config needs is missing: `max_exp_avg_sq` for AMSGrad, `compensation` for
    /// Kahan rounding of a 16-bit tensor.
    MissingBuffer {
        /// Position of the tensor in the call.
        tensor: usize,
        /// Which buffer: `max_exp_avg_sq` or `compensation`.
        buffer: &'static str,
        /// The option that needs it: `amsgrad` or `rounding=kahan`.
        needed_by: &'static str,
    },
    /// The thread pool could not be built.
    ThreadPool(String),
    /// More threads asked for than [`max_threads`](crate::max_threads) allows.
    TooManyThreads {
        /// The `num_threads` given.
        requested: usize,
        /// The limit.
        max: usize,
    },
    /// A [`ForkJoin`](crate::ForkJoin) returned before the work was done (it ran the task on no
    /// thread, or a task did not finish). Some buffers may have been updated and others not.
    Incomplete {
        /// Parts of the work done.
        done: usize,
        /// Parts of the work in all.
        parts: usize,
    },
    /// An [`AdamState`](crate::AdamState) whose two moments have different lengths.
    StateMismatch {
        /// The length of m (`exp_avg`).
        exp_avg: usize,
        /// The length of v (`exp_avg_sq`).
        exp_avg_sq: usize,
    },
}

impl fmt::Display for AdamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidLr(v) => write!(f, "Invalid learning rate: {v}"),
            Self::InvalidEps(v) => write!(f, "Invalid epsilon value: {v}"),
            Self::InvalidBeta { index, value } => {
                write!(f, "Invalid beta parameter at index {index}: {value}")
            }
            Self::InvalidWeightDecay(v) => write!(f, "Invalid weight_decay value: {v}"),
            Self::ZeroStep { tensor } => write!(
                f,
                "tensor {tensor}: step must be at least 1 (it counts updates, this one included)"
            ),
            Self::LengthMismatch {
                tensor,
                buffer,
                expected,
                got,
            } => write!(
                f,
                "tensor {tensor}: {buffer} has {got} elements but the parameter has {expected}"
            ),
            Self::MissingBuffer {
                tensor,
                buffer,
                needed_by,
            } => write!(f, "tensor {tensor}: {needed_by} needs a {buffer} buffer"),
            Self::ThreadPool(msg) => write!(f, "could not build the thread pool: {msg}"),
            Self::TooManyThreads { requested, max } => {
                write!(f, "num_threads is {requested}, more than the limit {max}")
            }
            Self::Incomplete { done: 0, parts } => write!(
                f,
                "the thread pool returned without running any of the {parts} parts of the \
                 step; nothing was written"
            ),
            Self::Incomplete { done, parts } => write!(
                f,
                "the thread pool returned with {done} of {parts} parts of the step done; \
                 the buffers are partly updated"
            ),
            Self::StateMismatch {
                exp_avg,
                exp_avg_sq,
            } => write!(
                f,
                "AdamState: exp_avg has {exp_avg} elements but exp_avg_sq has {exp_avg_sq}"
            ),
        }
    }
}

impl std::error::Error for AdamError {}
