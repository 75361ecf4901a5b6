//! The fused single-pass kernel and its SIMD variants.
//!
//! One pass per element reads θ, g, m, v once and writes θ, m, v once, with no temporaries.
//! Each SIMD variant compiles the same scalar code under other target features and lets the
//! compiler vectorise it. IEEE-754 rounds `+ − × ÷ √` and fused multiply-add exactly, and the
//! code never leaves the contraction of `a·b + c` to the compiler, so every level (and the
//! scalar tail inside each) gives bit-identical results.

use std::ops::{Add, Div, Mul, Sub};

use crate::config::{AdamConfig, Rounding, WeightDecay};

#[cfg(target_arch = "x86_64")]
mod f16x;

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
    /// The larger of the two, NaN if either is NaN (as `torch.maximum`).
    fn nan_max(self, other: Self) -> Self;
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
            #[inline(always)]
            fn nan_max(self, other: Self) -> Self {
                // Selects, not branches, so the loop vectorises; a NaN fails both comparisons.
                if self > other {
                    self
                } else if other >= self {
                    other
                } else {
                    self + other
                }
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
    /// Rounds stochastically with the random bits `r` (see [`Rounding`]);
    /// types whose [`Element::store`] is exact ignore `r`.
    #[inline(always)]
    fn store_stochastic(x: Self::Compute, r: u32) -> Self {
        let _ = r;
        Self::store(x)
    }
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
    ($t:ty, $load:path, $store:path, $stochastic:path) => {
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
            #[inline(always)]
            fn store_stochastic(x: f32, r: u32) -> $t {
                $stochastic(x, r)
            }
        }
    };
}
impl_half_element!(
    half::bf16,
    crate::halfprec::bf16_to_f32,
    crate::halfprec::f32_to_bf16,
    crate::halfprec::f32_to_bf16_stochastic
);
impl_half_element!(
    half::f16,
    crate::halfprec::f16_to_f32,
    crate::halfprec::f32_to_f16,
    crate::halfprec::f32_to_f16_stochastic
);

const M1: u32 = 0x7FEB_352D;
const M2: u32 = 0x2C1B_3C6D;

/// The integer hash of stochastic rounding (docs/NUMERICS.md), on wrapping `u32` arithmetic, so
/// every path (CPU, torch ops, GPU) draws the same bits.
#[inline(always)]
pub fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(M1);
    x ^= x >> 15;
    x = x.wrapping_mul(M2);
    x ^= x >> 16;
    x
}

/// The per-tensor, per-step key of stochastic rounding: a hash of the tensor's `seed` and the
/// update count `t` (both taken mod 2^32 where docs/NUMERICS.md says so).
pub fn stochastic_key(seed: u64, t: u64) -> u32 {
    mix(mix(mix(seed as u32) ^ (seed >> 32) as u32) ^ t as u32)
}

/// The random bits for element `index` (its flat index in the tensor, taken mod 2^32).
#[inline(always)]
pub fn stochastic_bits(key: u32, index: u64) -> u32 {
    mix(key ^ mix(index as u32))
}

/// Rounds `x` to bfloat16 stochastically with the random bits `r` (docs/NUMERICS.md).
pub fn round_bf16_stochastic(x: f32, r: u32) -> half::bf16 {
    crate::halfprec::f32_to_bf16_stochastic(x, r)
}

/// Rounds `x` to binary16 stochastically with the random bits `r` (docs/NUMERICS.md).
pub fn round_f16_stochastic(x: f32, r: u32) -> half::f16 {
    crate::halfprec::f32_to_f16_stochastic(x, r)
}

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
    /// The gradient's factor: −1 to maximize, else 1.
    pub grad_sign: f64,
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
            grad_sign: if cfg.maximize { -1.0 } else { 1.0 },
        }
    }
}

/// Weight decay as the kernel's const parameter `DECAY`.
pub(crate) const NO_DECAY: u8 = 0;
pub(crate) const L2_DECAY: u8 = 1;
pub(crate) const DECOUPLED_DECAY: u8 = 2;

/// Rounding as the kernel's const parameter `ROUND`.
pub(crate) const NEAREST: u8 = 0;
pub(crate) const STOCHASTIC: u8 = 1;
pub(crate) const KAHAN: u8 = 2;

/// Which of the kernel's variants runs: fixed per call, so the inner loop has no branches.
/// Maximize is not a variant: it multiplies the gradient by ±1, which is exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mode {
    pub decay: u8,
    pub optimized: bool,
    pub amsgrad: bool,
    pub rounding: Rounding,
}

