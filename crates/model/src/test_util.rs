//! What the fused ops' unit tests share: each compares an op and its backward with the same
//! computation in candle's own ops.

use candle_core::{backprop::GradStore, Tensor};

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
