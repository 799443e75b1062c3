//! `x / sqrt(mean(x²) + eps)` over the last axis in float32, as one op with its own backward.
//!
//! From candle's ops it was square, mean, add, sqrt, reciprocal and a broadcast product, six
//! passes forward and their backwards, twice per decoder layer and pass; here it is one pass per
//! row each way, rows in parallel.

use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Error, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;

/// `x` is float32 `[..., width]`.
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        // The op has only a float32 CPU kernel; elsewhere candle's ops compute the same.
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&inv_rms);
    }
    x.contiguous()?
        .apply_op1_arc(Arc::new(Box::new(RmsNormalize { eps })))
}

/// The contiguous float32 values of a storage.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("rms normalize needs contiguous inputs".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps as f32).sqrt()
}

fn width(layout: &Layout) -> Result<usize> {
    layout
        .shape()
        .dims()
        .last()
        .copied()
        .ok_or_else(|| Error::Msg("rms normalize needs at least one dimension".into()))
}

struct RmsNormalize {
    eps: f64,
}

impl CustomOp1 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = width(layout)?;
        let x = f32_slice(x, layout)?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(width)
            .zip(x.par_chunks(width))
            .for_each(|(y, x)| {
                let r = inv_rms(x, self.eps);
                y.iter_mut().zip(x).for_each(|(y, x)| *y = x * r);
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let grad_y = grad_y.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(
            &grad_y,
            &RmsNormalizeGrad { eps: self.eps },
        )?))
    }
}

/// `r · (dy − y · mean(dy ⊙ y))` per row, with `r = 1/rms(x)` and `y = r · x`.
struct RmsNormalizeGrad {
    eps: f64,
}

impl CustomOp2 for RmsNormalizeGrad {
    fn name(&self) -> &'static str {
        "rms-normalize-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad_y: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = width(x_layout)?;
        let x = f32_slice(x, x_layout)?;
        let grad_y = f32_slice(grad_y, grad_layout)?;
        let mut grad_x = vec![0f32; x.len()];
        grad_x
            .par_chunks_mut(width)
            .zip(x.par_chunks(width).zip(grad_y.par_chunks(width)))
            .for_each(|(gx, (x, gy))| {
                let r = inv_rms(x, self.eps);
                let mean_dot = r * x.iter().zip(gy).map(|(x, g)| x * g).sum::<f32>() / width as f32;
                for ((gx, &x), &g) in gx.iter_mut().zip(x).zip(gy) {
                    *gx = r * (g - x * r * mean_dot);
                }
            });
        Ok((CpuStorage::F32(grad_x), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap()).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let eps = 1e-5;
        let ours = rms_normalize(x.as_tensor(), eps).unwrap();
        let inv = (x
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap()
            + eps)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let reference = x.as_tensor().broadcast_mul(&inv).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-6);
        let g_ours = crate::test_util::grads_of(ours, &upstream);
        let g_ref = crate::test_util::grads_of(reference, &upstream);
        assert!(diff(g_ours.get(&x).unwrap(), g_ref.get(&x).unwrap()) < 1e-5);
    }
}
