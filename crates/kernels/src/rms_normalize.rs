//! `weight ⊙ x / sqrt(mean(x²) + eps)` over the last axis in float32, as one op with its own
//! backward.
//!
//! From candle's ops it was square, mean, add, sqrt, reciprocal and two broadcast products,
//! seven passes forward and their backwards, twice per decoder layer and pass; here it is one
//! pass per row each way, rows in parallel, and the graph keeps no normalized copy before the
//! weight.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::lanes;
use crate::values::{contiguous, cpu_values, written};

/// `x` is float32 `[..., width]`, `weight` float32 `[width]`; `weight_trains` says whether the
/// backward forms the weight's gradient.
pub fn rms_normalize(x: &Tensor, weight: &Tensor, eps: f64, weight_trains: bool) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        // The op has only a float32 CPU kernel; elsewhere candle's ops compute the same.
        let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
        return x.broadcast_mul(&inv_rms)?.broadcast_mul(weight);
    }
    let op = RmsNormalize { eps, weight_trains };
    x.contiguous()?
        .apply_op2_arc(&weight.contiguous()?, Arc::new(Box::new(op)))
}

/// Rows whose weight gradients one task sums before the tasks' sums are added.
const ROWS_PER_PARTIAL_SUM: usize = 64;

/// `1 / sqrt(mean(row²) + eps)`.
fn inv_rms(row: &[f32], eps: f64) -> f32 {
    let mean = lanes::dot(row, row) / row.len() as f32;
    1.0 / (mean + eps as f32).sqrt()
}

struct RmsNormalize {
    eps: f64,
    weight_trains: bool,
}

