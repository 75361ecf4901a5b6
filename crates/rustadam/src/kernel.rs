//! The fused single-pass kernel and its SIMD variants.
//!
//! One pass per element reads θ, g, m, v once and writes θ, m, v once, with no temporaries.
//! Each SIMD variant compiles the same scalar code under other target features and lets the
//! compiler vectorise it. IEEE-754 rounds `+ − × ÷ √` and fused multiply-add exactly, and the
//! code never leaves the contraction of `a·b + c` to the compiler, so every level (and the
//! scalar tail inside each) gives bit-identical results.

use std::ops::{Add, Div, Mul, Sub};

use crate::config::{AdamConfig, WeightDecay};

/// A floating-point type the kernel computes in (`f32` or `f64`).
pub trait Real:
    Copy
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    /// Rounds an `f64` hyper-parameter to this type.
    fn from_f64(x: f64) -> Self;
    /// Square root, correctly rounded.
    fn sqrt(self) -> Self;
    /// `self · a + b` with one rounding.
    fn mul_add(self, a: Self, b: Self) -> Self;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// A storage type of parameters and states: loaded into [`Element::Compute`], computed on,
/// and rounded once when stored.
pub trait Element: Copy + Send + Sync + 'static {
    /// The type the arithmetic runs in.
    type Compute: Real;
    /// Widens a stored value.
    fn load(self) -> Self::Compute;
    /// Rounds a computed value to the storage type (to nearest, ties to even).
    fn store(x: Self::Compute) -> Self;
}

macro_rules! impl_native_element {
    ($t:ty) => {
        impl Element for $t {
            type Compute = $t;
            #[inline(always)]
            fn load(self) -> $t {
                self
            }
            #[inline(always)]
            fn store(x: $t) -> $t {
                x
            }
        }
    };
}
impl_native_element!(f32);
impl_native_element!(f64);

macro_rules! impl_half_element {
    ($t:ty, $load:path, $store:path) => {
        /// Computed in `f32`, rounded to nearest-even once when stored.
        impl Element for $t {
            type Compute = f32;
            #[inline(always)]
            fn load(self) -> f32 {
                $load(self)
            }
            #[inline(always)]
            fn store(x: f32) -> $t {
                $store(x)
            }
        }
    };
}
impl_half_element!(
    half::bf16,
    crate::halfprec::bf16_to_f32,
    crate::halfprec::f32_to_bf16
);
impl_half_element!(
    half::f16,
    crate::halfprec::f16_to_f32,
    crate::halfprec::f32_to_f16
);

/// The per-tensor scalars of one step, in `f64`, computed once from the config and the step count.
///
/// With `bc1 = 1 − β1^t` and `bc2 = 1 − β2^t`:
/// - optimized: `step_size = α·√bc2 / bc1`, denominator `√v + ε̂`;
/// - textbook: `step_size = α / bc1`, denominator `√v / √bc2 + ε`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScalars {
    /// β1.
    pub beta1: f64,
    /// 1 − β1.
    pub one_minus_beta1: f64,
    /// β2.
    pub beta2: f64,
    /// 1 − β2.
    pub one_minus_beta2: f64,
    /// The factor of `m / denominator` in the update.
    pub step_size: f64,
    /// ε (or ε̂), added to the denominator.
    pub eps: f64,
    /// √bc2, the divisor of √v in the textbook form (1 in the optimized form).
    pub sqrt_bc2: f64,
    /// The decoupled decay factor `1 − α·λ` or `1 − λ` (1 without decoupled decay).
    pub decay_factor: f64,
    /// The L2 coefficient λ (0 without L2 decay).
    pub l2: f64,
}

impl StepScalars {
    /// The scalars for update number `step` (≥ 1) under `cfg`.
    pub fn new(cfg: &AdamConfig, step: u64) -> Self {
        let t = step as f64;
        // powf, not powi: the same libm pow that Python's `beta ** t` uses.
        let bc1 = 1.0 - cfg.beta1.powf(t);
        let bc2 = 1.0 - cfg.beta2.powf(t);
        let (step_size, sqrt_bc2) = if cfg.optimized_update {
            (cfg.lr * bc2.sqrt() / bc1, 1.0)
        } else {
            (cfg.lr / bc1, bc2.sqrt())
        };
        let (decay_factor, l2) = match cfg.weight_decay {
            WeightDecay::None => (1.0, 0.0),
            WeightDecay::L2(w) => (1.0, w),
            WeightDecay::Decoupled(w) => (1.0 - cfg.lr * w, 0.0),
            WeightDecay::DecoupledAbsolute(w) => (1.0 - w, 0.0),
        };
        Self {
            beta1: cfg.beta1,
            one_minus_beta1: 1.0 - cfg.beta1,
            beta2: cfg.beta2,
            one_minus_beta2: 1.0 - cfg.beta2,
            step_size,
            eps: cfg.eps,
            sqrt_bc2,
            decay_factor,
            l2,
        }
    }
}

/// Which of the kernel's variants runs: fixed per call, so the inner loop has no branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mode {
    pub l2: bool,
    pub decoupled: bool,
    pub optimized: bool,
}

impl Mode {
    pub(crate) fn of(cfg: &AdamConfig) -> Self {
        Self {
            l2: matches!(cfg.weight_decay, WeightDecay::L2(_)),
            decoupled: matches!(
                cfg.weight_decay,
                WeightDecay::Decoupled(_) | WeightDecay::DecoupledAbsolute(_)
            ),
            optimized: cfg.optimized_update,
        }
    }
}

/// [`StepScalars`] rounded to the compute type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Coeffs<C> {
    b1: C,
    omb1: C,
    b2: C,
    omb2: C,
    step_size: C,
    eps: C,
    sqrt_bc2: C,
    decay: C,
    l2: C,
}

