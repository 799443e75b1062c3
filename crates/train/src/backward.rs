//! Backward from an intermediate tensor whose gradient is already known.
//!
//! candle starts every backward from a scalar. The step's usual stand-in,
//! `(output · grad).sum().backward()`, forms the product, and in backward a broadcast of the
//! scalar's gradient and a second product, each a pass over the output and a buffer its size;
//! the op here hands `grad` to `output` directly. The trained products' weight gradients skip
//! candle's zeroed buffer and add (`ff_kernels::weight_grads`) and join the store here.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use ff_kernels::weight_grads;

/// The gradients of the graph behind `output` when the gradient reaching `output` is `grad`
/// (of `output`'s shape and dtype).
pub fn backward_from(output: &Tensor, grad: &Tensor) -> Result<GradStore> {
    if output.shape() != grad.shape() {
        return Err(candle_core::Error::ShapeMismatchBinaryOp {
            lhs: output.shape().clone(),
            rhs: grad.shape().clone(),
            op: "backward-from",
        });
    }
    if !output.device().is_cpu() {
        // The op has only a CPU kernel; elsewhere the stand-in gives the same gradients.
        return (output * grad)?.sum_all()?.backward();
    }
    let seeded = output.apply_op1_arc(Arc::new(Box::new(SeedGradient(grad.clone()))))?;
    let (store, weight_grads) = weight_grads::collect(|| seeded.backward());
    let mut store = store?;
    for (weight, grad) in weight_grads {
        let sum = match store.remove(&weight) {
            Some(other) => (other + grad)?,
            None => grad,
        };
        store.insert(&weight, sum);
    }
    Ok(store)
}

/// A scalar whose backward gives its input the gradient it holds.
struct SeedGradient(Tensor);

impl CustomOp1 for SeedGradient {
    fn name(&self) -> &'static str {
        "seed-gradient"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use ff_kernels::trained_product::trained_product;
    use ff_kernels::Output;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar())
            .unwrap()
    }

    #[test]
    fn gives_the_gradients_of_the_product_stand_in() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 5), &dev).unwrap()).unwrap();
        let grad = Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap();
        let y = x.as_tensor().matmul(w.as_tensor()).unwrap().tanh().unwrap();
        let ours = backward_from(&y, &grad).unwrap();
        let reference = (&y * &grad).unwrap().sum_all().unwrap().backward().unwrap();
        for var in [&x, &w] {
            let diff = max_abs_diff(ours.get(var).unwrap(), reference.get(var).unwrap());
            assert!(diff < 1e-6, "{diff}");
        }
        let wrong = Tensor::zeros((3, 4), candle_core::DType::F32, &dev).unwrap();
        assert!(backward_from(&y, &wrong).is_err());
    }

    #[test]
    fn sums_a_weight_used_by_trained_products_twice_and_by_a_candle_op() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 4), &dev).unwrap()).unwrap();
        let grad = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let (x, w) = (x.as_tensor(), w.as_tensor());
        let trained = |t: &Tensor| trained_product(t, w, Output::Values).unwrap().unwrap();
        let ours = (trained(&trained(x)) + x.matmul(w).unwrap()).unwrap();
        let wt = w.t().unwrap();
        let reference =
            (x.matmul(&wt).unwrap().matmul(&wt).unwrap() + x.matmul(w).unwrap()).unwrap();
        let (got, want) = (
            backward_from(&ours, &grad).unwrap(),
            backward_from(&reference, &grad).unwrap(),
        );
        let diff = max_abs_diff(got.get(w).unwrap(), want.get(w).unwrap());
        assert!(diff < 1e-5, "{diff}");
    }
}
