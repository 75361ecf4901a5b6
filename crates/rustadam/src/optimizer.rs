//! A per-tensor optimizer: [`Adam`] steps parameters held in plain slices, each with its own
//! [`AdamState`].
//!
//! For a parameter θ with gradient g, the state holds the moments m, v and the count t of the
//! updates done so far. One call of [`Adam::step`] makes update t + 1:
//!
//! ```text
//! g ← g + λ·θ                          (WeightDecay::L2)
//! θ ← θ·(1 − α·λ)  or  θ ← θ·(1 − λ)   (WeightDecay::Decoupled / DecoupledAbsolute)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! t ← t + 1,  bc1 = 1 − β1^t,  bc2 = 1 − β2^t
//! θ ← θ − (α·√bc2 / bc1) · m / (√v + ε̂)     (optimized_update = true)
//! θ ← θ − (α / bc1) · m / (√v / √bc2 + ε)   (optimized_update = false)
//! ```
//!
//! With `maximize` the gradient is negated first; with `amsgrad` the denominator uses
//! v_max ← max(v_max, v) instead of v.
//!
//! The gradient itself is never written: L2 decay changes only the value the moments see.

use crate::kernel::{Element, Real};
use crate::{step_tensors, AdamConfig, AdamError, AnyTensor, ExecOptions, Rounding, TensorRefs};

/// The state Adam keeps for one tensor: the moments m (`exp_avg`) and v (`exp_avg_sq`), each
/// as long as the parameter, and `step`, the number of updates done so far.
///
/// A new state has zero moments and `step == 0`; [`Adam::step`] makes update `step + 1` and
/// stores that count. The moments are stored in the parameter's element type, as PyTorch does.
///
/// With the `serde` feature the state serializes as `{"exp_avg": [..], "exp_avg_sq": [..],
/// "step": t}`, so a checkpoint can resume exactly where it stopped (with `serde_json`, enable
/// its `float_roundtrip` feature: its default float parser may be off by one ulp).
///
/// ```
/// use rustadam::AdamState;
/// let state = AdamState::<f32>::new(3);
/// assert_eq!(state.exp_avg, vec![0.0; 3]);
/// assert_eq!(state.step, 0);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct AdamState<E> {
    /// m, the exponential moving average of the gradients.
    pub exp_avg: Vec<E>,
    /// v, the exponential moving average of the squared gradients.
    pub exp_avg_sq: Vec<E>,
    /// t, the number of updates done so far (0 before the first).
    pub step: u64,
    /// The AMSGrad maximum of v, created (zeros) by the first step with `amsgrad` on.
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub max_exp_avg_sq: Option<Vec<E>>,
    /// The Kahan compensation of a 16-bit parameter, created (zeros) by the first step with
    /// [`Rounding::Kahan`](crate::Rounding::Kahan).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub compensation: Option<Vec<E>>,
    /// The seed of this tensor's stochastic rounding (default 0; give each tensor its own).
    #[cfg_attr(feature = "serde", serde(default, skip_serializing_if = "is_zero"))]
    pub seed: u64,
}

#[cfg(feature = "serde")]
fn is_zero(x: &u64) -> bool {
    *x == 0
}

impl<E: Element> AdamState<E> {
    /// A fresh state for a parameter of `len` elements: m = v = 0, t = 0.
    ///
    /// ```
    /// use rustadam::AdamState;
    /// let state = AdamState::<f64>::new(2);
    /// assert_eq!((state.exp_avg_sq, state.step), (vec![0.0, 0.0], 0));
    /// ```
    pub fn new(len: usize) -> Self {
        let zero = E::store(<E::Compute as Real>::from_f64(0.0));
        Self {
            exp_avg: vec![zero; len],
            exp_avg_sq: vec![zero; len],
            step: 0,
            max_exp_avg_sq: None,
            compensation: None,
            seed: 0,
        }
    }

