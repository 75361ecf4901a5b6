//! Fits a linear regression y ≈ X·w + b with Adam: `cargo run --example linear_regression`.
//!
//! The data come from known weights plus a little noise; the mean squared error
//! L = (1/n)·Σ (xᵢ·w + b − yᵢ)² has the gradients ∂L/∂w = (2/n)·Xᵀr and ∂L/∂b = (2/n)·Σ rᵢ,
//! with residuals r = X·w + b − y. Weights and bias are two tensors, each with its own
//! `AdamState`, updated together by one `step_many` call.

use rustadam::{Adam, AdamConfig, AdamError, AdamState, WeightDecay};

const SAMPLES: usize = 256;
const FEATURES: usize = 3;
const TRUE_W: [f32; FEATURES] = [2.0, -3.0, 0.5];
const TRUE_B: f32 = 1.0;

/// A small deterministic generator (xorshift) of values in [−1, 1).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn main() -> Result<(), AdamError> {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let x: Vec<[f32; FEATURES]> = (0..SAMPLES)
        .map(|_| [rng.next(), rng.next(), rng.next()])
        .collect();
    let y: Vec<f32> = x
        .iter()
        .map(|xi| dot(xi, &TRUE_W) + TRUE_B + 0.01 * rng.next())
        .collect();

    let adam = Adam::new(
        AdamConfig::default()
            .lr(0.05)
            .weight_decay(WeightDecay::Decoupled(1e-4)),
    )?;
    let mut w = [0.0f32; FEATURES];
    let mut b = [0.0f32; 1];
    let (mut w_state, mut b_state) = (AdamState::new(FEATURES), AdamState::new(1));

    for epoch in 0..=200 {
        // Forward pass and gradients of the mean squared error.
        let residuals: Vec<f32> = x
            .iter()
            .zip(&y)
            .map(|(xi, yi)| dot(xi, &w) + b[0] - yi)
            .collect();
        let n = SAMPLES as f32;
        let loss = residuals.iter().map(|r| r * r).sum::<f32>() / n;
        let mut grad_w = [0.0f32; FEATURES];
        for (xi, r) in x.iter().zip(&residuals) {
            for (g, xij) in grad_w.iter_mut().zip(xi) {
                *g += 2.0 * r * xij / n;
            }
        }
        let grad_b = [2.0 * residuals.iter().sum::<f32>() / n];

        if epoch % 20 == 0 {
            println!("epoch {epoch:3}  loss {loss:.6}");
        }
        if epoch == 200 {
            break;
        }
        adam.step_many([
            (&mut w[..], &grad_w[..], &mut w_state),
            (&mut b[..], &grad_b[..], &mut b_state),
        ])?;
    }

    println!("fitted w = {w:.3?}, b = {:.3}", b[0]);
    println!("true   w = {TRUE_W:.3?}, b = {TRUE_B:.3}");
    Ok(())
}

fn dot(a: &[f32; FEATURES], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
