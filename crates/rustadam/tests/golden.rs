//! Golden values: the optimizer against numbers produced by the update rule
//! (docs/NUMERICS.md) in float64.
//!
//! Five elements (one with a zero gradient throughout, one starting at zero) take four updates
//! with the gradients `G` below, for both bias-correction forms, every weight-decay mode and two
//! sets of hyper-parameters: `A` (α = 0.01, β = (0.9, 0.999), ε = 1e-16, where both forms agree)
//! and `B` (α = 0.05, β = (0.8, 0.99), ε = 0.05, large enough that where ε enters matters).
//! The table records θ after the first update and θ, m, v after the fourth.

use rustadam::{Adam, AdamConfig, AdamState, WeightDecay};

// The table was printed by this script (Python 3, numpy), which applies the spec's formulas in
// float64, independently of the kernel's operation order:
//
// import numpy as np
//
// P0 = [0.5, -1.25, 2.0, 0.0, -0.375]
// G = [
//     [0.25, -0.5, 1.0, 0.125, 0.0],
//     [-0.125, -0.75, 0.5, 0.25, 0.0],
//     [0.5, 0.25, -1.5, 0.0625, 0.0],
//     [0.0, -1.0, 0.75, -0.5, 0.0],
// ]
// HYPER = {"A": (0.01, 0.9, 0.999, 1e-16), "B": (0.05, 0.8, 0.99, 0.05)}
// DECAY = {"none": None, "l2": 0.1, "decoupled": 0.1, "absolute": 0.01}
//
//
// def run(h, decay, optimized):
//     lr, b1, b2, eps = HYPER[h]
//     p, m, v = np.array(P0), np.zeros(5), np.zeros(5)
//     after = []
//     for t, g in enumerate(G, start=1):
//         g = np.array(g)
//         if decay == "l2":
//             g = g + DECAY[decay] * p
//         elif decay == "decoupled":
//             p = p * (1 - lr * DECAY[decay])
//         elif decay == "absolute":
//             p = p * (1 - DECAY[decay])
//         m = b1 * m + (1 - b1) * g
//         v = b2 * v + (1 - b2) * g * g
//         bc1, bc2 = 1 - b1**t, 1 - b2**t
//         if optimized:
//             p = p - lr * np.sqrt(bc2) / bc1 * m / (np.sqrt(v) + eps)
//         else:
//             p = p - lr / bc1 * m / (np.sqrt(v) / np.sqrt(bc2) + eps)
//         after.append(p)
//     return after[0], p, m, v
//
//
// def row(x):
//     return "[" + ", ".join(repr(float(e)) for e in x) + "]"
//
//
// for optimized in (True, False):
//     for decay in DECAY:
//         for h in HYPER:
//             p1, p, m, v = run(h, decay, optimized)
//             print(f"    Golden {{ hyper: '{h}', decay: \"{decay}\", optimized: {str(optimized).lower()},")
//             print(f"        param_1: {row(p1)},")
//             print(f"        param_4: {row(p)},")
//             print(f"        exp_avg_4: {row(m)},")
//             print(f"        exp_avg_sq_4: {row(v)} }},")

const P0: [f64; 5] = [0.5, -1.25, 2.0, 0.0, -0.375];
const G: [[f64; 5]; 4] = [
    [0.25, -0.5, 1.0, 0.125, 0.0],
    [-0.125, -0.75, 0.5, 0.25, 0.0],
    [0.5, 0.25, -1.5, 0.0625, 0.0],
    [0.0, -1.0, 0.75, -0.5, 0.0],
];

struct Golden {
    hyper: char,
    decay: &'static str,
    optimized: bool,
    param_1: [f64; 5],
    param_4: [f64; 5],
    exp_avg_4: [f64; 5],
    exp_avg_sq_4: [f64; 5],
}