    /// The same state with the stochastic-rounding seed `seed`.
    ///
    /// ```
    /// use rustadam::AdamState;
    /// assert_eq!(AdamState::<f32>::new(1).with_seed(7).seed, 7);
    /// ```
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// A state from saved moments and step count, checking that the moments have one length.
    ///
    /// ```
    /// use rustadam::{AdamError, AdamState};
    /// let state = AdamState::from_parts(vec![0.1f32, 0.2], vec![0.01, 0.04], 7).unwrap();
    /// assert_eq!(state.step, 7);
    /// let err = AdamState::from_parts(vec![0.1f32, 0.2], vec![0.01], 7).unwrap_err();
    /// assert!(matches!(err, AdamError::StateMismatch { exp_avg: 2, exp_avg_sq: 1 }));
    /// ```
    pub fn from_parts(exp_avg: Vec<E>, exp_avg_sq: Vec<E>, step: u64) -> Result<Self, AdamError> {
        if exp_avg.len() != exp_avg_sq.len() {
            return Err(AdamError::StateMismatch {
                exp_avg: exp_avg.len(),
                exp_avg_sq: exp_avg_sq.len(),
            });
        }
        Ok(Self {
            exp_avg,
            exp_avg_sq,
            step,
            max_exp_avg_sq: None,
            compensation: None,
            seed: 0,
        })
    }

    /// The number of elements of the parameter this state belongs to (the length of m).
    pub fn len(&self) -> usize {
        self.exp_avg.len()
    }

    /// Whether the state is for an empty parameter.
    pub fn is_empty(&self) -> bool {
        self.exp_avg.is_empty()
    }
}

/// The Adam optimizer over slices: an [`AdamConfig`] and the [`ExecOptions`] it runs with.
///
/// It holds no per-tensor data; each parameter has its own [`AdamState`], which the caller
/// keeps next to it. [`Adam::step`] updates one parameter, [`Adam::step_many`] many of one
/// element type in one call (split into chunks on the thread pool). For a call that mixes
/// element types, use [`step_tensors`](crate::step_tensors) directly.
///
/// The element types are those of [`AnyTensor`]: `f32`, `f64`, and [`bf16`](crate::bf16) and
/// [`f16`](crate::f16), which are computed in `f32` and rounded once when stored. Results are
/// bit-identical whatever the thread count, chunk length or SIMD level.
///
/// Minimising f(θ) = Σ (θᵢ − 3)²:
///
/// ```
/// use rustadam::{Adam, AdamConfig, AdamState};
///
/// let adam = Adam::new(AdamConfig::default().lr(0.1))?;
/// let mut theta = vec![0.0f32; 4];
/// let mut state = AdamState::new(theta.len());
/// for _ in 0..200 {
///     let grad: Vec<f32> = theta.iter().map(|x| 2.0 * (x - 3.0)).collect();
///     adam.step(&mut theta, &grad, &mut state)?;
/// }
/// assert_eq!(state.step, 200);
/// assert!(theta.iter().all(|x| (x - 3.0).abs() < 0.05));
/// # Ok::<(), rustadam::AdamError>(())
/// ```
///
/// The same with bfloat16 storage:
///
/// ```
/// use rustadam::{bf16, Adam, AdamConfig, AdamState};
///
/// let adam = Adam::new(AdamConfig::default().lr(0.1))?;
/// let mut theta = vec![bf16::ZERO; 4];
/// let mut state = AdamState::new(theta.len());
/// for _ in 0..200 {
///     let grad: Vec<bf16> = theta.iter().map(|x| bf16::from_f32(2.0 * (x.to_f32() - 3.0))).collect();
///     adam.step(&mut theta, &grad, &mut state)?;
/// }
/// assert!(theta.iter().all(|x| (x.to_f32() - 3.0).abs() < 0.05));
/// # Ok::<(), rustadam::AdamError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    config: AdamConfig,
    exec: ExecOptions,
}

impl Default for Adam {
    /// The spec's defaults (`AdamConfig::default()`) with the default [`ExecOptions`].
    fn default() -> Self {
        Self {
            config: AdamConfig::default(),
            exec: ExecOptions::default(),
        }
    }
}

