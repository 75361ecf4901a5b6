//! The fused kernel against plain scalar references, and its invariance under threads, chunk
//! lengths and SIMD levels.

use rustadam::{
    step_tensors, AdamConfig, AnyTensor, ExecOptions, SimdLevel, StepScalars, TensorRefs,
    WeightDecay,
};

/// A small deterministic generator (xorshift), so the tests need no dependency.
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

/// The update rule (docs/NUMERICS.md) in float64, written out step by step, independent of
/// the kernel's code.
fn oracle_step(cfg: &AdamConfig, t: u64, p: &mut [f64], g: &[f64], m: &mut [f64], v: &mut [f64]) {
    let (b1, b2) = (cfg.beta1, cfg.beta2);
    let bc1 = 1.0 - b1.powf(t as f64);
    let bc2 = 1.0 - b2.powf(t as f64);
    for i in 0..p.len() {
        let mut grad = g[i];
        match cfg.weight_decay {
            WeightDecay::None => {}
            WeightDecay::L2(w) => grad += w * p[i],
            WeightDecay::Decoupled(w) => p[i] *= 1.0 - cfg.lr * w,
            WeightDecay::DecoupledAbsolute(w) => p[i] *= 1.0 - w,
        }
        m[i] = b1 * m[i] + (1.0 - b1) * grad;
        v[i] = b2 * v[i] + (1.0 - b2) * grad * grad;
        if cfg.optimized_update {
            p[i] -= cfg.lr * bc2.sqrt() / bc1 * m[i] / (v[i].sqrt() + cfg.eps);
        } else {
            p[i] -= cfg.lr / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + cfg.eps);
        }
    }
}

/// The same update in f32 with the kernel's documented operation order and roundings, so the
/// kernel must match it bit for bit (IEEE-754 rounds each of these operations exactly).
fn scalar_f32(cfg: &AdamConfig, t: u64, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    scalar_rounded(cfg, t, p, g, m, v, &|x| x)
}

/// [`scalar_f32`] for a 16-bit storage type whose rounding is `round`: the weight decay is its
/// own step, rounded to the storage type (L2: g + λ·θ with one rounding, λ in f32).
fn scalar_rounded(
    cfg: &AdamConfig,
    t: u64,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    round: &dyn Fn(f32) -> f32,
) {
    let s = StepScalars::new(cfg, t);
    let f = |x: f64| x as f32;
    for i in 0..p.len() {
        let mut grad = g[i];
        let mut theta = p[i];
        match cfg.weight_decay {
            WeightDecay::L2(_) => grad = round(theta.mul_add(f(s.l2), grad)),
            WeightDecay::Decoupled(_) | WeightDecay::DecoupledAbsolute(_) => {
                theta = round(theta * f(s.decay_factor))
            }
            WeightDecay::None => {}
        }
        m[i] = grad.mul_add(f(s.one_minus_beta1), m[i] * f(s.beta1));
        v[i] = (f(s.one_minus_beta2) * grad).mul_add(grad, v[i] * f(s.beta2));
        let denom = if cfg.optimized_update {
            v[i].sqrt() + f(s.eps)
        } else {
            v[i].sqrt() / f(s.sqrt_bc2) + f(s.eps)
        };
        p[i] = theta - (f(s.step_size) * m[i]) / denom;
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
            out.push(
                AdamConfig::default()
                    .lr(1e-2)
                    .betas(0.8, 0.99)
                    .eps(1e-8)
                    .weight_decay(wd)
                    .optimized_update(optimized),
            );
        }
    }
    out
}

const CHUNK: usize = 1 << 10;
const LENGTHS: [usize; 7] = [0, 1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 100_003];

fn opts(threads: usize, simd: Option<SimdLevel>) -> ExecOptions {
    ExecOptions {
        num_threads: threads,
        simd,
        chunk_len: CHUNK,
        fork_join: None,
    }
}

fn run_f32(
    cfg: &AdamConfig,
    o: &ExecOptions,
    steps: u64,
    p: &mut [f32],
    g: &[Vec<f32>],
    m: &mut [f32],
    v: &mut [f32],
) {
    for t in 1..=steps {
        let refs = TensorRefs::new(&mut *p, &g[(t - 1) as usize], &mut *m, &mut *v, t);
        step_tensors(cfg, &mut [AnyTensor::from(refs)], o).unwrap();
    }
}

