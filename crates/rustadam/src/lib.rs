//! # rustadam — the Adam optimizer as a fused kernel
//!
//! For a parameter θ with gradient g at update t (t counts this parameter's updates from 1):
//!
//! ```text
//! m_t = β1·m_{t−1} + (1 − β1)·g_t
//! v_t = β2·v_{t−1} + (1 − β2)·g_t²
//! θ_t = θ_{t−1} − α·m̂_t / (√v̂_t + ε),   m̂_t = m_t / (1 − β1^t),   v̂_t = v_t / (1 − β2^t)
//! ```
//!
//! With `bc1 = 1 − β1^t`, `bc2 = 1 − β2^t` (in `f64`), two forms of the bias correction:
//!
//! - `optimized_update = true` (default): `θ ← θ − (α·√bc2 / bc1) · m / (√v + ε̂)`, where the
//!   given ε is ε̂ = ε·√bc2;
//! - `optimized_update = false`: `θ ← θ − (α / bc1) · m / (√v / √bc2 + ε)`.
//!
//! Weight decay ([`WeightDecay`]) runs first: L2 adds `λ·θ` to the gradient, decoupled decay
//! scales θ by `1 − α·λ` (or `1 − λ` when absolute).
//!
//! The kernel makes one pass per element (reads θ, g, m, v once, writes θ, m, v once),
//! vectorised for the best SIMD level of the CPU, and [`step_tensors`] runs many tensors in
//! one call on a thread pool. Results are bit-identical across thread counts, chunk lengths and
//! SIMD levels.
//!
//! ```
//! use rustadam::{step_tensors, AdamConfig, AnyTensor, ExecOptions, TensorRefs, WeightDecay};
//!
//! let cfg = AdamConfig::default().lr(1e-2).weight_decay(WeightDecay::Decoupled(0.01));
//! let mut theta = vec![0.5f32; 1000];
//! let (mut m, mut v) = (vec![0.0; 1000], vec![0.0; 1000]);
//! for t in 1..=100 {
//!     let grad: Vec<f32> = theta.iter().map(|x| 2.0 * x).collect(); // d/dθ of θ²
//!     let refs = TensorRefs::new(&mut theta, &grad, &mut m, &mut v, t);
//!     step_tensors(&cfg, &mut [AnyTensor::from(refs)], &ExecOptions::default()).unwrap();
//! }
//! assert!(theta[0] < 0.5);
//! ```

mod config;
mod error;
mod halfprec;
pub mod kernel;
pub mod layout;

/// The 16-bit float types the kernel takes (re-exported from the `half` crate).
pub use half::{bf16, f16};
mod multi_tensor;
mod optimizer;

pub use config::{AdamConfig, Rounding, WeightDecay};
pub use error::AdamError;
pub use kernel::{Element, Real, SimdLevel, StepScalars};
pub use multi_tensor::{
    max_threads, roofline, step_tensors, AnyTensor, ExecOptions, ForkJoin, TensorRefs,
};
pub use optimizer::{Adam, AdamState};
