//! Hyper-parameters: [`AdamConfig`] and [`WeightDecay`].

use crate::AdamError;

/// How weight decay enters the step, with its coefficient λ.
///
/// - [`WeightDecay::L2`]: the gradient becomes `g + λ·θ` before the moments are updated.
/// - [`WeightDecay::Decoupled`]: `θ ← θ·(1 − α·λ)` before the Adam update (AdamW).
/// - [`WeightDecay::DecoupledAbsolute`]: `θ ← θ·(1 − λ)`, independent of the learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum WeightDecay {
    /// No decay.
    #[default]
    None,
    /// Coupled (L2) decay: `g ← g + λ·θ`.
    L2(f64),
    /// Decoupled decay scaled by the learning rate: `θ ← θ·(1 − α·λ)`.
    Decoupled(f64),
    /// Decoupled decay not scaled by the learning rate: `θ ← θ·(1 − λ)`.
    DecoupledAbsolute(f64),
}

impl WeightDecay {
    /// The spec's three-flag form: `weight_decouple` and `absolute` as in the Python `WeightDecay`.
    ///
    /// A zero coefficient gives [`WeightDecay::None`] for L2 (the gradient is returned unchanged),
    /// and the decoupled variants, which multiply by exactly 1.
    pub fn from_flags(weight_decay: f64, weight_decouple: bool, absolute: bool) -> Self {
        match (weight_decouple, absolute) {
            (true, true) => Self::DecoupledAbsolute(weight_decay),
            (true, false) => Self::Decoupled(weight_decay),
            (false, _) if weight_decay == 0.0 => Self::None,
            (false, _) => Self::L2(weight_decay),
        }
    }

    /// The coefficient λ (0 for [`WeightDecay::None`]).
    pub fn coefficient(&self) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::L2(w) | Self::Decoupled(w) | Self::DecoupledAbsolute(w) => w,
        }
    }
}

/// How a 16-bit parameter (bfloat16, float16) is rounded when the update is stored.
///
/// `f32` and `f64` parameters always round to nearest: the modes exist for storage types too
/// narrow to hold small updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Rounding {
    /// Round to nearest, ties to even (the default).
    #[default]
    Nearest,
    /// Round up or down at random, with the probability that makes the rounding unbiased; the
    /// random bits are a hash of the tensor's seed, the step and the element index, so results
    /// are reproducible.
    Stochastic,
    /// Round to nearest and keep the rounding error in a compensation buffer, added back on the
    /// next update (Kahan summation).
    Kahan,
}

/// The hyper-parameters of one Adam step; `Default` gives the spec's defaults.
///
/// ```
/// use rustadam::{AdamConfig, WeightDecay};
/// let cfg = AdamConfig::default().lr(3e-4).weight_decay(WeightDecay::Decoupled(0.01));
/// assert_eq!(cfg.eps, 1e-16);
/// assert!(cfg.optimized_update);
/// cfg.validate().unwrap();
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
// A field left out of a serialized config takes its default.
#[cfg_attr(feature = "serde", serde(default))]
pub struct AdamConfig {
    /// Learning rate α (default 1e-3).
    pub lr: f64,
    /// β1, the decay of the first moment (default 0.9).
    pub beta1: f64,
    /// β2, the decay of the second moment (default 0.999).
    pub beta2: f64,
    /// ε (default 1e-16); ε̂ when `optimized_update` is set.
    pub eps: f64,
    /// Weight decay (default none).
    pub weight_decay: WeightDecay,
    /// Fold the second-moment bias correction into the step size (default true).
    pub optimized_update: bool,
    /// Ascend instead of descend: the gradient is negated first (default false).
    pub maximize: bool,
    /// AMSGrad: the denominator uses the running maximum of v, kept in `max_exp_avg_sq`
    /// (default false).
    pub amsgrad: bool,
    /// How 16-bit parameters are rounded when stored (default [`Rounding::Nearest`]).
    pub rounding: Rounding,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-16,
            weight_decay: WeightDecay::None,
            optimized_update: true,
            maximize: false,
            amsgrad: false,
            rounding: Rounding::Nearest,
        }
    }
}

impl AdamConfig {
    /// Sets the learning rate α.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = lr;
        self
    }

    /// Sets (β1, β2).
    pub fn betas(mut self, beta1: f64, beta2: f64) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }

    /// Sets ε.
    pub fn eps(mut self, eps: f64) -> Self {
        self.eps = eps;
        self
    }

    /// Sets the weight decay.
    pub fn weight_decay(mut self, weight_decay: WeightDecay) -> Self {
        self.weight_decay = weight_decay;
        self
    }

    /// Chooses the bias-correction form (see the crate docs).
    pub fn optimized_update(mut self, optimized_update: bool) -> Self {
        self.optimized_update = optimized_update;
        self
    }

    /// Ascends the objective instead of descending it.
    pub fn maximize(mut self, maximize: bool) -> Self {
        self.maximize = maximize;
        self
    }

    /// Turns AMSGrad on or off (each tensor then needs a `max_exp_avg_sq` buffer).
    pub fn amsgrad(mut self, amsgrad: bool) -> Self {
        self.amsgrad = amsgrad;
        self
    }

    /// Chooses how 16-bit parameters are rounded ([`Rounding`]).
    pub fn rounding(mut self, rounding: Rounding) -> Self {
        self.rounding = rounding;
        self
    }

    /// Checks the ranges the spec gives: `lr ≥ 0`, `eps ≥ 0`, `0 ≤ β < 1`, `λ ≥ 0` (NaN fails).
    pub fn validate(&self) -> Result<(), AdamError> {
        if !non_negative(self.lr) {
            return Err(AdamError::InvalidLr(self.lr));
        }
        if !non_negative(self.eps) {
            return Err(AdamError::InvalidEps(self.eps));
        }
        for (index, value) in [self.beta1, self.beta2].into_iter().enumerate() {
            if !(0.0..1.0).contains(&value) {
                return Err(AdamError::InvalidBeta { index, value });
            }
        }
        let wd = self.weight_decay.coefficient();
        if !non_negative(wd) {
            return Err(AdamError::InvalidWeightDecay(wd));
        }
        Ok(())
    }
}

/// `x ≥ 0`, false for NaN.
fn non_negative(x: f64) -> bool {
    x.partial_cmp(&0.0).is_some_and(|o| o.is_ge())
}
