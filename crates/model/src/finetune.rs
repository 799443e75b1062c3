//! Turning a loaded, frozen model into one that trains: LoRA adapters, full, or freeze tuning,
//! with LLaMA-Factory's meanings for its keys.

use candle_core::{DType, Tensor, Var};

use crate::causal_lm::CausalLm;
use crate::dropout::derive_seed;
use crate::error::{ModelError, Result};
use crate::linear::Lora;

/// The short names of every Linear inside a decoder layer, in the order PEFT lists them.
pub const LINEAR_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Short module names (`q_proj`, ...) that get an adapter.
    pub targets: Vec<String>,
    pub use_rslora: bool,
}

impl LoraSpec {
    /// `lora_target` as LLaMA-Factory reads it: `all`, or a comma list of module names.
    pub fn parse_targets(lora_target: &str) -> Result<Vec<String>> {
        let names: Vec<String> = lora_target
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() || names.iter().any(|n| n == "all") {
            return Ok(LINEAR_MODULES.iter().map(|s| s.to_string()).collect());
        }
        for name in &names {
            if !LINEAR_MODULES.contains(&name.as_str()) {
                return Err(ModelError::Unsupported(format!(
                    "lora_target `{name}` names no Linear of the decoder layers; use `all` or some of {}",
                    LINEAR_MODULES.join(", ")
                )));
            }
        }
        Ok(names)
    }

    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

/// Attaches fresh adapters as PEFT initialises them: `A` Kaiming-uniform (bound 1/√in, from
/// `seed`; torch's generator is not reproduced), `B` zero, so training starts from the base model.
pub fn apply_lora(model: &mut CausalLm, spec: &LoraSpec, seed: u64) -> Result<()> {
    let device = model.device.clone();
    for layer in &mut model.layers {
        let layer_index = layer.index as u64;
        for (site, (path, linear)) in layer.linears_mut().into_iter().enumerate() {
            let short = path.rsplit('.').next().unwrap_or(path);
            if !spec.targets.iter().any(|t| t == short) {
                continue;
            }
            let (out, inp) = (linear.out_features(), linear.in_features());
            let bound = 1.0 / (inp as f64).sqrt();
            let mut state = derive_seed(seed, layer_index * 64 + site as u64);
            let a: Vec<f32> = (0..spec.rank * inp)
                .map(|_| {
                    let u = uniform01(&mut state);
                    ((2.0 * u - 1.0) * bound) as f32
                })
                .collect();
            linear.lora = Some(Lora {
                a: Var::from_tensor(&Tensor::from_vec(a, (spec.rank, inp), &device)?)?,
                b: Var::zeros((out, spec.rank), DType::F32, &device)?,
                scale: spec.scale(),
                dropout: spec.dropout,
            });
        }
    }
    Ok(())
}

fn uniform01(state: &mut u64) -> f64 {
    *state = derive_seed(*state, 1);
    (*state >> 11) as f64 / (1u64 << 53) as f64
}

/// Full fine-tuning: every parameter trains, in float32.
pub fn make_all_trainable(model: &mut CausalLm) -> Result<()> {
    for (_, p) in model.params_mut() {
        p.make_trainable()?;
    }
    Ok(())
}

/// Freeze tuning as LLaMA-Factory does it: only the chosen modules of the last
/// `trainable_layers` layers (the first ones when negative) train; `extra_modules` names
/// non-layer modules (`embed_tokens`, `norm`, `lm_head`) that train too.
pub fn apply_freeze(
    model: &mut CausalLm,
    trainable_layers: i64,
    trainable_modules: &[String],
    extra_modules: &[String],
) -> Result<()> {
    let n = model.layers.len();
    let chosen: Vec<usize> = if trainable_layers > 0 {
        (n.saturating_sub(trainable_layers as usize)..n).collect()
    } else {
        (0..(trainable_layers.unsigned_abs() as usize).min(n)).collect()
    };
    const LAYER_MODULES: &[&str] = &[
        "self_attn",
        "mlp",
        "input_layernorm",
        "post_attention_layernorm",
    ];
    for m in trainable_modules {
        if m != "all" && !LAYER_MODULES.contains(&m.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "freeze_trainable_modules `{m}` is not a module of the decoder layers; use `all` or some of {}",
                LAYER_MODULES.join(", ")
            )));
        }
    }
    const EXTRA_MODULES: &[&str] = &["embed_tokens", "norm", "lm_head"];
    for m in extra_modules {
        if !EXTRA_MODULES.contains(&m.as_str()) {
            return Err(ModelError::Unsupported(format!(
                "freeze_extra_modules `{m}` is not a module outside the decoder layers; use some of {}",
                EXTRA_MODULES.join(", ")
            )));
        }
    }
    let layer_prefixes: Vec<String> = chosen
        .iter()
        .flat_map(|i| {
            trainable_modules.iter().map(move |m| {
                if m == "all" {
                    format!("model.layers.{i}.")
                } else {
                    format!("model.layers.{i}.{m}.")
                }
            })
        })
        .collect();
    for (name, p) in model.params_mut() {
        let in_layer = layer_prefixes.iter().any(|prefix| name.starts_with(prefix));
        let extra = !name.starts_with("model.layers.")
            && extra_modules
                .iter()
                .any(|m| name.split('.').rev().nth(1) == Some(m.as_str()));
        if in_layer || extra {
            p.make_trainable()?;
        }
    }
    Ok(())
}
