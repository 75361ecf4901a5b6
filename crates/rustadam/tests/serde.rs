//! The `serde` feature: configs and states survive a JSON round trip, and a run resumed from a
//! serialized checkpoint continues bit for bit. Run with `cargo test -p rustadam --features serde`.
#![cfg(feature = "serde")]

use rustadam::{bf16, Adam, AdamConfig, AdamState, WeightDecay};

fn round_trip<T>(x: &T) -> T
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    serde_json::from_str(&serde_json::to_string(x).unwrap()).unwrap()
}

#[test]
fn config_round_trip_every_weight_decay() {
    for wd in [
        WeightDecay::None,
        WeightDecay::L2(0.1),
        WeightDecay::Decoupled(0.01),
        WeightDecay::DecoupledAbsolute(1e-4),
    ] {
        let cfg = AdamConfig::default()
            .lr(3e-4)
            .betas(0.8, 0.95)
            .eps(1e-8)
            .weight_decay(wd)
            .optimized_update(false);
        assert_eq!(round_trip(&cfg), cfg);
    }
}

#[test]
fn config_fields_left_out_take_defaults() {
    let cfg: AdamConfig =
        serde_json::from_str(r#"{"lr": 0.01, "weight_decay": {"Decoupled": 0.1}}"#).unwrap();
    assert_eq!(
        cfg,
        AdamConfig::default()
            .lr(0.01)
            .weight_decay(WeightDecay::Decoupled(0.1))
    );
    let cfg: AdamConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, AdamConfig::default());
}

#[test]
fn state_json_layout() {
    let state = AdamState::from_parts(vec![0.5f64, -0.25], vec![0.125, 1.0], 3).unwrap();
    assert_eq!(
        serde_json::to_string(&state).unwrap(),
        r#"{"exp_avg":[0.5,-0.25],"exp_avg_sq":[0.125,1.0],"step":3}"#
    );
}

#[test]
fn state_round_trip_f32_f64_bf16() {
    let s32 = AdamState::from_parts(vec![0.1f32, -3.5e-20], vec![1e-30, 7.0], 5).unwrap();
    assert_eq!(round_trip(&s32), s32);
    let s64 = AdamState::from_parts(vec![0.1f64, -3.5e-300], vec![1e-300, 7.0], 9).unwrap();
    assert_eq!(round_trip(&s64), s64);
    let sb = AdamState::from_parts(
        vec![bf16::from_f32(0.1), bf16::from_f32(-2.0)],
        vec![bf16::from_f32(1e-3), bf16::from_f32(4.0)],
        2,
    )
    .unwrap();
    assert_eq!(round_trip(&sb), sb);
}

/// Four updates in one go equal two updates, a checkpoint of config and state through JSON, and
/// two more updates after restoring it.
#[test]
fn resume_from_checkpoint_is_exact() {
    let cfg = AdamConfig::default()
        .lr(0.05)
        .weight_decay(WeightDecay::Decoupled(0.1));
    let grads: Vec<Vec<f32>> = (0..4)
        .map(|t| (0..7).map(|i| ((i * 3 + t) % 5) as f32 - 2.0).collect())
        .collect();

    let adam = Adam::new(cfg).unwrap();
    let mut p_full = vec![1.0f32; 7];
    let mut s_full = AdamState::new(7);
    for g in &grads {
        adam.step(&mut p_full, g, &mut s_full).unwrap();
    }

    let mut p = vec![1.0f32; 7];
    let mut s = AdamState::new(7);
    for g in &grads[..2] {
        adam.step(&mut p, g, &mut s).unwrap();
    }
    let saved = serde_json::to_string(&(adam.config(), &s)).unwrap();
    let (cfg2, mut s2): (AdamConfig, AdamState<f32>) = serde_json::from_str(&saved).unwrap();
    let adam2 = Adam::new(cfg2).unwrap();
    for g in &grads[2..] {
        adam2.step(&mut p, g, &mut s2).unwrap();
    }
    assert_eq!(s2.step, 4);
    assert_eq!(p, p_full);
    assert_eq!(s2, s_full);
}

/// A deserialized state whose moments do not fit the parameter is an error, not a panic.
#[test]
fn mismatched_deserialized_state_is_an_error() {
    let mut s: AdamState<f64> =
        serde_json::from_str(r#"{"exp_avg":[0.0,0.0],"exp_avg_sq":[0.0],"step":1}"#).unwrap();
    let mut p = vec![1.0f64; 2];
    let err = Adam::default()
        .step(&mut p, &[1.0, 1.0], &mut s)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "tensor 0: exp_avg_sq has 1 elements but the parameter has 2"
    );
    assert_eq!((p, s.step), (vec![1.0, 1.0], 1));
}

#[test]
fn new_options_round_trip_and_default() {
    use rustadam::Rounding;
    for rounding in [Rounding::Nearest, Rounding::Stochastic, Rounding::Kahan] {
        let cfg = AdamConfig::default()
            .maximize(true)
            .amsgrad(true)
            .rounding(rounding);
        assert_eq!(round_trip(&cfg), cfg);
    }
    // Old checkpoints, without the new keys, read as the defaults.
    let cfg: AdamConfig = serde_json::from_str(r#"{"lr": 0.5}"#).unwrap();
    assert!(!cfg.maximize && !cfg.amsgrad && cfg.rounding == Rounding::Nearest);
}

#[test]
fn state_with_amsgrad_and_kahan_buffers_round_trips() {
    let mut state = AdamState::<bf16>::new(2).with_seed(9);
    state.max_exp_avg_sq = Some(vec![bf16::from_f32(0.5), bf16::ONE]);
    state.compensation = Some(vec![bf16::from_f32(-1e-3), bf16::ZERO]);
    assert_eq!(round_trip(&state), state);
    // A state without them keeps the old layout, and an old layout reads back without them.
    let plain = AdamState::from_parts(vec![0.5f64], vec![0.25], 1).unwrap();
    let json = serde_json::to_string(&plain).unwrap();
    assert_eq!(json, r#"{"exp_avg":[0.5],"exp_avg_sq":[0.25],"step":1}"#);
    assert_eq!(round_trip(&plain), plain);
}
