//! `x · Wᵀ` for a frozen `W`, whose backward computes only the input gradient.
//!
//! candle's matmul backward always computes both operands' gradients; for a frozen weight the
//! weight gradient `xᵀ · dy` costs as much as the forward product and is thrown away. LoRA
//! training multiplies by frozen weights everywhere (every Linear and the LM head), so that
//! waste was a third of a step's matrix products.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};

/// `x` is `[m, k]`, `w` is `[n, k]` and never trains; returns `[m, n]`.
pub fn matmul_frozen_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // The op has only a CPU kernel; elsewhere the plain product is correct, only slower.
        return x.matmul(&w.t()?);
    }
    x.apply_op2_arc(w, std::sync::Arc::new(Box::new(FrozenMatmulT)))
}

struct FrozenMatmulT;

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "matmul-frozen-t"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = x_layout.shape().dims2()?;
        let (n, w_k) = w_layout.shape().dims2()?;
        if k != w_k {
            return Err(Error::ShapeMismatchBinaryOp {
                lhs: x_layout.shape().clone(),
                rhs: w_layout.shape().clone(),
                op: "matmul-frozen-t",
            });
        }
        // Wᵀ as a strided view: the product reads W in place, as `x.matmul(&w.t())` does.
        let w_t = w_layout.transpose(0, 1)?;
        let y = x.matmul(w, (1, m, n, k), x_layout, &w_t)?;
        Ok((y, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad_y.matmul(w)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_matmul_forward_and_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 7), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 7), &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (5, 3), &dev).unwrap();

        let ours = matmul_frozen_t(x.as_tensor(), &w).unwrap();
        let reference = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-5);

        let g_ours = (ours * &upstream).unwrap().sum_all().unwrap();
        let g_ref = (reference * &upstream).unwrap().sum_all().unwrap();
        let g_ours = g_ours.backward().unwrap();
        let g_ref = g_ref.backward().unwrap();
        let (a, b) = (g_ours.get(&x).unwrap(), g_ref.get(&x).unwrap());
        assert!(diff(a, b) < 1e-5);
    }
}