#[test]
fn f32_matches_scalar_reference_bit_for_bit() {
    let mut rng = Rng(42);
    for cfg in configs() {
        for &n in &LENGTHS {
            let p0: Vec<f32> = rng.vec(n).iter().map(|&x| x as f32).collect();
            let grads: Vec<Vec<f32>> = (0..5)
                .map(|_| rng.vec(n).iter().map(|&x| x as f32).collect())
                .collect();
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            run_f32(&cfg, &opts(2, None), 5, &mut p, &grads, &mut m, &mut v);
            let (mut rp, mut rm, mut rv) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            for t in 1..=5 {
                scalar_f32(&cfg, t, &mut rp, &grads[(t - 1) as usize], &mut rm, &mut rv);
            }
            assert!(
                p.iter().zip(&rp).all(|(a, b)| a.to_bits() == b.to_bits()),
                "param differs for n={n}, {cfg:?}"
            );
            assert_eq!(m, rm, "exp_avg differs for n={n}, {cfg:?}");
            assert_eq!(v, rv, "exp_avg_sq differs for n={n}, {cfg:?}");
        }
    }
}

#[test]
fn f64_matches_float64_oracle() {
    let mut rng = Rng(7);
    for cfg in configs() {
        for &n in &LENGTHS {
            let p0 = rng.vec(n);
            let grads: Vec<Vec<f64>> = (0..20).map(|_| rng.vec(n)).collect();
            let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            let (mut rp, mut rm, mut rv) = (p0.clone(), vec![0.0; n], vec![0.0; n]);
            for t in 1..=20u64 {
                let g = &grads[(t - 1) as usize];
                let refs = TensorRefs::new(&mut p, g, &mut m, &mut v, t);
                step_tensors(&cfg, &mut [AnyTensor::from(refs)], &opts(2, None)).unwrap();
                oracle_step(&cfg, t, &mut rp, g, &mut rm, &mut rv);
            }
            for i in 0..n {
                // The oracle groups the products differently; a few ulps of f64 over 20 steps.
                let tol = 1e-13 * (1.0 + rp[i].abs());
                assert!(
                    (p[i] - rp[i]).abs() <= tol,
                    "n={n} i={i}: {} vs {} ({cfg:?})",
                    p[i],
                    rp[i]
                );
                assert!((m[i] - rm[i]).abs() <= 1e-15 * (1.0 + rm[i].abs()));
                assert!((v[i] - rv[i]).abs() <= 1e-15 * (1.0 + rv[i].abs()));
            }
        }
    }
}

#[test]
fn f32_tracks_float64_oracle() {
    let mut rng = Rng(99);
    let n = 4099;
    for cfg in configs() {
        let p0 = rng.vec(n);
        let grads: Vec<Vec<f64>> = (0..100).map(|_| rng.vec(n)).collect();
        let g32: Vec<Vec<f32>> = grads
            .iter()
            .map(|g| g.iter().map(|&x| x as f32).collect())
            .collect();
        let mut p: Vec<f32> = p0.iter().map(|&x| x as f32).collect();
        let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
        run_f32(&cfg, &opts(1, None), 100, &mut p, &g32, &mut m, &mut v);
        let g64: Vec<Vec<f64>> = g32
            .iter()
            .map(|g| g.iter().map(|&x| x as f64).collect())
            .collect();
        let mut rp: Vec<f64> = p0.iter().map(|&x| x as f32 as f64).collect();
        let (mut rm, mut rv) = (vec![0.0; n], vec![0.0; n]);
        for t in 1..=100u64 {
            oracle_step(&cfg, t, &mut rp, &g64[(t - 1) as usize], &mut rm, &mut rv);
        }
        for i in 0..n {
            // Each step rounds θ at most twice (decay, update): ≤ 1 ulp of θ, plus a relative
            // error of a few f32 ulps on a move of about lr. Bound 100 steps by the sum.
            let tol = 100.0 * (f32::EPSILON as f64 * rp[i].abs() + cfg.lr * 1e-6);
            assert!(
                (p[i] as f64 - rp[i]).abs() <= tol,
                "i={i}: {} vs {} ({cfg:?})",
                p[i],
                rp[i]
            );
        }
    }
}

