//! `silu(gate) · up`, the MLP's gated activation, as one op with its own backward.
//!
//! From candle's ops it was a SiLU and a product, and SiLU's backward alone is half a dozen
//! passes over the `[tokens, intermediate]` activations; here forward is one pass and backward
//! two (one per input's gradient).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::fast_exp::exp;
use crate::narrow::{narrow, widen};
use crate::strided_product::contiguous;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `gate` and `up` have one shape. On the CPU the fused op computes in float32 (half-precision
/// inputs are converted, and the result converted back); elsewhere candle's ops.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu() {
        return gate.silu()? * up;
    }
    let f32 = |t: &Tensor| widen(t)?.contiguous();
    let out = f32(gate)?.apply_op2_arc(&f32(up)?, Arc::new(Box::new(SwiGlu)))?;
    narrow(&out, gate.dtype())
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `out[i] = f(a[i], b[i], c[i])` over equal-length slices, in parallel.
fn map3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK)))
        .for_each(|((o, a), (b, c))| {
            for (((o, &a), &b), &c) in o.iter_mut().zip(a).zip(b).zip(c) {
                *o = f(a, b, c);
            }
        });
    out
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
        let (g, u) = (
            contiguous(gate.as_slice::<f32>()?, gate_layout)?,
            contiguous(up.as_slice::<f32>()?, up_layout)?,
        );
        let y = map3(g, u, u, |g, u, _| g * sigmoid(g) * u);
        Ok((CpuStorage::F32(y), gate_layout.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_y = grad_y.contiguous()?;
        let grad_gate = gate.apply_op3_no_bwd(up, &grad_y, &GateGrad)?;
        let grad_up = gate.apply_op2_no_bwd(&grad_y, &UpGrad)?;
        Ok((Some(grad_gate), Some(grad_up)))
    }
}

/// `dy · up · silu'(gate)`, with `silu'(g) = σ(g) · (1 + g · (1 − σ(g)))`.
struct GateGrad;

impl CustomOp3 for GateGrad {
    fn name(&self) -> &'static str {
        "swiglu-gate-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        up: &CpuStorage,
        up_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(gate.as_slice::<f32>()?, gate_layout)?;
        let u = contiguous(up.as_slice::<f32>()?, up_layout)?;
        let dy = contiguous(grad.as_slice::<f32>()?, grad_layout)?;
        let out = map3(g, u, dy, |g, u, dy| {
            let s = sigmoid(g);
            dy * u * s * (1.0 + g * (1.0 - s))
        });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// `dy · silu(gate)`.
struct UpGrad;

impl CustomOp2 for UpGrad {
    fn name(&self) -> &'static str {
        "swiglu-up-grad"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        gate_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = contiguous(gate.as_slice::<f32>()?, gate_layout)?;
        let dy = contiguous(grad.as_slice::<f32>()?, grad_layout)?;
        let out = map3(g, dy, dy, |g, dy, _| dy * g * sigmoid(g));
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_silu_times_up_forward_and_backward() {
        let dev = Device::Cpu;
        // Fixed inputs (candle's CPU randn cannot be seeded): a failure must repeat.
        let values = |scale: f32, phase: f32| -> Tensor {
            let v: Vec<f32> = (0..7 * 33)
                .map(|i| scale * (i as f32 * 0.37 + phase).sin())
                .collect();
            Tensor::from_vec(v, (7, 33), &dev).unwrap()
        };
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
