//! `x Wᵀ` for a weight that trains (full fine-tuning), as one op with its own backward.
//!
//! From candle's ops the product was a reshape of `x` to rows, a transposed view of `W`, the
//! product and a reshape back, and backward walked all four: each node's gradient is a zeroed
//! buffer plus an add, and the transposes made copies. Here `x` is read as rows in place, and
//! backward forms the input's gradient `dy W` and the weight's `dyᵀ x` straight from `dy`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor, D};

use crate::strided::{
    overwritten, product, readable_as_matrix, rows_and_width, with_width, Operand, Threads,
};
use crate::values::{cpu_values, kept_values};
use crate::{weight_grads, Output};

/// `x` is `[..., k]` and `w` the trained float32 `[n, k]`; returns `x wᵀ` as `[..., n]`.
/// `None` when the op has no kernel for these tensors (off the CPU, or not float32), and the
/// caller uses candle's ops. With [`Output::Unread`] the result is zeros and only the backward
/// works.
pub fn trained_product(x: &Tensor, w: &Tensor, output: Output) -> Result<Option<Tensor>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.rank() < 2 || x.dim(D::Minus1)? != k {
        return Err(Error::Msg(format!(
            "product of an input of shape {:?} with a weight of shape {:?}",
            x.shape(),
            w.shape()
        )));
    }
    let op = Arc::new(Box::new(TrainedProduct {
        out_features: n,
        output,
    }) as Box<_>);
    Ok(Some(readable_as_matrix(x.clone())?.apply_op2_arc(w, op)?))
}

struct TrainedProduct {
    out_features: usize,
    output: Output,
}

impl CustomOp2 for TrainedProduct {
    fn name(&self) -> &'static str {
        "trained-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        w: &CpuStorage,
        w_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((m, k), n) = (rows_and_width(x_layout.shape()), self.out_features);
        let shape = with_width(x_layout.shape(), n);
        match &self.output {
            Output::Unread => return Ok((CpuStorage::F32(vec![0.0; m * n]), shape)),
            Output::Kept(y) => return Ok((CpuStorage::F32(kept_values(y, m * n)?), shape)),
            Output::Values => {}
        }
        let x = Operand::matrix(x.as_slice()?, x_layout)?;
        let w = Operand::matrix(w.as_slice()?, w_layout)?;
        // SAFETY: x is m × k and w is n × k as their views say; the product writes all m × n.
        let y = unsafe {
            overwritten(m * n, |y| {
                product((m, n, k), y, n, false, x, w.t(), 1.0, Threads::Pool)
            })
        };
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let ((m, k), n) = (rows_and_width(x.shape()), self.out_features);
        let grad_y = grad_y.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = w.storage_and_layout();
        let (dy_storage, dy_layout) = grad_y.storage_and_layout();
        let x_op = Operand::matrix(cpu_values(&x_storage)?, x_layout)?;
        let w_op = Operand::matrix(cpu_values(&w_storage)?, w_layout)?;
        let dy = Operand::matrix(cpu_values(&dy_storage)?, dy_layout)?;
        // SAFETY: every operand is read through its own layout; each product writes all of the
        // row-major result it fills.
        let (dx, dw) = unsafe {
            // dx = dy W, [m, k]
            let dx = overwritten(m * k, |out| {
                product((m, k, n), out, k, false, dy, w_op, 1.0, Threads::Pool)
            });
            // dW = dyᵀ x, [n, k]
            let dw = overwritten(n * k, |out| {
                product((n, k, m), out, k, false, dy.t(), x_op, 1.0, Threads::Pool)
            });
            (dx, dw)
        };
        let device = x.device();
        let dw = weight_grads::offer(w, Tensor::from_vec(dw, (n, k), device)?);
        Ok((Some(Tensor::from_vec(dx, x.shape(), device)?), dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{grads_of, max_abs_diff, sine};
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_ops_forward_and_backward() {
        let (b, s, k, n) = (2, 19, 24, 13);
        let x = Var::from_tensor(&sine((b * s, k), 0.3).reshape((b, s, k)).unwrap()).unwrap();
        // W read through a transposed view: the op must follow its strides.
        let w_stored = Var::from_tensor(&sine((k, n), 1.1)).unwrap();
        let w = w_stored.as_tensor().t().unwrap();
        let upstream = sine((b * s, n), 2.2).reshape((b, s, n)).unwrap();

        let ours = trained_product(x.as_tensor(), &w, Output::Values)
            .unwrap()
            .unwrap();
        assert_eq!(ours.dims(), &[b, s, n]);
        let reference = x
            .as_tensor()
            .reshape((b * s, k))
            .unwrap()
            .matmul(&w.t().unwrap())
            .unwrap()
            .reshape((b, s, n))
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-5);
        let kept_values = (&ours * 3.0).unwrap().detach();
        let (g_ours, g_ref) = (grads_of(ours, &upstream), grads_of(reference, &upstream));
        // Unread: zeros, and the same gradients.
        let unread = trained_product(x.as_tensor(), &w, Output::Unread)
            .unwrap()
            .unwrap();
        assert_eq!(unread.dims(), &[b, s, n]);
        assert_eq!(max_abs_diff(&unread, &unread.zeros_like().unwrap()), 0.0);
        let g_unread = grads_of(unread, &upstream);
        // Kept: the values handed in, and the same gradients.
        let kept = trained_product(x.as_tensor(), &w, Output::Kept(kept_values.clone()))
            .unwrap()
            .unwrap();
        assert_eq!(max_abs_diff(&kept, &kept_values), 0.0);
        let g_kept = grads_of(kept, &upstream);
        for var in [&x, &w_stored] {
            let (got, want) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(
                max_abs_diff(got, want) < 1e-4,
                "{}",
                max_abs_diff(got, want)
            );
            assert_eq!(max_abs_diff(g_unread.get(var).unwrap(), got), 0.0);
            assert_eq!(max_abs_diff(g_kept.get(var).unwrap(), got), 0.0);
        }
        let wrong = Tensor::zeros((b, s, n + 1), DType::F32, &Device::Cpu).unwrap();
        let err = trained_product(x.as_tensor(), &w, Output::Kept(wrong)).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn other_dtypes_are_left_to_candle_and_mismatched_widths_refused() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::BF16, &dev).unwrap();
        assert!(trained_product(&x, &w, Output::Values).unwrap().is_none());
        let w = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let err = trained_product(&x, &w, Output::Values).unwrap_err();
        assert!(err.to_string().contains("product of an input"), "{err}");
    }
}