#[test]
fn each_tensor_of_a_call_uses_its_own_step_count() {
    // Step counts that repeat, change and come back within one call: each tensor must get the
    // bias corrections of its own t, as if stepped alone.
    let steps = [3u64, 3, 1, 3, 7, 7, 1, 2];
    let mut rng = Rng(7);
    for cfg in configs() {
        let mut bufs: Vec<[Vec<f32>; 4]> = steps
            .iter()
            .map(|_| {
                let mut b = || rng.vec(33).iter().map(|&x| x as f32).collect::<Vec<f32>>();
                let (p, g, m) = (b(), b(), b());
                let v = b().iter().map(|x| x * x).collect();
                [p, g, m, v]
            })
            .collect();
        let mut reference = bufs.clone();
        let mut tensors: Vec<AnyTensor<'_>> = bufs
            .iter_mut()
            .zip(steps)
            .map(|([p, g, m, v], t)| AnyTensor::from(TensorRefs::new(p, g, m, v, t)))
            .collect();
        step_tensors(&cfg, &mut tensors, &opts(1, None)).unwrap();
        drop(tensors);
        for ([p, g, m, v], t) in reference.iter_mut().zip(steps) {
            scalar_f32(&cfg, t, p, g, m, v);
        }
        for (a, b) in bufs.iter().zip(&reference) {
            for (x, y) in a.iter().zip(b) {
                let bits = |v: &Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(x), bits(y), "{cfg:?}");
            }
        }
    }
}

/// Runs a mixed f32/f64 call of several tensors and returns every buffer's bits.
fn mixed_run(o: &ExecOptions, cfg: &AdamConfig) -> Vec<u64> {
    let mut rng = Rng(3);
    let sizes = [0usize, 1, 7, 3 * CHUNK + 5, 70_001];
    let mut f32s: Vec<[Vec<f32>; 4]> = sizes
        .iter()
        .map(|&n| {
            let mut b = || rng.vec(n).iter().map(|&x| x as f32).collect::<Vec<f32>>();
            [b(), b(), vec![0.0; n], vec![0.0; n]]
        })
        .collect();
    let mut f64s: Vec<[Vec<f64>; 4]> = sizes
        .iter()
        .map(|&n| [rng.vec(n), rng.vec(n), vec![0.0; n], vec![0.0; n]])
        .collect();
    for t in 1..=3u64 {
        let mut tensors: Vec<AnyTensor<'_>> = Vec::new();
        for [p, g, m, v] in f32s.iter_mut() {
            tensors.push(AnyTensor::from(TensorRefs::new(p, g, m, v, t)));
        }
        for [p, g, m, v] in f64s.iter_mut() {
            tensors.push(AnyTensor::from(TensorRefs::new(p, g, m, v, t + 10)));
        }
        step_tensors(cfg, &mut tensors, o).unwrap();
    }
    let mut bits: Vec<u64> = Vec::new();
    for b in &f32s {
        bits.extend(b.iter().flatten().map(|x| x.to_bits() as u64));
    }
    for b in &f64s {
        bits.extend(b.iter().flatten().map(|x| x.to_bits()));
    }
    bits
}

#[test]
fn bit_identical_across_threads_chunks_and_simd_levels() {
    for cfg in configs() {
        let reference = mixed_run(&opts(1, Some(SimdLevel::Portable)), &cfg);
        for level in SimdLevel::available() {
            for threads in [1, 2, 3] {
                for chunk_len in [1, 17, CHUNK, 1 << 16] {
                    let o = ExecOptions {
                        num_threads: threads,
                        simd: Some(level),
                        chunk_len,
                        fork_join: None,
                    };
                    assert!(
                        mixed_run(&o, &cfg) == reference,
                        "{level:?}, {threads} threads, chunk {chunk_len}: results differ ({cfg:?})"
                    );
                }
            }
        }
    }
}

#[test]
fn zero_gradient_with_tiny_eps_gives_zero_update() {
    for cfg in configs() {
        let cfg = cfg.eps(1e-16).weight_decay(WeightDecay::None);
        let (mut p, g, mut m, mut v) =
            (vec![0.5f32; 9], vec![0.0f32; 9], vec![0.0; 9], vec![0.0; 9]);
        run_f32(&cfg, &opts(1, None), 1, &mut p, &[g], &mut m, &mut v);
        assert_eq!(p, vec![0.5f32; 9]);
    }
}

