//! AdamW as `torch.optim.AdamW`, and gradient clipping by global L2 norm.

use std::cell::RefCell;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// Hugging Face Trainer's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments of one parameter, kept in float32 beside the float32 master weight.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Moments {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWState {
    pub step: u64,
    pub moments: Vec<Moments>,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub state: AdamWState,
    /// Per parameter: whether weight decay applies (not to biases and norm weights).
    decays: Vec<bool>,
}

/// Hugging Face Trainer exempts biases and normalisation weights from weight decay.
pub fn decays_weight(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

impl AdamW {
    pub fn new(config: AdamWConfig, names: &[String]) -> Self {
        Self {
            config,
            state: AdamWState {
                step: 0,
                moments: vec![Moments::default(); names.len()],
            },
            decays: names.iter().map(|n| decays_weight(n)).collect(),
        }
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (None: no gradient,
    /// the parameter is left alone as torch does). Every gradient is first multiplied by
    /// `grad_scale` when one is given: the clipping coefficient of [`clip_coefficient`], applied
    /// here, element by element as `clip_grad_norm_` would, instead of by a scaled copy of each
    /// gradient. The parameter and its moments are updated in place.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: Option<f64>,
    ) -> Result<()> {
        self.state.step += 1;
        let t = self.state.step as i32;
        let c = &self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let moments = &mut self.state.moments[i];
            if moments.exp_avg.is_empty() {
                moments.exp_avg = vec![0.0; grad.elem_count()];
                moments.exp_avg_sq = vec![0.0; grad.elem_count()];
            }
            let decay = if self.decays[i] {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            with_float32_values(grad, |grad| {
                var.inplace_op1(&Update {
                    grad,
                    grad_scale: grad_scale.map(|s| s as f32),
                    moments: RefCell::new(moments),
                    decay,
                    step_size: (lr / bias_correction1) as f32,
                    beta1: c.beta1 as f32,
                    beta2: c.beta2 as f32,
                    eps: c.eps as f32,
                    bias_correction2_sqrt: bias_correction2_sqrt as f32,
                })
            })??;
        }
        Ok(())
    }
}

/// One parameter's AdamW update, run on the parameter's own storage.
struct Update<'a> {
    grad: &'a [f32],
    grad_scale: Option<f32>,
    moments: RefCell<&'a mut Moments>,
    decay: f32,
    step_size: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bias_correction2_sqrt: f32,
}

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("AdamW updates float32 parameters");
        };
        if !layout.is_contiguous() || layout.shape().elem_count() != self.grad.len() {
            candle_core::bail!("AdamW needs a contiguous parameter the size of its gradient");
        }
        let params = &mut values[layout.start_offset()..][..self.grad.len()];
        let mut moments = self.moments.borrow_mut();
        let Moments {
            exp_avg,
            exp_avg_sq,
        } = &mut **moments;
        let (b1, b2) = (self.beta1, self.beta2);
        for (((p, &g), m1), m2) in params
            .iter_mut()
            .zip(self.grad)
            .zip(exp_avg.iter_mut())
            .zip(exp_avg_sq.iter_mut())
        {
            // `+ 0.0` as candle's affine computes a clipped gradient, so that a zero keeps its
            // sign exactly as with a scaled copy.
            let g = match self.grad_scale {
                Some(scale) => g * scale + 0.0,
                None => g,
            };
            *p *= self.decay;
            *m1 = b1 * *m1 + (1.0 - b1) * g;
            *m2 = b2 * *m2 + (1.0 - b2) * g * g;
            let denom = m2.sqrt() / self.bias_correction2_sqrt + self.eps;
            *p -= self.step_size * *m1 / denom;
        }
        Ok(())
    }
}

/// Sum of squares of every gradient: the square of the global L2 norm. Kept separate from
/// clipping so that shards can add their partial sums across ranks first. Summed in float64:
/// over millions of elements a float32 sum drifts by about 1e-4 relative, enough to move the
/// clipping coefficient away from torch's.
pub fn grad_sq_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += with_float32_values(g, |values| {
            values.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
        })?;
    }
    Ok(total)
}

/// Calls `f` with the float32 values of `t` in order, converted or made contiguous only when
/// they are not already.
fn with_float32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        candle_core::bail!("gradients are float32 tensors on the CPU");
    };
    Ok(f(
        &values[layout.start_offset()..][..layout.shape().elem_count()]
    ))
}

/// The factor that brings gradients of global norm `total_norm` to at most `max_norm`, as
/// `clip_grad_norm_` computes it (`max_norm / (norm + 1e-6)`); `None` when it would not shrink
/// them (torch caps it at 1).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (total_norm + 1e-6);
    (coef < 1.0).then_some(coef)
}
