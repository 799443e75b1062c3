//! What the fused ops' unit tests share: each compares an op and its backward with the same
//! computation in candle's own ops.

use candle_core::{backprop::GradStore, Device, Shape, Tensor};

/// The same 64-bit value for the same `(seed, site)`, well mixed: splitmix64, as the model's
/// dropout derives its seeds, so the tests' inputs are the values they were in the model crate.
fn derive_seed(seed: u64, site: u64) -> u64 {
    let state =
        (seed ^ site.wrapping_mul(0xD6E8_FEB8_6659_FD93)).wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Normally distributed values that are the same in every run, so a test that passes once passes
/// always and a failure repeats (candle's CPU `randn` cannot be seeded). Box–Muller over uniforms
/// from `derive_seed(seed, i)`.
pub fn normal<S: Into<Shape>>(shape: S, mean: f32, std: f32, seed: u64) -> Tensor {
    let shape = shape.into();
    let uniform =
        |i: usize| ((derive_seed(seed, i as u64) >> 40) as f32 + 0.5) / (1u64 << 24) as f32;
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|i| {
            let (u, v) = (uniform(2 * i), uniform(2 * i + 1));
            mean + std * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Values in [−1, 1] that are the same in every run: `sin(0.37 i + phase)`. Where a test's
/// bound must hold for inputs of bounded magnitude (the tails of [`normal`] can sum past it).
pub fn sine<S: Into<Shape>>(shape: S, phase: f32) -> Tensor {
    let shape = shape.into();
    let values: Vec<f32> = (0..shape.elem_count())
        .map(|i| (i as f32 * 0.37 + phase).sin())
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// Largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The gradients of `sum(output · upstream)`: what backward hands the inputs of an op whose
/// output receives the gradient `upstream`.
pub fn grads_of(output: Tensor, upstream: &Tensor) -> GradStore {
    (output * upstream)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}
