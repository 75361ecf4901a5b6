//! The options beyond the reference (maximize, AMSGrad, stochastic and Kahan rounding, the
//! 16-bit weight-decay rounding) against independent scalar transcriptions of docs/NUMERICS.md, and
//! the checks around them (buffers, thread pools).

use rustadam::kernel::stochastic_key;
use rustadam::kernel::{mix, round_bf16_stochastic, round_f16_stochastic, stochastic_bits};
use rustadam::{
    bf16, f16, step_tensors, Adam, AdamConfig, AdamError, AdamState, AnyTensor, ExecOptions,
    ForkJoin, Rounding, SimdLevel, StepScalars, TensorRefs, WeightDecay,
};

/// xorshift, uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn configs() -> Vec<AdamConfig> {
    let mut out = Vec::new();
    for optimized in [true, false] {
        for wd in [
            WeightDecay::None,
            WeightDecay::L2(0.1),
            WeightDecay::Decoupled(0.1),
            WeightDecay::DecoupledAbsolute(0.01),
        ] {
            for (maximize, amsgrad) in [(false, false), (true, false), (false, true), (true, true)]
            {
                out.push(
                    AdamConfig::default()
                        .lr(1e-2)
                        .betas(0.8, 0.99)
                        .eps(1e-8)
                        .weight_decay(wd)
                        .optimized_update(optimized)
                        .maximize(maximize)
                        .amsgrad(amsgrad),
                );
            }
        }
    }
    out
}

fn opts(threads: usize, simd: Option<SimdLevel>, chunk_len: usize) -> ExecOptions {
    ExecOptions {
        num_threads: threads,
        simd,
        chunk_len,
        fork_join: None,
    }
}

// ---------------------------------------------------------------------------------------------
// maximize and AMSGrad in float64, against the formulas written out in plain f64.

/// One update of docs/NUMERICS.md in f64, with torch.optim.Adam's maximize and AMSGrad.
#[allow(clippy::too_many_arguments)]
fn oracle_f64(
    cfg: &AdamConfig,
    t: u64,
    p: &mut [f64],
    g: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    vmax: &mut [f64],
) {
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let bc1 = 1.0 - b1.powf(t as f64);
    let bc2 = 1.0 - b2.powf(t as f64);
    for i in 0..p.len() {
        let mut grad = if cfg.maximize { -g[i] } else { g[i] };
        match cfg.weight_decay {
            WeightDecay::None => {}
            WeightDecay::L2(w) => grad += w * p[i],
            WeightDecay::Decoupled(w) => p[i] *= 1.0 - cfg.lr * w,
            WeightDecay::DecoupledAbsolute(w) => p[i] *= 1.0 - w,
        }
        m[i] = b1 * m[i] + (1.0 - b1) * grad;
        v[i] = b2 * v[i] + (1.0 - b2) * grad * grad;
        let vd = if cfg.amsgrad {
            vmax[i] = vmax[i].max(v[i]);
            vmax[i]
        } else {
            v[i]
        };
        if cfg.optimized_update {
            p[i] -= cfg.lr * bc2.sqrt() / bc1 * m[i] / (vd.sqrt() + cfg.eps);
        } else {
            p[i] -= cfg.lr / bc1 * m[i] / (vd.sqrt() / bc2.sqrt() + cfg.eps);
        }
    }
}