impl<C: Real> Coeffs<C> {
    pub(crate) fn new(s: &StepScalars) -> Self {
        Self {
            b1: C::from_f64(s.beta1),
            omb1: C::from_f64(s.one_minus_beta1),
            b2: C::from_f64(s.beta2),
            omb2: C::from_f64(s.one_minus_beta2),
            step_size: C::from_f64(s.step_size),
            eps: C::from_f64(s.eps),
            sqrt_bc2: C::from_f64(s.sqrt_bc2),
            decay: C::from_f64(s.decay_factor),
            l2: C::from_f64(s.l2),
        }
    }
}

/// The element-wise update, in the operation order of the reference torch ops
/// (`grad.add(param, alpha=λ)`, `m.mul_(β1).add_(g, alpha=1−β1)`,
/// `v.mul_(β2).addcmul_(g, g, value=1−β2)`, `param.addcdiv_(m, denom, value=−step_size)`).
#[inline(always)]
fn body<E: Element, const L2: bool, const DECOUPLED: bool, const OPTIMIZED: bool>(
    k: &Coeffs<E::Compute>,
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
) {
    let n = p.len();
    // Re-slicing to one length lets the compiler drop the bounds checks.
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let mut theta = p[i].load();
        let mut grad = g[i].load();
        if L2 {
            grad = theta.mul_add(k.l2, grad);
        }
        if DECOUPLED {
            theta = theta * k.decay;
        }
        let mi = grad.mul_add(k.omb1, m[i].load() * k.b1);
        let vi = (k.omb2 * grad).mul_add(grad, v[i].load() * k.b2);
        let denom = if OPTIMIZED {
            vi.sqrt() + k.eps
        } else {
            vi.sqrt() / k.sqrt_bc2 + k.eps
        };
        theta = theta - (k.step_size * mi) / denom;
        p[i] = E::store(theta);
        m[i] = E::store(mi);
        v[i] = E::store(vi);
    }
}

/// The roofline: the same loads and stores as [`body`] with trivial arithmetic (θ += g, m += g,
/// v += g), to measure what the memory system allows.
#[inline(always)]
fn roofline_body<E: Element>(p: &mut [E], g: &[E], m: &mut [E], v: &mut [E]) {
    let n = p.len();
    let (g, m, v) = (&g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = g[i].load();
        p[i] = E::store(p[i].load() + gi);
        m[i] = E::store(m[i].load() + gi);
        v[i] = E::store(v[i].load() + gi);
    }
}

/// Which loop a chunk runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    Adam(Mode),
    Roofline,
}

#[inline(always)]
fn dispatch_work<E: Element>(
    work: Work,
    k: &Coeffs<E::Compute>,
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
) {
    let Work::Adam(mode) = work else {
        return roofline_body(p, g, m, v);
    };
    match (mode.l2, mode.decoupled, mode.optimized) {
        (false, false, false) => body::<E, false, false, false>(k, p, g, m, v),
        (false, false, true) => body::<E, false, false, true>(k, p, g, m, v),
        (false, true, false) => body::<E, false, true, false>(k, p, g, m, v),
        (false, true, true) => body::<E, false, true, true>(k, p, g, m, v),
        (true, false, false) => body::<E, true, false, false>(k, p, g, m, v),
        (true, false, true) => body::<E, true, false, true>(k, p, g, m, v),
        // L2 and decoupled decay never come together; these arms only keep the match total.
        (true, true, false) => body::<E, true, true, false>(k, p, g, m, v),
        (true, true, true) => body::<E, true, true, true>(k, p, g, m, v),
    }
}

/// An instruction-set level of the kernel, chosen at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimdLevel {
    /// The target's baseline instructions (SSE2 on x86-64, NEON on aarch64).
    Portable,
    /// AVX2 with FMA (x86-64).
    Avx2,
    /// AVX-512F (x86-64).
    Avx512,
}

impl SimdLevel {
    /// The best level this CPU runs.
    pub fn detect() -> Self {
        Self::available()
            .into_iter()
            .last()
            .unwrap_or(Self::Portable)
    }

    /// Every level this CPU runs, from the slowest.
    pub fn available() -> Vec<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|l| l.is_available())
            .collect()
    }

    /// Whether this CPU runs the level.
    pub fn is_available(self) -> bool {
        match self {
            Self::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The level's name, as `RUSTADAM_SIMD` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Portable => "portable",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Parses a name given by [`SimdLevel::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Portable, Self::Avx2, Self::Avx512]
            .into_iter()
            .find(|l| l.name() == name)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<E: Element>(
    work: Work,
    k: &Coeffs<E::Compute>,
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
) {
    dispatch_work(work, k, p, g, m, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_avx512<E: Element>(
    work: Work,
    k: &Coeffs<E::Compute>,
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
) {
    dispatch_work(work, k, p, g, m, v)
}

/// Runs the kernel over one chunk at `level`, falling back to the portable code where the
/// level is not available, so no caller can reach an instruction the CPU lacks.
pub(crate) fn run<E: Element>(
    level: SimdLevel,
    work: Work,
    k: &Coeffs<E::Compute>,
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E],
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if level.is_available() => {
            // SAFETY: is_available() just confirmed avx512f, avx2 and fma on this CPU.
            unsafe { run_avx512(work, k, p, g, m, v) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if level.is_available() => {
            // SAFETY: is_available() just confirmed avx2 and fma on this CPU.
            unsafe { run_avx2(work, k, p, g, m, v) }
        }
        _ => dispatch_work(work, k, p, g, m, v),
    }
}