impl CustomOp2 for RmsNormalize {
    fn name(&self) -> &'static str {
        "rms-normalize"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(x.as_slice::<f32>()?, x_layout)?;
        let weight = contiguous(weight.as_slice::<f32>()?, weight_layout)?;
        let width = weight.len();
        if width == 0 || x_layout.dims().last() != Some(&width) {
            return Err(Error::Msg(format!(
                "rms normalize of {:?} with a weight of {width}",
                x_layout.shape()
            )));
        }
        // SAFETY: y's rows cover it, x's are as long (x's length is a multiple of the width,
        // its last dimension), and every value of each is written.
        let y = unsafe {
            written(x.len(), |y| {
                y.par_chunks_mut(width)
                    .zip(x.par_chunks(width))
                    .for_each(|(y, x)| {
                        let r = inv_rms(x, self.eps);
                        for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                            y.write(w * (x * r));
                        }
                    })
            })
        };
        Ok((CpuStorage::F32(y), x_layout.shape().clone()))
    }

    /// With `r = 1/rms(x)`, `n = r · x` and `g = weight ⊙ dy` per row: `dx = r · (g − n ·
    /// mean(g ⊙ n))`, and `dweight = Σ_rows dy ⊙ n`.
    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (w_storage, w_layout) = weight.storage_and_layout();
        let (dy_storage, dy_layout) = grad_y.storage_and_layout();
        let x_values = contiguous(cpu_values(&x_storage)?, x_layout)?;
        let w = contiguous(cpu_values(&w_storage)?, w_layout)?;
        let dy = contiguous(cpu_values(&dy_storage)?, dy_layout)?;
        let width = w.len();
        // Writes every value of a row of dx.
        let row_grad = |dx: &mut [MaybeUninit<f32>], x: &[f32], dy: &[f32]| -> f32 {
            let r = inv_rms(x, self.eps);
            let mean_dot = r * lanes::dot3(x, w, dy) / width as f32;
            for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                dx.write(r * (w * g - x * r * mean_dot));
            }
            r
        };
        if dy.len() != x_values.len() || !x_values.len().is_multiple_of(width) {
            return Err(Error::Msg(format!(
                "rms normalize's gradient of {:?} for an input of {:?}",
                dy_layout.shape(),
                x_layout.shape()
            )));
        }
        // The weight's gradient in fixed blocks of rows, each summed in order and then added in
        // block order: it has the same bits however rayon schedules the blocks, which an
        // adaptive fold and reduce does not give (a resumed run would drift from an
        // uninterrupted one).
        let block = ROWS_PER_PARTIAL_SUM * width;
        let mut partials: Vec<Vec<f32>> = Vec::new();
        // SAFETY: dx's rows cover it, x's and dy's are as long, and row_grad writes every value
        // of each.
        let dx = unsafe {
            written(x_values.len(), |dx| {
                if self.weight_trains {
                    partials = dx
                        .par_chunks_mut(block)
                        .zip(x_values.par_chunks(block).zip(dy.par_chunks(block)))
                        .map(|(dx, (x, dy))| {
                            let mut sum = vec![0f32; width];
                            for (dx, (x, dy)) in dx
                                .chunks_mut(width)
                                .zip(x.chunks(width).zip(dy.chunks(width)))
                            {
                                let r = row_grad(dx, x, dy);
                                for ((s, &x), &g) in sum.iter_mut().zip(x).zip(dy) {
                                    *s += g * (x * r);
                                }
                            }
                            sum
                        })
                        .collect();
                } else {
                    dx.par_chunks_mut(width)
                        .zip(x_values.par_chunks(width).zip(dy.par_chunks(width)))
                        .for_each(|(dx, (x, dy))| {
                            row_grad(dx, x, dy);
                        });
                }
            })
        };
        let grad_weight = if self.weight_trains {
            let mut sum = vec![0f32; width];
            for partial in &partials {
                sum.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
            }
            Some(Tensor::from_vec(sum, width, weight.device())?)
        } else {
            None
        };
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            grad_weight,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::normal;
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_ops_forward_and_backward() {
        let x = Var::from_tensor(&normal((3, 5, 16), 0.0, 1.0, 1)).unwrap();
        let weight = Var::from_tensor(&normal(16, 1.0, 0.1, 2)).unwrap();
        let upstream = normal((3, 5, 16), 0.0, 1.0, 3);
        let eps = 1e-5;
        let ours = rms_normalize(x.as_tensor(), weight.as_tensor(), eps, true).unwrap();
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
        let reference = x
            .as_tensor()
            .broadcast_mul(&inv)
            .unwrap()
            .broadcast_mul(weight.as_tensor())
            .unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-6);
        let g_ours = crate::test_util::grads_of(ours, &upstream);
        let g_ref = crate::test_util::grads_of(reference, &upstream);
        for var in [&x, &weight] {
            let (got, want) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(diff(got, want) < 1e-5, "{}", diff(got, want));
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&normal((4, 8), 0.0, 1.0, 4)).unwrap();
        let weight = Tensor::ones(8, DType::F32, &dev).unwrap();
        let y = rms_normalize(x.as_tensor(), &weight, 1e-6, false).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&weight).is_none());
    }

    #[test]
    fn the_weight_gradient_has_the_same_bits_on_any_number_of_threads() {
        let x = Var::from_tensor(&normal((1000, 32), 0.0, 1.0, 5)).unwrap();
        let weight = Var::from_tensor(&normal(32, 1.0, 0.1, 6)).unwrap();
        let upstream = normal((1000, 32), 0.0, 1.0, 7);
        let weight_grad_bits = |threads: usize| -> Vec<u32> {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = rms_normalize(x.as_tensor(), weight.as_tensor(), 1e-5, true).unwrap();
                let grads = crate::test_util::grads_of(y, &upstream);
                let g = grads.get(&weight).unwrap().to_vec1::<f32>().unwrap();
                g.iter().map(|v| v.to_bits()).collect()
            })
        };
        let one = weight_grad_bits(1);
        for threads in [2, 3, 7] {
            for _ in 0..5 {
                assert_eq!(weight_grad_bits(threads), one, "{threads} threads");
            }
        }
    }
}