#[test]
fn maximize_and_amsgrad_match_float64_oracle() {
    let mut rng = Rng(5);
    let n = 3001;
    for cfg in configs() {
        let p0 = rng.vec(n);
        // Shrinking gradients, so that v falls and the AMSGrad maximum matters.
        let grads: Vec<Vec<f64>> = (0..20)
            .map(|t| rng.vec(n).iter().map(|x| x / (1 + t) as f64).collect())
            .collect();
        let (mut p, mut m, mut v, mut vm) = (p0.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        let (mut rp, mut rm, mut rv, mut rvm) =
            (p0.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n]);
        for t in 1..=20u64 {
            let g = &grads[(t - 1) as usize];
            let refs = TensorRefs::new(&mut p, g, &mut m, &mut v, t).with_max_exp_avg_sq(&mut vm);
            step_tensors(&cfg, &mut [AnyTensor::from(refs)], &opts(2, None, 256)).unwrap();
            oracle_f64(&cfg, t, &mut rp, g, &mut rm, &mut rv, &mut rvm);
        }
        for i in 0..n {
            let tol = 1e-13 * (1.0 + rp[i].abs());
            assert!(
                (p[i] - rp[i]).abs() <= tol,
                "i={i}: {} vs {} ({cfg:?})",
                p[i],
                rp[i]
            );
            assert!((m[i] - rm[i]).abs() <= 1e-15 * (1.0 + rm[i].abs()));
            assert!((v[i] - rv[i]).abs() <= 1e-15 * (1.0 + rv[i].abs()));
            if cfg.amsgrad {
                assert!((vm[i] - rvm[i]).abs() <= 1e-15 * (1.0 + rvm[i].abs()));
            } else {
                assert_eq!(vm[i], 0.0, "max_exp_avg_sq untouched without amsgrad");
            }
        }
    }
}

#[test]
fn maximize_ascends_and_mirrors_minimize() {
    // Maximizing with gradient g is minimizing with −g, bit for bit.
    let mut rng = Rng(8);
    for cfg in configs() {
        let n = 999;
        let p0: Vec<f32> = rng.vec(n).iter().map(|&x| x as f32).collect();
        let g: Vec<f32> = rng.vec(n).iter().map(|&x| x as f32).collect();
        let neg: Vec<f32> = g.iter().map(|x| -x).collect();
        let run = |cfg: &AdamConfig, g: &[f32]| {
            let (mut p, mut m, mut v, mut vm) =
                (p0.clone(), vec![0.0; n], vec![0.0; n], vec![0.0; n]);
            for t in 1..=3 {
                let r = TensorRefs::new(&mut p, g, &mut m, &mut v, t).with_max_exp_avg_sq(&mut vm);
                step_tensors(cfg, &mut [AnyTensor::from(r)], &opts(1, None, 128)).unwrap();
            }
            (p, m)
        };
        let (pa, ma) = run(&cfg.maximize(true), &g);
        let (pb, mb) = run(&cfg.maximize(false), &neg);
        assert_eq!(pa, pb, "{cfg:?}");
        assert_eq!(ma, mb);
    }
}

#[test]
fn amsgrad_max_propagates_nan() {
    let cfg = AdamConfig::default().amsgrad(true);
    let (mut p, g, mut m, mut v) = (
        vec![1.0f32; 3],
        vec![0.5f32; 3],
        vec![0.0f32; 3],
        vec![0.0f32; 3],
    );
    let mut vm = vec![f32::NAN, 0.0, 1e30];
    let r = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1).with_max_exp_avg_sq(&mut vm);
    step_tensors(&cfg, &mut [AnyTensor::from(r)], &opts(1, None, 8)).unwrap();
    assert!(vm[0].is_nan() && p[0].is_nan(), "NaN maximum propagates");
    assert_eq!(vm[1], v[1], "the maximum takes v");
    assert_eq!(vm[2], 1e30, "the maximum keeps the larger old value");
    assert_eq!(p[2], 1.0, "a huge maximum gives a step far below an ulp");
}

// ---------------------------------------------------------------------------------------------
// 16-bit tensors: an exact scalar transcription of docs/NUMERICS.md, with the `half` crate's
// conversions and a stochastic rounding written from the spec, not the crate's code.

trait Half: Copy + PartialEq + std::fmt::Debug
where
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, Self>>,
{
    fn to32(self) -> f32;
    fn from32(x: f32) -> Self;
    /// docs/NUMERICS.md's stochastic rounding.
    fn sround(x: f32, r: u32) -> Self;
}

/// docs/NUMERICS.md's hash, written again here.
fn spec_mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7FEB352D);
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B3C6D);
    x ^= x >> 16;
    x
}

fn spec_r(seed: u64, t: u64, i: u64) -> u32 {
    let key = spec_mix(spec_mix(spec_mix(seed as u32) ^ (seed >> 32) as u32) ^ t as u32);
    spec_mix(key ^ spec_mix(i as u32))
}