#[rustfmt::skip]
const GOLDEN: &[Golden] = &[
    Golden { hyper: 'A', decay: "none", optimized: true,
        param_1: [0.4900000000000001, -1.24, 1.99, -0.009999999999999747, -0.375],
        param_4: [0.4753646638200065, -1.2170022119582489, 1.9799572504820793, -0.02681305832617554, -0.375],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "none", optimized: true,
        param_1: [0.48333333333333334, -1.225, 1.9666666666666666, -0.010000000000000004, -0.375],
        param_4: [0.44700844821044755, -1.14853090083996, 1.936830726132303, -0.03594302873848347, -0.375],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
    Golden { hyper: 'A', decay: "l2", optimized: true,
        param_1: [0.4900000000000001, -1.24, 1.99, -0.009999999999999747, -0.3650000000000008],
        param_4: [0.4715643220133654, -1.2150619951726336, 1.9761308114239884, -0.026742911674168503, -0.33507034842864164],
        exp_avg_4: [0.06986196463342352, -0.2171585644926513, 0.12171777104942157, -0.015553474590380957, -0.012335616311504177],
        exp_avg_sq_4: [0.0003983674332836166, 0.0024275085006319926, 0.00451529825672558, 0.00033395469081944496, 5.18112183920855e-06] },
    Golden { hyper: 'B', decay: "l2", optimized: true,
        param_1: [0.48125, -1.2222222222222223, 1.964705882352941, -0.010000000000000004, -0.3715116279069767],
        param_4: [0.4345647620012866, -1.1352466779632506, 1.917618940853313, -0.035578690309654666, -0.35472928040890794],
        exp_avg_4: [0.11749562746545988, -0.3779786571156002, 0.19151083801069596, -0.04662616217060694, -0.021685146165815034],
        exp_avg_sq_4: [0.00391741992301047, 0.02388561632648232, 0.04452998342800348, 0.0033376516560838223, 5.352690195462132e-05] },
    Golden { hyper: 'A', decay: "decoupled", optimized: true,
        param_1: [0.4895000000000001, -1.23875, 1.988, -0.009999999999999747, -0.374625],
        param_4: [0.4734095370239319, -1.2120651548903232, 1.9720170269970805, -0.02675511865478369, -0.37350224850037494],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "decoupled", optimized: true,
        param_1: [0.48083333333333333, -1.21875, 1.9566666666666666, -0.010000000000000004, -0.373125],
        param_4: [0.43746188908441325, -1.1244947276753303, 1.897907801919799, -0.03554114748751756, -0.367556062734375],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
    Golden { hyper: 'A', decay: "absolute", optimized: true,
        param_1: [0.4850000000000001, -1.2275, 1.97, -0.009999999999999747, -0.37124999999999997],
        param_4: [0.45607849105092435, -1.1682981219399535, 1.9016235865504174, -0.02623722037608027, -0.36022350374999995],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "absolute", optimized: true,
        param_1: [0.47833333333333333, -1.2125000000000001, 1.9466666666666665, -0.010000000000000004, -0.37124999999999997],
        param_4: [0.4280611580520445, -1.100824474798759, 1.8595723416723764, -0.03514163876571277, -0.36022350374999995],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
    Golden { hyper: 'A', decay: "none", optimized: false,
        param_1: [0.49, -1.24, 1.99, -0.009999999999999992, -0.375],
        param_4: [0.4753646638200063, -1.2170022119582489, 1.9799572504820793, -0.026813058326175972, -0.375],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "none", optimized: false,
        param_1: [0.4583333333333333, -1.2045454545454546, 1.9523809523809523, -0.03571428571428572, -0.375],
        param_4: [0.3972947945620833, -1.0994874851282752, 1.9115718662809211, -0.0962593638162646, -0.375],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
    Golden { hyper: 'A', decay: "l2", optimized: false,
        param_1: [0.49, -1.24, 1.99, -0.009999999999999992, -0.36500000000000005],
        param_4: [0.4715643220133652, -1.2150619951726336, 1.9761308114239884, -0.026742911674168937, -0.3350703484286394],
        exp_avg_4: [0.06986196463342352, -0.2171585644926513, 0.12171777104942157, -0.015553474590380957, -0.012335616311504143],
        exp_avg_sq_4: [0.0003983674332836166, 0.0024275085006319926, 0.00451529825672558, 0.00033395469081944496, 5.181121839208522e-06] },
    Golden { hyper: 'B', decay: "l2", optimized: false,
        param_1: [0.45714285714285713, -1.2037037037037037, 1.952, -0.03571428571428572, -0.3535714285714286],
        param_4: [0.38019092292072154, -1.0887351468441369, 1.892574369856281, -0.09481557960629962, -0.29204262809413734],
        exp_avg_4: [0.1157627990883493, -0.3764590975970164, 0.19052439111589037, -0.04899346700398691, -0.019927655581767234],
        exp_avg_sq_4: [0.00388180753393637, 0.02377526361246495, 0.044528824414755745, 0.003384807294462119, 4.658394526018653e-05] },
    Golden { hyper: 'A', decay: "decoupled", optimized: false,
        param_1: [0.4895, -1.23875, 1.988, -0.009999999999999992, -0.374625],
        param_4: [0.4734095370239317, -1.2120651548903232, 1.9720170269970805, -0.026755118654784124, -0.37350224850037494],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "decoupled", optimized: false,
        param_1: [0.4558333333333333, -1.1982954545454545, 1.9423809523809523, -0.03571428571428572, -0.373125],
        param_4: [0.3882257743567548, -1.0759323836136832, 1.8729690928291454, -0.09517214569013911, -0.367556062734375],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
    Golden { hyper: 'A', decay: "absolute", optimized: false,
        param_1: [0.485, -1.2275, 1.97, -0.009999999999999992, -0.37124999999999997],
        param_4: [0.45607849105092413, -1.1682981219399535, 1.9016235865504174, -0.026237220376080693, -0.36022350374999995],
        exp_avg_4: [0.053099999999999994, -0.17469999999999997, 0.05339999999999999, -0.015012499999999991, 0.0],
        exp_avg_sq_4: [0.0003276564530625003, 0.0018730638122500015, 0.0040567532490000035, 0.0003318555781093753, 0.0] },
    Golden { hyper: 'B', decay: "absolute", optimized: false,
        param_1: [0.4533333333333333, -1.1920454545454546, 1.9323809523809523, -0.03571428571428572, -0.37124999999999997],
        param_4: [0.379298618635858, -1.0527394373784191, 1.8349510786674754, -0.09409221852028836, -0.36022350374999995],
        exp_avg_4: [0.08959999999999999, -0.3071999999999999, 0.07639999999999998, -0.04519999999999999, 0.0],
        exp_avg_sq_4: [0.0032345775000000025, 0.018557560000000015, 0.04005324000000003, 0.003302843593750003, 0.0] },
];

impl Golden {
    fn config(&self) -> AdamConfig {
        let (lr, beta1, beta2, eps) = match self.hyper {
            'A' => (0.01, 0.9, 0.999, 1e-16),
            _ => (0.05, 0.8, 0.99, 0.05),
        };
        let weight_decay = match self.decay {
            "none" => WeightDecay::None,
            "l2" => WeightDecay::L2(0.1),
            "decoupled" => WeightDecay::Decoupled(0.1),
            _ => WeightDecay::DecoupledAbsolute(0.01),
        };
        AdamConfig::default()
            .lr(lr)
            .betas(beta1, beta2)
            .eps(eps)
            .weight_decay(weight_decay)
            .optimized_update(self.optimized)
    }

    fn name(&self) -> String {
        format!(
            "hyper {} / decay {} / optimized_update {}",
            self.hyper, self.decay, self.optimized
        )
    }
}

/// Element types under test, with how far they may be from the float64 golden values.
trait Float: rustadam::Element + Copy + PartialEq + std::fmt::Debug
where
    for<'t> rustadam::AnyTensor<'t>: From<rustadam::TensorRefs<'t, Self>>,
{
    /// Unit roundoff of the type.
    const UNIT: f64;
    fn of(x: f64) -> Self;
    fn to(self) -> f64;
}

impl Float for f32 {
    const UNIT: f64 = f32::EPSILON as f64 / 2.0;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn to(self) -> f64 {
        self as f64
    }
}

impl Float for f64 {
    const UNIT: f64 = f64::EPSILON / 2.0;
    fn of(x: f64) -> Self {
        x
    }
    fn to(self) -> f64 {
        self
    }
}

/// Each stored value is rounded once per update and each of the few operations behind it adds
/// an error of at most one unit roundoff, so over four updates the error stays within a small
/// multiple of the unit roundoff of the values involved (|θ| ≤ 2, and m, v relative).
fn assert_close<E: Float>(case: &Golden, what: &str, got: &[E], want: &[f64])
where
    for<'t> rustadam::AnyTensor<'t>: From<rustadam::TensorRefs<'t, E>>,
{
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = 16.0
            * E::UNIT
            * w.abs()
                .max(if what.starts_with("param") { 1.0 } else { 0.0 });
        assert!(
            (g.to() - w).abs() <= tol,
            "{}: {what}[{i}] = {:e}, golden {:e} (|diff| {:e} > {:e})",
            case.name(),
            g.to(),
            w,
            (g.to() - w).abs(),
            tol
        );
    }
}

fn check_case<E: Float>(case: &Golden)
where
    for<'t> rustadam::AnyTensor<'t>: From<rustadam::TensorRefs<'t, E>>,
{
    let adam = Adam::new(case.config()).unwrap();
    let mut param: Vec<E> = P0.iter().map(|&x| E::of(x)).collect();
    let mut state = AdamState::<E>::new(param.len());
    for (t, g) in G.iter().enumerate() {
        let grad: Vec<E> = g.iter().map(|&x| E::of(x)).collect();
        adam.step(&mut param, &grad, &mut state).unwrap();
        if t == 0 {
            assert_close(case, "param after update 1", &param, &case.param_1);
        }
    }
    assert_eq!(state.step, 4, "{}", case.name());
    assert_close(case, "param after update 4", &param, &case.param_4);
    assert_close(
        case,
        "exp_avg after update 4",
        &state.exp_avg,
        &case.exp_avg_4,
    );
    assert_close(
        case,
        "exp_avg_sq after update 4",
        &state.exp_avg_sq,
        &case.exp_avg_sq_4,
    );
}

fn check_all<E: Float>(optimized: bool)
where
    for<'t> rustadam::AnyTensor<'t>: From<rustadam::TensorRefs<'t, E>>,
{
    let cases: Vec<&Golden> = GOLDEN.iter().filter(|c| c.optimized == optimized).collect();
    // Every weight-decay mode under both hyper-parameter sets.
    assert_eq!(cases.len(), 8);
    for case in cases {
        check_case::<E>(case);
    }
}

#[test]
fn f64_optimized_update() {
    check_all::<f64>(true);
}

#[test]
fn f64_textbook_update() {
    check_all::<f64>(false);
}

#[test]
fn f32_optimized_update() {
    check_all::<f32>(true);
}

#[test]
fn f32_textbook_update() {
    check_all::<f32>(false);
}

/// All sixteen cases' tensors stepped by `step_many` in one multi-tensor call each, with a chunk
/// length that splits every tensor, give the same numbers.
#[test]
fn step_many_matches_golden() {
    use rustadam::ExecOptions;
    for case in GOLDEN {
        let adam = Adam::new(case.config())
            .unwrap()
            .with_exec_options(ExecOptions {
                num_threads: 2,
                chunk_len: 2,
                ..ExecOptions::default()
            });
        let mut params = [P0.to_vec(), P0.to_vec(), P0.to_vec()];
        let mut states = vec![AdamState::<f64>::new(5); 3];
        for g in &G {
            let items = params
                .iter_mut()
                .zip(states.iter_mut())
                .map(|(p, s)| (&mut p[..], &g[..], s));
            adam.step_many(items).unwrap();
        }
        for (p, s) in params.iter().zip(&states) {
            assert_close(case, "param after update 4", p, &case.param_4);
            assert_close(case, "exp_avg after update 4", &s.exp_avg, &case.exp_avg_4);
            assert_close(
                case,
                "exp_avg_sq after update 4",
                &s.exp_avg_sq,
                &case.exp_avg_sq_4,
            );
        }
    }
}