#[test]
fn errors_leave_buffers_unchanged() {
    let cfg = AdamConfig::default();
    let (mut p, g, mut m, mut v) = (vec![1.0f32; 4], vec![1.0f32; 3], vec![0.0; 4], vec![0.0; 4]);
    let mut p2 = vec![1.0f32; 2];
    let (g2, mut m2, mut v2) = (vec![1.0f32; 2], vec![0.0f32; 2], vec![0.0f32; 2]);
    let err = step_tensors(
        &cfg,
        &mut [
            AnyTensor::from(TensorRefs::new(&mut p2, &g2, &mut m2, &mut v2, 1)),
            AnyTensor::from(TensorRefs::new(&mut p, &g, &mut m, &mut v, 1)),
        ],
        &opts(1, None),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor 1: grad has 3 elements but the parameter has 4"
    );
    assert_eq!(
        p2,
        vec![1.0; 2],
        "the valid tensor must not be stepped either"
    );

    let bad = [
        (cfg.lr(-1.0), "Invalid learning rate: -1"),
        (cfg.eps(f64::NAN), "Invalid epsilon value: NaN"),
        (
            cfg.betas(1.0, 0.999),
            "Invalid beta parameter at index 0: 1",
        ),
        (
            cfg.betas(0.9, -0.1),
            "Invalid beta parameter at index 1: -0.1",
        ),
        (
            cfg.weight_decay(WeightDecay::L2(-0.5)),
            "Invalid weight_decay value: -0.5",
        ),
    ];
    for (c, msg) in bad {
        let refs = TensorRefs::new(&mut p2, &g2, &mut m2, &mut v2, 1);
        let err = step_tensors(&c, &mut [AnyTensor::from(refs)], &opts(1, None)).unwrap_err();
        assert_eq!(err.to_string(), msg);
    }
    let refs = TensorRefs::new(&mut p2, &g2, &mut m2, &mut v2, 0);
    assert!(step_tensors(&cfg, &mut [AnyTensor::from(refs)], &opts(1, None)).is_err());
    assert_eq!(p2, vec![1.0; 2]);
}

/// bf16 and f16: computed in f32 and rounded once on store (the weight decay, its own step, is
/// rounded too), so one step equals the f32 scalar reference on the widened values, narrowed
/// with the `half` crate's rounding, bit for bit, at every SIMD level and thread count.
fn half_matches_reference<H>(to32: fn(H) -> f32, from32: fn(f32) -> H, bits: fn(H) -> u16)
where
    H: Copy + std::fmt::Debug,
    for<'a> AnyTensor<'a>: From<TensorRefs<'a, H>>,
{
    let mut rng = Rng(11);
    let n = 5_000;
    for cfg in configs() {
        let cfg = cfg.eps(1e-16);
        let mk = |rng: &mut Rng, scale: f64| -> Vec<H> {
            rng.vec(n)
                .iter()
                .map(|&x| from32((x * scale) as f32))
                .collect()
        };
        let p0 = mk(&mut rng, 1.0);
        let mut g = mk(&mut rng, 1.0);
        g[0] = from32(0.0); // a zero gradient: no 0/0 even where 1e-16 underflows in f16
        let m0 = mk(&mut rng, 0.1);
        let v0: Vec<H> = mk(&mut rng, 0.01)
            .iter()
            .map(|&x| from32(to32(x).abs()))
            .collect();
        let t = 3;
        // Reference: widen, one f32 step, narrow.
        let w = |xs: &[H]| xs.iter().map(|&x| to32(x)).collect::<Vec<f32>>();
        let (mut rp, rg, mut rm, mut rv) = (w(&p0), w(&g), w(&m0), w(&v0));
        scalar_rounded(&cfg, t, &mut rp, &rg, &mut rm, &mut rv, &|x| {
            to32(from32(x))
        });
        let narrow = |xs: &[f32]| xs.iter().map(|&x| bits(from32(x))).collect::<Vec<u16>>();
        let expected = [narrow(&rp), narrow(&rm), narrow(&rv)];
        for level in SimdLevel::available() {
            for threads in [1, 2] {
                let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
                let refs = TensorRefs::new(&mut p, &g, &mut m, &mut v, t);
                let o = ExecOptions {
                    num_threads: threads,
                    simd: Some(level),
                    chunk_len: 1000,
                    fork_join: None,
                };
                step_tensors(&cfg, &mut [AnyTensor::from(refs)], &o).unwrap();
                let got = [
                    p.iter().map(|&x| bits(x)).collect::<Vec<u16>>(),
                    m.iter().map(|&x| bits(x)).collect(),
                    v.iter().map(|&x| bits(x)).collect(),
                ];
                assert!(got == expected, "{level:?}, {threads} threads, {cfg:?}");
                assert!(p.iter().all(|&x| to32(x).is_finite()));
            }
        }
    }
}

#[test]
fn bf16_computes_in_f32_and_rounds_once() {
    use rustadam::bf16;
    half_matches_reference(bf16::to_f32, bf16::from_f32, bf16::to_bits);
}