impl Half for bf16 {
    fn to32(self) -> f32 {
        self.to_f32()
    }
    fn from32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn sround(x: f32, r: u32) -> Self {
        if !x.is_finite() {
            return bf16::from_f32(x);
        }
        let b2 = (x.abs().to_bits() + (r & 0xFFFF)) & 0xFFFF_0000;
        let y = bf16::from_bits((b2 >> 16) as u16);
        if x.is_sign_negative() {
            -y
        } else {
            y
        }
    }
}

impl Half for f16 {
    fn to32(self) -> f32 {
        self.to_f32()
    }
    fn from32(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn sround(x: f32, r: u32) -> Self {
        if !x.is_finite() {
            return f16::from_f32(x);
        }
        let a = x.abs();
        let y = if a >= 2f32.powi(-14) {
            f16::from_f32(f32::from_bits((a.to_bits() + (r & 0x1FFF)) & !0x1FFF))
        } else {
            let s = a * 2f32.powi(24);
            let n = s.floor();
            let up = ((r & 0xFFFF) as f32) < (s - n) * 65536.0;
            f16::from_f32((n + if up { 1.0 } else { 0.0 }) * 2f32.powi(-24))
        };
        if x.is_sign_negative() {
            -y
        } else {
            y
        }
    }
}

/// The 16-bit buffers of one tensor.
#[derive(Clone, PartialEq, Debug)]
struct HalfBufs<H> {
    p: Vec<H>,
    m: Vec<H>,
    v: Vec<H>,
    vmax: Vec<H>,
    comp: Vec<H>,
}

/// docs/NUMERICS.md for one 16-bit tensor, element by element.
#[allow(clippy::needless_range_loop)] // five buffers, one index
fn reference_half<H: Half>(cfg: &AdamConfig, t: u64, seed: u64, b: &mut HalfBufs<H>, g: &[H])
where
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, H>>,
{
    let s = StepScalars::new(cfg, t);
    let k = |x: f64| x as f32;
    let round = |x: f32| H::from32(x).to32();
    for i in 0..b.p.len() {
        let mut grad = g[i].to32();
        if cfg.maximize {
            grad = -grad;
        }
        let mut theta = b.p[i].to32();
        match cfg.weight_decay {
            WeightDecay::Decoupled(_) | WeightDecay::DecoupledAbsolute(_) => {
                theta = round(theta * k(s.decay_factor))
            }
            // g + λ·θ with one rounding (λ in the compute type), then rounded to the dtype.
            WeightDecay::L2(_) => grad = round(theta.mul_add(k(s.l2), grad)),
            WeightDecay::None => {}
        }
        let m = grad.mul_add(k(s.one_minus_beta1), b.m[i].to32() * k(s.beta1));
        let v = (k(s.one_minus_beta2) * grad).mul_add(grad, b.v[i].to32() * k(s.beta2));
        let vd = if cfg.amsgrad {
            let x = if b.vmax[i].to32().is_nan() || v.is_nan() {
                f32::NAN
            } else {
                b.vmax[i].to32().max(v)
            };
            b.vmax[i] = H::from32(x);
            x
        } else {
            v
        };
        let denom = if cfg.optimized_update {
            vd.sqrt() + k(s.eps)
        } else {
            vd.sqrt() / k(s.sqrt_bc2) + k(s.eps)
        };
        let u = (k(s.step_size) * m) / denom;
        b.p[i] = match cfg.rounding {
            Rounding::Nearest => H::from32(theta - u),
            Rounding::Stochastic => H::sround(theta - u, spec_r(seed, t, i as u64)),
            Rounding::Kahan => {
                let y = b.comp[i].to32() - u;
                let p = H::from32(theta + y);
                b.comp[i] = H::from32(y - (p.to32() - theta));
                p
            }
        };
        b.m[i] = H::from32(m);
        b.v[i] = H::from32(v);
    }
}

fn half_bufs<H: Half>(rng: &mut Rng, n: usize) -> (HalfBufs<H>, Vec<Vec<H>>)
where
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, H>>,
{
    let mk = |rng: &mut Rng, scale: f64| -> Vec<H> {
        rng.vec(n)
            .iter()
            .map(|&x| H::from32((x * scale) as f32))
            .collect()
    };
    let p = mk(rng, 2.0);
    let zero = vec![H::from32(0.0); n];
    let grads = (0..4).map(|_| mk(rng, 1.0)).collect();
    let b = HalfBufs {
        p,
        m: zero.clone(),
        v: zero.clone(),
        vmax: zero.clone(),
        comp: zero,
    };
    (b, grads)
}

fn half_step<H: Half>(cfg: &AdamConfig, o: &ExecOptions, t: u64, b: &mut HalfBufs<H>, g: &[H])
where
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, H>>,
{
    let refs = TensorRefs::new(&mut b.p, g, &mut b.m, &mut b.v, t)
        .with_max_exp_avg_sq(&mut b.vmax)
        .with_compensation(&mut b.comp)
        .with_seed(0x1234_5678_9abc_def0);
    step_tensors(cfg, &mut [AnyTensor::from(refs)], o).unwrap();
}

/// Every mode, four updates, bit for bit against the reference, at every SIMD level, thread
/// count and chunk length (chunks that are not a multiple of the vector width included).
fn half_matches_numerics<H: Half>()
where
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, H>>,
{
    let mut rng = Rng(21);
    let n = 40_000; // over the crate's threshold for going parallel
    for rounding in [Rounding::Nearest, Rounding::Stochastic, Rounding::Kahan] {
        for cfg in configs() {
            let cfg = cfg.rounding(rounding).lr(3e-3);
            let (b0, grads) = half_bufs::<H>(&mut rng, n);
            let mut expected = b0.clone();
            for (t, g) in (1..).zip(&grads) {
                reference_half(&cfg, t, 0x1234_5678_9abc_def0, &mut expected, g);
            }
            for level in SimdLevel::available() {
                for (threads, chunk_len) in [(1, 1 << 16), (2, 999), (3, 4096)] {
                    let mut b = b0.clone();
                    for (t, g) in (1..).zip(&grads) {
                        half_step(&cfg, &opts(threads, Some(level), chunk_len), t, &mut b, g);
                    }
                    assert!(
                        b == expected,
                        "{level:?}, {threads} threads, chunk {chunk_len}: {cfg:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16_every_mode_matches_numerics() {
    half_matches_numerics::<bf16>();
}

#[test]
fn f16_every_mode_matches_numerics() {
    half_matches_numerics::<f16>();
}

/// f32 and f64 ignore the rounding mode (and need no compensation buffer).
#[test]
fn wide_types_round_to_nearest_in_every_mode() {
    let mut rng = Rng(4);
    let n = 5000;
    let p0: Vec<f32> = rng.vec(n).iter().map(|&x| x as f32).collect();
    let g: Vec<f32> = rng.vec(n).iter().map(|&x| x as f32).collect();
    let mut results = Vec::new();
    for rounding in [Rounding::Nearest, Rounding::Stochastic, Rounding::Kahan] {
        let cfg = AdamConfig::default().rounding(rounding);
        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
        let refs = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1).with_seed(99);
        step_tensors(&cfg, &mut [AnyTensor::from(refs)], &opts(2, None, 512)).unwrap();
        results.push(p);
    }
    assert!(results[0] == results[1] && results[0] == results[2]);
}

// ---------------------------------------------------------------------------------------------
// The hash and stochastic rounding.

/// Golden values, printed by (Python 3):
///
/// ```text
/// M=0xFFFFFFFF
/// def mix(x): x^=x>>16; x=(x*0x7FEB352D)&M; x^=x>>15; x=(x*0x2C1B3C6D)&M; x^=x>>16; return x
/// def key(s,t): return mix(mix(mix(s&M)^(s>>32&M))^(t&M))
/// def r(k,i): return mix(k^mix(i&M))
/// print([hex(mix(x)) for x in (0,1,2,0xdeadbeef,0xffffffff)])
/// print(hex(key(0,1)), hex(key(42,7)), hex(key(0x123456789abcdef0,3)), hex(key(5,2**32+9)))
/// k=key(42,7); print([hex(r(k,i)) for i in (0,1,1000,2**32+1000)])
/// ```
#[test]
fn hash_golden_values() {
    let mixes = [0, 1, 2, 0xdead_beef, 0xffff_ffff].map(mix);
    assert_eq!(mixes, [0x0, 0x477107ae, 0x8ee20f5c, 0xac9ce3d1, 0x073e9890]);
    assert_eq!(stochastic_key(0, 1), 0x477107ae);
    assert_eq!(stochastic_key(42, 7), 0xe9a18075);
    assert_eq!(stochastic_key(0x1234_5678_9abc_def0, 3), 0x3270abea);
    assert_eq!(stochastic_key(5, (1 << 32) + 9), 0x866a7270);
    let k = stochastic_key(42, 7);
    let r = [0, 1, 1000, (1 << 32) + 1000].map(|i| stochastic_bits(k, i));
    assert_eq!(r, [0xd2735eef, 0xbc0fae52, 0x132926b5, 0x132926b5]);
}

/// Golden roundings (x, r, bf16 bits, f16 bits), printed by the spec's formulas in Python with
/// numpy (`/tmp`-style throw-away script):
///
/// ```text
/// def bf(x, r): a=abs(x); b=bits(a); b2=(b+(r&0xFFFF))&0xFFFF0000; return (b2>>16)|sign
/// def hf(x, r): a>=2**-14: y=fl((bits(a)+(r&0x1FFF))&~0x1FFF); return f16(y)|sign
///               else: s=f32(a)*2**24; n=floor(s); f=s-n; up=float(r&0xFFFF)<f*65536.0;
///                     return f16((n+up)*2**-24)|sign
/// ```
#[test]
fn stochastic_rounding_golden_values() {
    // The x are f32 values, written as the f64 literals Python printed.
    let cases: [(f64, u32, u16, u16); 9] = [
        (1.001953125, 0x0, 0x3f80, 0x3c02),
        (1.001953125, 0x3fff, 0x3f80, 0x3c02),
        (1.001953125, 0x4000, 0x3f80, 0x3c02),
        (-1.001953125, 0xc000, 0xbf81, 0xbc02),
        (3.000000106112566e-06, 0x1234, 0x3649, 0x0033),
        (3.000000106112566e-06, 0xffff, 0x364a, 0x0032),
        (1.500000053056283e-07, 0x8000, 0x3421, 0x0003),
        (65519.0, 0x1fff, 0x4780, 0x7c00),
        (0.10000000149011612, 0xabcdef01, 0x3dcd, 0x2e66),
    ];
    for (x, r, b, h) in cases {
        let x = x as f32;
        assert_eq!(
            round_bf16_stochastic(x, r).to_bits(),
            b,
            "bf16 {x:e} {r:#x}"
        );
        assert_eq!(round_f16_stochastic(x, r).to_bits(), h, "f16 {x:e} {r:#x}");
    }
    // Non-finite values round to nearest.
    assert!(round_bf16_stochastic(f32::NAN, 7).is_nan());
    assert_eq!(
        round_f16_stochastic(f32::NEG_INFINITY, 7),
        f16::NEG_INFINITY
    );
}

/// The crate's stochastic rounding equals the spec transcription for every r pattern over
/// many x, and always gives one of the two neighbours.
#[test]
fn stochastic_rounding_gives_a_neighbour_and_matches_spec() {
    let mut rng = Rng(77);
    for j in 0..200_000u32 {
        let e = (rng.next() * 30.0) as i32; // magnitudes 2^-30 .. 2^30, f16 subnormals included
        let x = (rng.next() * 2f64.powi(e)) as f32;
        let r = spec_mix(j);
        let (b, h) = (round_bf16_stochastic(x, r), round_f16_stochastic(x, r));
        assert_eq!(b, <bf16 as Half>::sround(x, r), "{x:e}");
        assert_eq!(h.to_bits(), <f16 as Half>::sround(x, r).to_bits(), "{x:e}");
        for (y, down, up) in [
            (b.to_f32(), bf16_down(x), bf16_up(x)),
            (h.to_f32(), f16_down(x), f16_up(x)),
        ] {
            assert!(
                y == down || y == up,
                "{x:e} → {y:e}, not in [{down:e}, {up:e}]"
            );
        }
    }
}

/// The 16-bit neighbours of x, towards zero and away from it.
fn bf16_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() & 0xFFFF_0000)
}
fn bf16_up(x: f32) -> f32 {
    let d = bf16_down(x);
    if d == x {
        x
    } else {
        f32::from_bits(d.to_bits() + 0x1_0000)
    }
}
fn f16_down(x: f32) -> f32 {
    let h = f16::from_f32(x);
    if h.to_f32().abs() > x.abs() {
        f16::from_bits(h.to_bits() - 1).to_f32()
    } else {
        h.to_f32()
    }
}
fn f16_up(x: f32) -> f32 {
    let d = f16::from_f32(f16_down(x));
    if d.to_f32() == x {
        x
    } else {
        f16::from_bits(d.to_bits() + 1).to_f32()
    }
}

/// Unbiased: the mean of many roundings of a value between two neighbours is that value.
#[test]
fn stochastic_rounding_is_unbiased() {
    let key = stochastic_key(3, 1);
    let n = 1u64 << 18;
    for x in [
        1.0f32 + 0.3 * 2f32.powi(-7),
        -3.1,
        1.234e-6,
        7.77e-7,
        1000.3,
    ] {
        for (name, round, ulp) in [
            (
                "bf16",
                (|x, r| round_bf16_stochastic(x, r).to_f32()) as fn(f32, u32) -> f32,
                (bf16_up(x) - bf16_down(x)).abs() as f64,
            ),
            (
                "f16",
                |x, r| round_f16_stochastic(x, r).to_f32(),
                (f16_up(x) - f16_down(x)).abs() as f64,
            ),
        ] {
            let mean = (0..n)
                .map(|i| round(x, stochastic_bits(key, i)) as f64)
                .sum::<f64>()
                / n as f64;
            // A Bernoulli mean over n draws: standard deviation at most ulp / (2·√n).
            let tol = 5.0 * ulp / (2.0 * (n as f64).sqrt()) + 1e-3 * ulp;
            assert!(
                (mean - x as f64).abs() <= tol,
                "{name} {x:e}: mean {mean:e}, |diff| {:e} > {tol:e}",
                (mean - x as f64).abs()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Kahan and stochastic rounding against a float32 run.

/// With β = (0, 0) the moments are g and g², exact in bfloat16, so every update is exactly the
/// same f32 value u ≈ α in the f32 and the bf16 run: a long sum of updates far below a bfloat16
/// ulp. Round to nearest loses them all; Kahan tracks the f32 sum within an ulp, and stochastic
/// rounding does on average.
#[test]
fn kahan_and_stochastic_track_float32_in_bf16() {
    // Stochastic rounding is a random walk of standard deviation √(steps·α·ulp) ≈ 0.03 per
    // element; the mean of 1024 elements is within an ulp (≈ 4.5 standard deviations).
    let (n, steps) = (1024, 2000);
    let cfg = AdamConfig::default().lr(1e-4).betas(0.0, 0.0);
    let g32 = vec![0.5f32; n];
    let (mut p32, mut m32, mut v32) = (vec![1.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    for t in 1..=steps {
        let r = TensorRefs::new(&mut p32, &g32, &mut m32, &mut v32, t);
        step_tensors(&cfg, &mut [AnyTensor::from(r)], &opts(1, None, 16)).unwrap();
    }
    let target = p32[0]; // ≈ 1 − 0.2
    assert!((target - 0.8).abs() < 1e-3);
    let g = vec![bf16::from_f32(0.5); n];
    let mut out = Vec::new();
    for rounding in [Rounding::Nearest, Rounding::Kahan, Rounding::Stochastic] {
        let z = vec![bf16::ZERO; n];
        let (mut p, mut m, mut v, mut c) = (vec![bf16::ONE; n], z.clone(), z.clone(), z);
        for t in 1..=steps {
            let r = TensorRefs::new(&mut p, &g, &mut m, &mut v, t)
                .with_compensation(&mut c)
                .with_seed(11);
            step_tensors(
                &cfg.rounding(rounding),
                &mut [AnyTensor::from(r)],
                &opts(1, None, 16),
            )
            .unwrap();
        }
        out.push(p);
    }
    let ulp = 2f32.powi(-8); // bf16 spacing in [0.5, 1)
    assert!(
        out[0].iter().all(|&x| x == bf16::ONE),
        "nearest loses every update"
    );
    assert!(
        out[1].iter().all(|x| (x.to_f32() - target).abs() <= ulp),
        "kahan: {} vs {target}",
        out[1][0]
    );
    let mean = out[2].iter().map(|x| x.to_f32()).sum::<f32>() / n as f32;
    assert!(
        (mean - target).abs() <= ulp,
        "stochastic: mean {mean} vs {target}"
    );
}

// ---------------------------------------------------------------------------------------------
// Buffers, errors and threads.

#[test]
fn missing_or_short_buffers_are_refused_before_writing() {
    let n = 4;
    let (mut p, g, mut m, mut v) = (
        vec![1.0f32; n],
        vec![1.0f32; n],
        vec![0.0f32; n],
        vec![0.0f32; n],
    );
    let (mut hp, hg, mut hm, mut hv) = (
        vec![bf16::ONE; n],
        vec![bf16::ONE; n],
        vec![bf16::ZERO; n],
        vec![bf16::ZERO; n],
    );
    let o = opts(1, None, 2);

    // AMSGrad needs the maximum; the first tensor is fine and must not be stepped either.
    let mut vm_ok = vec![0.0f32; n];
    let err = step_tensors(
        &AdamConfig::default().amsgrad(true),
        &mut [
            AnyTensor::from(
                TensorRefs::new(&mut p, &g, &mut m, &mut v, 1).with_max_exp_avg_sq(&mut vm_ok),
            ),
            AnyTensor::from(TensorRefs::new(&mut hp, &hg, &mut hm, &mut hv, 1)),
        ],
        &o,
    )
    .unwrap_err();
    assert_eq!(
        err,
        AdamError::MissingBuffer {
            tensor: 1,
            buffer: "max_exp_avg_sq",
            needed_by: "amsgrad"
        }
    );
    assert_eq!(
        err.to_string(),
        "tensor 1: amsgrad needs a max_exp_avg_sq buffer"
    );
    assert_eq!(p, vec![1.0; n]);

    // Kahan needs a compensation buffer for 16-bit tensors only.
    let kahan = AdamConfig::default().rounding(Rounding::Kahan);
    let err = step_tensors(
        &kahan,
        &mut [AnyTensor::from(TensorRefs::new(
            &mut hp, &hg, &mut hm, &mut hv, 1,
        ))],
        &o,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        AdamError::MissingBuffer {
            tensor: 0,
            buffer: "compensation",
            ..
        }
    ));
    assert_eq!(hp, vec![bf16::ONE; n]);

    // A short buffer is an error, whether used or not.
    let mut short = vec![bf16::ZERO; n - 1];
    let err = step_tensors(
        &kahan,
        &mut [AnyTensor::from(
            TensorRefs::new(&mut hp, &hg, &mut hm, &mut hv, 1).with_compensation(&mut short),
        )],
        &o,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor 0: compensation has 3 elements but the parameter has 4"
    );
    let mut short32 = vec![0.0f32; n + 1];
    let err = step_tensors(
        &AdamConfig::default(),
        &mut [AnyTensor::from(
            TensorRefs::new(&mut p, &g, &mut m, &mut v, 1).with_max_exp_avg_sq(&mut short32),
        )],
        &o,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        AdamError::LengthMismatch {
            buffer: "max_exp_avg_sq",
            got: 5,
            ..
        }
    ));
    assert_eq!((&hp, &p), (&vec![bf16::ONE; n], &vec![1.0; n]));

    // f32 with Kahan needs nothing more.
    step_tensors(
        &kahan,
        &mut [AnyTensor::from(TensorRefs::new(
            &mut p, &g, &mut m, &mut v, 1,
        ))],
        &o,
    )
    .unwrap();
    assert!(p[0] < 1.0);
}

#[test]
fn adam_state_creates_the_buffers_it_needs() {
    let adam = Adam::new(
        AdamConfig::default()
            .amsgrad(true)
            .rounding(Rounding::Kahan),
    )
    .unwrap();
    let mut p = vec![bf16::ONE; 3];
    let mut s = AdamState::new(3).with_seed(5);
    adam.step(&mut p, &[bf16::ONE; 3], &mut s).unwrap();
    assert_eq!(s.max_exp_avg_sq.as_ref().map(Vec::len), Some(3));
    assert_eq!(s.compensation.as_ref().map(Vec::len), Some(3));
    assert_eq!(s.max_exp_avg_sq.as_ref().unwrap(), &s.exp_avg_sq);

    // f32 needs no compensation; and on an error nothing is created.
    let mut p32 = vec![1.0f32; 3];
    let mut s32 = AdamState::new(3);
    adam.step(&mut p32, &[1.0; 3], &mut s32).unwrap();
    assert!(s32.max_exp_avg_sq.is_some() && s32.compensation.is_none());
    let mut bad = AdamState::<f32>::new(2);
    assert!(adam.step(&mut p32, &[1.0; 3], &mut bad).is_err());
    assert!(bad.max_exp_avg_sq.is_none() && bad.step == 0);

    // The same updates as step_tensors with explicit buffers.
    let adam = Adam::new(AdamConfig::default().rounding(Rounding::Stochastic)).unwrap();
    let (mut a, mut b) = (
        vec![bf16::from_f32(0.3); 100],
        vec![bf16::from_f32(0.3); 100],
    );
    let g = vec![bf16::from_f32(0.01); 100];
    let mut s = AdamState::new(100).with_seed(77);
    let (mut m, mut v) = (vec![bf16::ZERO; 100], vec![bf16::ZERO; 100]);
    for t in 1..=3 {
        adam.step(&mut a, &g, &mut s).unwrap();
        let r = TensorRefs::new(&mut b, &g, &mut m, &mut v, t).with_seed(77);
        step_tensors(
            adam.config(),
            &mut [AnyTensor::from(r)],
            &ExecOptions::default(),
        )
        .unwrap();
    }
    assert_eq!(a, b);
}

/// Host pools that break the ForkJoin contract.
fn never_runs(_n: usize, _task: &(dyn Fn() + Sync)) {}
fn runs_once(_n: usize, task: &(dyn Fn() + Sync)) {
    task();
}

#[test]
fn a_fork_join_that_runs_nothing_is_an_error() {
    let n = 1 << 17;
    let run = |fj: ForkJoin| {
        let (mut p, g, mut m, mut v) = (
            vec![1.0f32; n],
            vec![0.5f32; n],
            vec![0.0f32; n],
            vec![0.0f32; n],
        );
        let o = ExecOptions {
            num_threads: 4,
            simd: None,
            chunk_len: 1024,
            fork_join: Some(fj),
        };
        let r = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1);
        step_tensors(&AdamConfig::default(), &mut [AnyTensor::from(r)], &o).map(|()| p)
    };
    let err = run(never_runs).unwrap_err();
    assert_eq!(err, AdamError::Incomplete { done: 0, parts: 4 });
    // No part ran, so nothing was written: the message says so rather than "partly updated".
    assert!(err.to_string().ends_with("nothing was written"), "{err}");
    let some = AdamError::Incomplete { done: 1, parts: 4 }.to_string();
    assert!(
        some.contains("1 of 4") && some.ends_with("partly updated"),
        "{some}"
    );
    // One call with four threads asked for takes all the parts: complete, and right.
    let p = run(runs_once).unwrap();
    assert!(p.iter().all(|&x| x == p[0] && x < 1.0));
}

#[test]
fn thread_counts_are_bounded() {
    let (mut p, g, mut m, mut v) = (
        vec![1.0f32; 2],
        vec![0.5f32; 2],
        vec![0.0f32; 2],
        vec![0.0f32; 2],
    );
    for (threads, ok) in [
        (0, true),
        (1, true),
        (rustadam::max_threads(), true),
        (rustadam::max_threads() + 1, false),
        (usize::MAX, false),
    ] {
        let o = ExecOptions {
            num_threads: threads,
            ..ExecOptions::default()
        };
        let r = TensorRefs::new(&mut p, &g, &mut m, &mut v, 1);
        let res = step_tensors(&AdamConfig::default(), &mut [AnyTensor::from(r)], &o);
        assert_eq!(res.is_ok(), ok, "{threads}");
        if let Err(e) = res {
            assert_eq!(
                e,
                AdamError::TooManyThreads {
                    requested: threads,
                    max: rustadam::max_threads()
                }
            );
        }
    }
    assert!(rustadam::max_threads() >= 1024);
}