impl Adam {
    /// An optimizer with `config`, validated here ([`AdamConfig::validate`]).
    ///
    /// ```
    /// use rustadam::{Adam, AdamConfig, AdamError};
    /// assert!(Adam::new(AdamConfig::default()).is_ok());
    /// let err = Adam::new(AdamConfig::default().lr(-1.0)).unwrap_err();
    /// assert_eq!(err, AdamError::InvalidLr(-1.0));
    /// assert_eq!(err.to_string(), "Invalid learning rate: -1");
    /// ```
    pub fn new(config: AdamConfig) -> Result<Self, AdamError> {
        config.validate()?;
        Ok(Self {
            config,
            exec: ExecOptions::default(),
        })
    }

    /// Sets how steps run (threads, SIMD level, chunk length); results do not depend on it.
    ///
    /// ```
    /// use rustadam::{Adam, ExecOptions};
    /// let adam = Adam::default().with_exec_options(ExecOptions { num_threads: 1, ..ExecOptions::default() });
    /// assert_eq!(adam.exec_options().num_threads, 1);
    /// ```
    pub fn with_exec_options(mut self, exec: ExecOptions) -> Self {
        self.exec = exec;
        self
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// How steps run.
    pub fn exec_options(&self) -> &ExecOptions {
        &self.exec
    }

    /// Replaces the hyper-parameters, after validating them; on error nothing changes.
    ///
    /// The next step reads the new values; the states are kept, as a scheduler expects.
    pub fn set_config(&mut self, config: AdamConfig) -> Result<(), AdamError> {
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Sets the learning rate α for the next steps (a schedule), after validating it.
    ///
    /// ```
    /// use rustadam::Adam;
    /// let mut adam = Adam::default();
    /// adam.set_lr(1e-4).unwrap();
    /// assert_eq!(adam.config().lr, 1e-4);
    /// assert!(adam.set_lr(f64::NAN).is_err());
    /// assert_eq!(adam.config().lr, 1e-4);
    /// ```
    pub fn set_lr(&mut self, lr: f64) -> Result<(), AdamError> {
        self.set_config(self.config.lr(lr))
    }

    /// One Adam update of `param` with gradient `grad`; `state.step` goes from t − 1 to t.
    ///
    /// `grad`, `state.exp_avg` and `state.exp_avg_sq` (and `max_exp_avg_sq`, `compensation`
    /// when present) must be as long as `param` ([`AdamError::LengthMismatch`] otherwise). The
    /// buffers AMSGrad and Kahan rounding need are created, zeros, when missing. On an error
    /// nothing is written, the step count included, and no buffer is created.
    ///
    /// ```
    /// use rustadam::{Adam, AdamConfig, AdamState};
    /// let adam = Adam::new(AdamConfig::default().lr(0.01))?;
    /// let mut theta = [1.0f64, -2.0];
    /// let mut state = AdamState::new(2);
    /// adam.step(&mut theta, &[0.5, -0.5], &mut state)?;
    /// // The first update moves each element by α·sign(g) (here ε̂ is negligible).
    /// assert!((theta[0] - 0.99).abs() < 1e-12 && (theta[1] + 1.99).abs() < 1e-12);
    /// assert_eq!(state.step, 1);
    ///
    /// let mut short = AdamState::new(1);
    /// assert!(adam.step(&mut theta, &[0.5, -0.5], &mut short).is_err());
    /// assert_eq!(short.step, 0);
    /// # Ok::<(), rustadam::AdamError>(())
    /// ```
    pub fn step<E>(
        &self,
        param: &mut [E],
        grad: &[E],
        state: &mut AdamState<E>,
    ) -> Result<(), AdamError>
    where
        E: Element,
        for<'t> AnyTensor<'t>: From<TensorRefs<'t, E>>,
    {
        self.step_many([(param, grad, state)])
    }

    /// One Adam update of many parameters of one element type, in one call: the tensors are
    /// split into chunks and run on the thread pool.
    ///
    /// Each item is `(param, grad, state)`. Every item is checked before anything is written,
    /// so on an error (which names the item's position as `tensor i`) no parameter, moment or
    /// step count has changed.
    ///
    /// ```
    /// use rustadam::{Adam, AdamState};
    /// let adam = Adam::default();
    /// let mut weights = vec![0.5f32; 6];
    /// let mut bias = vec![0.0f32; 2];
    /// let (mut sw, mut sb) = (AdamState::new(6), AdamState::new(2));
    /// let (gw, gb) = (vec![1.0f32; 6], vec![-1.0f32; 2]);
    /// adam.step_many([
    ///     (&mut weights[..], &gw[..], &mut sw),
    ///     (&mut bias[..], &gb[..], &mut sb),
    /// ])?;
    /// assert_eq!((sw.step, sb.step), (1, 1));
    /// assert!(weights[0] < 0.5 && bias[0] > 0.0);
    /// # Ok::<(), rustadam::AdamError>(())
    /// ```
    pub fn step_many<'a, E, I>(&self, items: I) -> Result<(), AdamError>
    where
        E: Element,
        for<'t> AnyTensor<'t>: From<TensorRefs<'t, E>>,
        I: IntoIterator<Item = (&'a mut [E], &'a [E], &'a mut AdamState<E>)>,
    {
        /// A buffer the state has, or the index of one made for this step.
        enum Slot<'a, E> {
            Absent,
            Held(&'a mut [E]),
            Made(usize),
        }
        type Item<'a, E> = (
            &'a mut [E],
            &'a [E],
            &'a mut [E],
            &'a mut [E],
            &'a mut u64,
            u64,
            [Slot<'a, E>; 2],
        );
        let kahan = self.config.rounding == Rounding::Kahan && std::mem::size_of::<E>() == 2;
        let zero = E::store(<E::Compute as Real>::from_f64(0.0));
        // Missing buffers are made here and moved into their states only once the step has
        // succeeded, so on an error no state changes.
        let (mut made, mut homes): (Vec<Vec<E>>, Vec<&'a mut Option<Vec<E>>>) = (vec![], vec![]);
        let mut collected: Vec<Item<'a, E>> = Vec::new();
        for (param, grad, state) in items {
            let AdamState {
                exp_avg,
                exp_avg_sq,
                step,
                max_exp_avg_sq,
                compensation,
                seed,
            } = state;
            let mut slot = |home: &'a mut Option<Vec<E>>, wanted: bool| match home {
                Some(b) => Slot::Held(&mut b[..]),
                None if wanted => {
                    made.push(vec![zero; param.len()]);
                    homes.push(home);
                    Slot::Made(made.len() - 1)
                }
                None => Slot::Absent,
            };
            let slots = [
                slot(max_exp_avg_sq, self.config.amsgrad),
                slot(compensation, kahan),
            ];
            collected.push((param, grad, exp_avg, exp_avg_sq, step, *seed, slots));
        }
        let mut fresh: Vec<Option<&mut [E]>> = made.iter_mut().map(|b| Some(&mut b[..])).collect();
        let mut steps = Vec::with_capacity(collected.len());
        let mut tensors: Vec<AnyTensor<'_>> = Vec::with_capacity(collected.len());
        for (param, grad, exp_avg, exp_avg_sq, step, seed, slots) in collected {
            // Saturating: β^t has long underflowed to 0 before t nears u64::MAX, so the
            // arithmetic is the same and no input can make this overflow.
            let mut refs =
                TensorRefs::new(param, grad, exp_avg, exp_avg_sq, step.saturating_add(1))
                    .with_seed(seed);
            let [vmax, comp] = slots.map(|s| match s {
                Slot::Absent => None,
                Slot::Held(b) => Some(b),
                Slot::Made(i) => fresh[i].take(),
            });
            refs.max_exp_avg_sq = vmax;
            refs.compensation = comp;
            tensors.push(AnyTensor::from(refs));
            steps.push(step);
        }
        step_tensors(&self.config, &mut tensors, &self.exec)?;
        drop(tensors);
        for (home, buffer) in homes.into_iter().zip(made) {
            *home = Some(buffer);
        }
        for step in steps {
            *step = step.saturating_add(1);
        }
        Ok(())
    }
}
