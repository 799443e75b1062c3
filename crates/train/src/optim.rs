//! AdamW as `torch.optim.AdamW`, and gradient clipping by global L2 norm.

use candle_core::{DType, Result, Tensor, Var};
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
    /// the parameter is left alone as torch does).
    pub fn step(&mut self, vars: &[Var], grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.state.step += 1;
        let t = self.state.step as i32;
        let c = &self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = (lr / bias_correction1) as f32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let eps = c.eps as f32;
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let g = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let mut p = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            let m = &mut self.state.moments[i];
            if m.exp_avg.is_empty() {
                m.exp_avg = vec![0.0; p.len()];
                m.exp_avg_sq = vec![0.0; p.len()];
            }
            let decay = if self.decays[i] {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            };
            let bc2 = bias_correction2_sqrt as f32;
            for (((p, &g), m1), m2) in p
                .iter_mut()
                .zip(&g)
                .zip(m.exp_avg.iter_mut())
                .zip(m.exp_avg_sq.iter_mut())
            {
                *p *= decay;
                *m1 = b1 * *m1 + (1.0 - b1) * g;
                *m2 = b2 * *m2 + (1.0 - b2) * g * g;
                let denom = m2.sqrt() / bc2 + eps;
                *p -= step_size * *m1 / denom;
            }
            var.set(&Tensor::from_vec(p, var.shape(), var.device())?)?;
        }
        Ok(())
    }
}

/// Sum of squares of every gradient: the square of the global L2 norm. Kept separate from
/// clipping so that shards can add their partial sums across ranks first.
pub fn grad_sq_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0.0;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(total)
}

/// Scales gradients so their global norm is at most `max_norm`, as `clip_grad_norm_` does
/// (coefficient `max_norm / (norm + 1e-6)`, capped at 1).
pub fn clip_grads(grads: &mut [Option<Tensor>], total_norm: f64, max_norm: f64) -> Result<()> {
    let coef = max_norm / (total_norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(())
}
