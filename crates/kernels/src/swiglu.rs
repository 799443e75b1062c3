//! `silu(gate) · up`, the MLP's gated activation, as one op with its own backward.
//!
//! From candle's ops it was a SiLU and a product, and SiLU's backward alone is half a dozen
//! passes over the `[tokens, intermediate]` activations; here forward is one pass and backward
//! another, which gives both inputs' gradients.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cast::{to_dtype, to_f32};
use crate::fast_exp::exp;
use crate::values::{contiguous, cpu_values, written};

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `gate` and `up` have one shape. On the CPU the fused op computes in float32 (half-precision
/// inputs are converted, and the result converted back); elsewhere candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    let f32 = |t: &Tensor| to_f32(t)?.contiguous();
    let out = f32(gate)?.apply_op2_arc(&f32(up)?, Arc::new(Box::new(SwiGlu)))?;
    to_dtype(&out, gate.dtype())
}

/// Refuses inputs of different lengths, part of whose outputs would go unwritten.
fn same_lengths(values: &[&[f32]]) -> Result<()> {
    if values.iter().any(|v| v.len() != values[0].len()) {
        let lengths: Vec<usize> = values.iter().map(|v| v.len()).collect();
        return Err(candle_core::Error::Msg(format!(
            "swiglu of inputs of different lengths {lengths:?}"
        )));
    }
    Ok(())
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(gate.as_slice::<f32>()?, gate_layout)?;
        let u = contiguous(up.as_slice::<f32>()?, up_layout)?;
        same_lengths(&[g, u])?;
        // SAFETY: y's chunks cover it, each as long as its g and u chunks, and every value of
        // each is written.
        let y = unsafe {
            written(g.len(), |y| {
                y.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                    .for_each(|(y, (g, u))| {
                        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                            y.write(g * sigmoid(g) * u);
                        }
                    })
            })
        };
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    /// Both gradients in one pass: `dgate = dy · up · silu'(gate)` with `silu'(g) = σ(g) · (1 +
    /// g · (1 − σ(g)))`, and `dup = dy · silu(gate)`.
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let (g_storage, g_layout) = gate.storage_and_layout();
        let (u_storage, u_layout) = up.storage_and_layout();
        let (dy_storage, dy_layout) = grad_y.storage_and_layout();
        let g = contiguous(cpu_values(&g_storage)?, g_layout)?;
        let u = contiguous(cpu_values(&u_storage)?, u_layout)?;
        let dy = contiguous(cpu_values(&dy_storage)?, dy_layout)?;
        same_lengths(&[g, u, dy])?;
        let mut grad_up = Vec::new();
        // SAFETY: the chunks of both gradients cover them, each as long as its g chunk, and
        // every value of each is written.
        let grad_gate = unsafe {
            written(g.len(), |grad_gate| {
                grad_up = written(g.len(), |grad_up| {
                    grad_gate
                        .par_chunks_mut(CHUNK)
                        .zip(grad_up.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .zip(u.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
                        .for_each(|(((dg, du), g), (u, dy))| {
                            // Equal lengths up front, so the loop runs without bounds checks.
                            let n = g.len();
                            let (dg, du, u, dy) = (&mut dg[..n], &mut du[..n], &u[..n], &dy[..n]);
                            for i in 0..n {
                                let s = sigmoid(g[i]);
                                dg[i].write(dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)));
                                du[i].write(dy[i] * g[i] * s);
                            }
                        })
                })
            })
        };
        Ok((
            Some(Tensor::from_vec(grad_gate, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(grad_up, up.shape(), up.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::sine;
    use candle_core::Var;

    #[test]
    fn equals_silu_times_up_forward_and_backward() {
        let values = |scale: f64, phase: f32| (sine((7, 33), phase) * scale).unwrap();
        let gate = Var::from_tensor(&values(4.0, 0.1)).unwrap();
        let up = Var::from_tensor(&values(2.0, 1.3)).unwrap();
        let upstream = values(1.0, 2.9);
        let ours = swiglu(gate.as_tensor(), up.as_tensor()).unwrap();
        let reference = (gate.as_tensor().silu().unwrap() * up.as_tensor()).unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-6);
        let g_ours = crate::test_util::grads_of(ours, &upstream);
        let g_ref = crate::test_util::grads_of(reference, &upstream);
        for v in [&gate, &up] {
            assert!(diff(g_ours.get(v).unwrap(), g_ref.get(v).unwrap()) < 1e-5);
        }
    }
}