impl Mode {
    pub(crate) fn of(cfg: &AdamConfig) -> Self {
        Self {
            decay: match cfg.weight_decay {
                WeightDecay::None => NO_DECAY,
                WeightDecay::L2(_) => L2_DECAY,
                WeightDecay::Decoupled(_) | WeightDecay::DecoupledAbsolute(_) => DECOUPLED_DECAY,
            },
            optimized: cfg.optimized_update,
            amsgrad: cfg.amsgrad,
            rounding: cfg.rounding,
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
    grad_sign: C,
    key: u32,
}

impl<C: Real> Coeffs<C> {
    /// The coefficients in the compute type; `key` seeds stochastic rounding.
    pub(crate) fn new(s: &StepScalars, key: u32) -> Self {
        Self {
            b1: C::from_f64(s.beta1),
            omb1: C::from_f64(s.one_minus_beta1),
            b2: C::from_f64(s.beta2),
            omb2: C::from_f64(s.one_minus_beta2),
            step_size: C::from_f64(s.step_size),
            eps: C::from_f64(s.eps),
            sqrt_bc2: C::from_f64(s.sqrt_bc2),
            decay: C::from_f64(s.decay_factor),
            // λ in the compute type, as every path takes it (torch's own bf16/f16
            // `grad.add(param, alpha=λ)` would round λ to 16 bits first, and its scalar tail
            // differs again, so the paths compute g + λ·θ themselves).
            l2: C::from_f64(s.l2),
            grad_sign: C::from_f64(s.grad_sign),
            key,
        }
    }
}

/// One chunk's buffers. `vmax` and `comp` are empty unless AMSGrad or Kahan rounding use
/// them; `offset` is the index of the chunk's first element in its tensor.
#[derive(Debug)]
pub(crate) struct Bufs<'a, E> {
    pub p: &'a mut [E],
    pub g: &'a [E],
    pub m: &'a mut [E],
    pub v: &'a mut [E],
    pub vmax: &'a mut [E],
    pub comp: &'a mut [E],
    pub offset: usize,
}

/// The element-wise update, in the operation order of the reference torch ops
/// (`grad.add(param, alpha=λ)`, `m.mul_(β1).add_(g, alpha=1−β1)`,
/// `v.mul_(β2).addcmul_(g, g, value=1−β2)`, `param.addcdiv_(m, denom, value=−step_size)`);
/// docs/NUMERICS.md gives each rounding.
#[inline(always)]
fn body<
    E: Element,
    const DECAY: u8,
    const OPTIMIZED: bool,
    const AMSGRAD: bool,
    const ROUND: u8,
>(
    k: &Coeffs<E::Compute>,
    b: &mut Bufs<'_, E>,
) {
    let n = b.p.len();
    // Re-slicing to one length lets the compiler drop the bounds checks.
    let (p, g, m, v) = (&mut *b.p, &b.g[..n], &mut b.m[..n], &mut b.v[..n]);
    let vmax: &mut [E] = if AMSGRAD { &mut b.vmax[..n] } else { &mut [] };
    let comp: &mut [E] = if ROUND == KAHAN {
        &mut b.comp[..n]
    } else {
        &mut []
    };
    // The hash takes the index mod 2^32.
    let first = b.offset as u32;
    for i in 0..n {
        let mut theta = p[i].load();
        let mut grad = g[i].load() * k.grad_sign;
        if DECAY == DECOUPLED_DECAY {
            // The decay is its own step, rounded to the storage type as `param.mul_` does.
            theta = E::store(theta * k.decay).load();
        }
        if DECAY == L2_DECAY {
            grad = E::store(theta.mul_add(k.l2, grad)).load();
        }
        let mi = grad.mul_add(k.omb1, m[i].load() * k.b1);
        let vi = (k.omb2 * grad).mul_add(grad, v[i].load() * k.b2);
        let vd = if AMSGRAD {
            let x = vmax[i].load().nan_max(vi);
            vmax[i] = E::store(x);
            x
        } else {
            vi
        };
        let denom = if OPTIMIZED {
            vd.sqrt() + k.eps
        } else {
            vd.sqrt() / k.sqrt_bc2 + k.eps
        };
        let u = (k.step_size * mi) / denom;
        p[i] = if ROUND == STOCHASTIC {
            let r = mix(k.key ^ mix(first.wrapping_add(i as u32)));
            E::store_stochastic(theta - u, r)
        } else if ROUND == KAHAN {
            let y = comp[i].load() - u;
            let stored = E::store(theta + y);
            comp[i] = E::store(y - (stored.load() - theta));
            stored
        } else {
            E::store(theta - u)
        };
        m[i] = E::store(mi);
        v[i] = E::store(vi);
    }
}

/// The roofline: the same loads and stores as [`body`] with trivial arithmetic (θ += g, m += g,
/// v += g), to measure what the memory system allows.
#[inline(always)]
fn roofline_body<E: Element>(b: &mut Bufs<'_, E>) {
    let n = b.p.len();
    let (p, g, m, v) = (&mut *b.p, &b.g[..n], &mut b.m[..n], &mut b.v[..n]);
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

impl Work {
    /// The rounding the kernel must be instantiated with (nearest for the roofline).
    pub(crate) fn rounding(self) -> Rounding {
        match self {
            Work::Adam(mode) => mode.rounding,
            Work::Roofline => Rounding::Nearest,
        }
    }
}

#[inline(always)]
fn dispatch_work<E: Element, const ROUND: u8>(
    work: Work,
    k: &Coeffs<E::Compute>,
    b: &mut Bufs<'_, E>,
) {
    let Work::Adam(mode) = work else {
        return roofline_body(b);
    };
    match mode.decay {
        L2_DECAY => dispatch_flags::<E, L2_DECAY, ROUND>(mode, k, b),
        DECOUPLED_DECAY => dispatch_flags::<E, DECOUPLED_DECAY, ROUND>(mode, k, b),
        _ => dispatch_flags::<E, NO_DECAY, ROUND>(mode, k, b),
    }
}

#[inline(always)]
fn dispatch_flags<E: Element, const DECAY: u8, const ROUND: u8>(
    mode: Mode,
    k: &Coeffs<E::Compute>,
    b: &mut Bufs<'_, E>,
) {
    match (mode.optimized, mode.amsgrad) {
        (false, false) => body::<E, DECAY, false, false, ROUND>(k, b),
        (false, true) => body::<E, DECAY, false, true, ROUND>(k, b),
        (true, false) => body::<E, DECAY, true, false, ROUND>(k, b),
        (true, true) => body::<E, DECAY, true, true, ROUND>(k, b),
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
fn run_avx2<E: Element, const ROUND: u8>(work: Work, k: &Coeffs<E::Compute>, b: &mut Bufs<'_, E>) {
    dispatch_work::<E, ROUND>(work, k, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn run_avx512<E: Element, const ROUND: u8>(
    work: Work,
    k: &Coeffs<E::Compute>,
    b: &mut Bufs<'_, E>,
) {
    dispatch_work::<E, ROUND>(work, k, b)
}

/// Runs a float16 chunk rounded to nearest at `level`: with AVX-512, or AVX2 and F16C, on the
/// CPU's own conversions (the same bits as [`run`], about twice as fast), else as [`run`].
pub(crate) fn run_f16_nearest(
    level: SimdLevel,
    work: Work,
    k: &Coeffs<f32>,
    b: &mut Bufs<'_, half::f16>,
) {
    #[cfg(target_arch = "x86_64")]
    match level {
        SimdLevel::Avx512 if level.is_available() => {
            // SAFETY: is_available() just confirmed avx512f on this CPU.
            return unsafe { f16x::avx512::run(work, k, b) };
        }
        SimdLevel::Avx2 if level.is_available() && is_x86_feature_detected!("f16c") => {
            // SAFETY: avx2 and fma (is_available()) and f16c were just confirmed on this CPU.
            return unsafe { f16x::avx2::run(work, k, b) };
        }
        _ => {}
    }
    run::<half::f16, NEAREST>(level, work, k, b)
}

/// Runs the kernel over one chunk at `level`, falling back to the portable code where the
/// level is not available, so no caller can reach an instruction the CPU lacks.
///
/// `ROUND` is a parameter of this function, not read from `work`, so that the caller
/// instantiates only the roundings its element type has (f32 and f64 always round to nearest).
pub(crate) fn run<E: Element, const ROUND: u8>(
    level: SimdLevel,
    work: Work,
    k: &Coeffs<E::Compute>,
    b: &mut Bufs<'_, E>,
) {
    match level {
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx512 if level.is_available() => {
            // SAFETY: is_available() just confirmed avx512f, avx2 and fma on this CPU.
            unsafe { run_avx512::<E, ROUND>(work, k, b) }
        }
        #[cfg(target_arch = "x86_64")]
        SimdLevel::Avx2 if level.is_available() => {
            // SAFETY: is_available() just confirmed avx2 and fma on this CPU.
            unsafe { run_avx2::<E, ROUND>(work, k, b) }
        }
        _ => dispatch_work::<E, ROUND>(work, k, b),
    }
}