#[test]
fn f16_computes_in_f32_and_rounds_once() {
    use rustadam::f16;
    half_matches_reference(f16::to_f32, f16::from_f32, f16::to_bits);
}

/// A host pool: `n` scoped threads each running the task.
fn scoped_threads(n: usize, task: &(dyn Fn() + Sync)) {
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(task);
        }
    });
}

/// A pool that starts fewer threads than asked for (as a nested OpenMP region does).
fn one_thread(_n: usize, task: &(dyn Fn() + Sync)) {
    task();
}

#[test]
fn a_host_thread_pool_gives_the_same_bits() {
    for cfg in configs() {
        let reference = mixed_run(&opts(1, None), &cfg);
        for pool in [scoped_threads as rustadam::ForkJoin, one_thread] {
            for threads in [2, 3] {
                let o = ExecOptions {
                    num_threads: threads,
                    simd: None,
                    chunk_len: 17,
                    fork_join: Some(pool),
                };
                assert!(
                    mixed_run(&o, &cfg) == reference,
                    "{threads} threads ({cfg:?})"
                );
            }
        }
    }
}

/// Special 16-bit values: zeros, subnormals, the extremes, infinities, NaNs of both signs.
fn special_f16(rng: &mut Rng, n: usize) -> Vec<rustadam::f16> {
    use rustadam::f16;
    let specials = [
        0x0000u16, 0x8000, 0x0001, 0x8001, 0x03ff, 0x0400, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00,
        0xfe00, 0x7c01, 0x7fff, 0xffff, 0x3c00, 0x0200,
    ];
    (0..n)
        .map(|i| {
            let r = rng.next();
            if i % 5 == 0 {
                f16::from_bits(
                    specials[(r.abs() * specials.len() as f64) as usize % specials.len()],
                )
            } else {
                // Magnitudes from the subnormals to the largest values.
                f16::from_f32((r * 2f64.powf(rng.next() * 40.0 - 24.0)) as f32)
            }
        })
        .collect()
}

/// float16 gives the same bits at every SIMD level (the AVX-512 path converts with the CPU's
/// own instructions): any length, chunk boundary, weight decay, form and AMSGrad, on values
/// including subnormals, infinities and NaNs; a NaN is stored as the quiet NaN of its sign.
#[test]
fn f16_bit_identical_across_simd_levels_on_special_values() {
    use rustadam::f16;
    let mut rng = Rng(29);
    let n = 1_000;
    let bufs: Vec<Vec<f16>> = (0..5).map(|_| special_f16(&mut rng, n)).collect();
    let run = |cfg: &AdamConfig, level: SimdLevel, chunk_len: usize| {
        let (mut p, g, mut m, mut v, mut vmax) = (
            bufs[0].clone(),
            bufs[1].clone(),
            bufs[2].clone(),
            bufs[3].clone(),
            bufs[4].clone(),
        );
        let o = ExecOptions {
            num_threads: 2,
            simd: Some(level),
            chunk_len,
            fork_join: None,
        };
        for t in 1..=2 {
            let mut refs = TensorRefs::new(&mut p, &g, &mut m, &mut v, t);
            if cfg.amsgrad {
                refs = refs.with_max_exp_avg_sq(&mut vmax);
            }
            step_tensors(cfg, &mut [AnyTensor::from(refs)], &o).unwrap();
        }
        // The maximum is written (and compared) only with AMSGrad.
        let written = if cfg.amsgrad { 4 } else { 3 };
        [p, m, v, vmax][..written]
            .iter()
            .flatten()
            .map(|x| x.to_bits())
            .collect::<Vec<u16>>()
    };
    for cfg in configs() {
        for amsgrad in [false, true] {
            let cfg = cfg.amsgrad(amsgrad);
            let reference = run(&cfg, SimdLevel::Portable, 1 << 16);
            for level in SimdLevel::available() {
                for chunk_len in [17, 100, 1 << 16] {
                    let got = run(&cfg, level, chunk_len);
                    for (i, (&a, &b)) in got.iter().zip(&reference).enumerate() {
                        let nan = |x: u16| x & 0x7fff > 0x7c00;
                        assert!(
                            a == b || (nan(a) && nan(b) && a & 0x7fff == 0x7e00),
                            "{level:?}, chunk {chunk_len}, value {i}: {a:#06x} vs {b:#06x} ({cfg:?})"
                        );
                    }
                    assert!(got
                        .iter()
                        .filter(|&&x| x & 0x7fff > 0x7c00)
                        .all(|&x| x & 0x7fff == 0x7e00));
                }
            }
        }
    }
}
