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
        /// Which buffer: `grad`, `exp_avg` or `exp_avg_sq`.
        buffer: &'static str,
        /// The parameter's length.
        expected: usize,
        /// The buffer's length.
        got: usize,
    },
    /// The thread pool could not be built.
    ThreadPool(String),
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
            Self::ThreadPool(msg) => write!(f, "could not build the thread pool: {msg}"),
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
