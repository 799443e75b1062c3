//! LoRA adapters in PEFT's on-disk layout: `adapter_config.json` + `adapter_model.safetensors`,
//! tensor names `base_model.model.<module>.lora_{A,B}.weight`, so `PeftModel.from_pretrained`
//! loads what we save and we continue training what PEFT saved.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use ff_fsio::{write_json, JsonEnding};
use serde_json::{json, Value};

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::finetune::{apply_lora, LoraSpec, LINEAR_MODULES};
use crate::safetensors_io::{save_atomic, SafetensorsFiles};

pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
const PEFT_PREFIX: &str = "base_model.model.";

/// Reads the LoRA hyper-parameters of a saved adapter.
pub fn read_adapter_config(dir: &Path) -> Result<LoraSpec> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::config(&path, format!("is not valid JSON ({e})")))?;
    let err = |m: String| ModelError::config(&path, m);
    match v.get("peft_type").and_then(Value::as_str) {
        Some("LORA") | None => {}
        Some(other) => {
            return Err(err(format!(
                "peft_type `{other}` is not supported; only LORA adapters can be loaded"
            )))
        }
    }
    if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(err("DoRA adapters (use_dora) are not supported".into()));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(err(format!(
                "`{key}` is not supported; all adapters must share r and lora_alpha"
            )));
        }
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| err("needs a positive integer `r`".into()))? as usize;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let targets: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => LoraSpec::parse_targets(s)?,
        _ => return Err(err("needs `target_modules`".into())),
    };
    for t in &targets {
        if !LINEAR_MODULES.contains(&t.as_str()) {
            return Err(err(format!(
                "target module `{t}` is not a Linear of the decoder layers ({})",
                LINEAR_MODULES.join(", ")
            )));
        }
    }
    let targets = LINEAR_MODULES
        .iter()
        .filter(|m| targets.iter().any(|t| t == *m))
        .map(|m| m.to_string())
        .collect();
    Ok(LoraSpec {
        rank,
        alpha,
        dropout,
        targets,
        use_rslora: v
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
    })
}

/// Attaches the adapter saved in `dir` to `model`, replacing any adapter it had, and returns its
/// hyper-parameters. Every tensor the adapter should have must be in the file with the right
/// shape, and the file must hold nothing else.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<LoraSpec> {
    let spec = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS);
    if !path.exists() {
        return Err(ModelError::file(
            &path,
            "does not exist; adapter_name_or_path must hold adapter_model.safetensors",
        ));
    }
    let file = SafetensorsFiles::open(std::slice::from_ref(&path))?;
    apply_lora(model, &spec, 0)?;
    let mut expected = BTreeSet::new();
    for (name, var) in model.trainable_params() {
        if !name.contains(".lora_") {
            continue;
        }
        let key = format!("{PEFT_PREFIX}{name}");
        let tensor = file.load(&key, Some(var.dims()), DType::F32, &model.device)?;
        var.set(&tensor)?;
        expected.insert(key);
    }
    let mut unknown: Vec<&str> = file.names().filter(|n| !expected.contains(*n)).collect();
    unknown.sort();
    if let Some(first) = unknown.first() {
        return Err(ModelError::tensor(
            &path,
            *first,
            format!(
                "is not part of a LoRA adapter on {} of this model; the adapter was made for another model or config",
                spec.targets.join(", ")
            ),
        ));
    }
    Ok(spec)
}

/// Writes the model's adapters to `dir` in PEFT's layout (each file atomically).
pub fn save_adapter(
    model: &mut CausalLm,
    spec: &LoraSpec,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, var) in model.trainable_params() {
        if name.contains(".lora_") {
            tensors.push((name, var.as_tensor().clone()));
        }
    }
    save_adapter_weights(&tensors, dir)?;
    write_adapter_config(spec, base_model_name_or_path, dir)
}

/// Writes adapter tensors, named as [`CausalLm::trainable_params`] names them, as PEFT's
/// `adapter_model.safetensors` in `dir`.
pub fn save_adapter_weights(tensors: &[(String, Tensor)], dir: &Path) -> Result<()> {
    let prefixed: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(name, t)| (format!("{PEFT_PREFIX}{name}"), t.clone()))
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_atomic(&prefixed, Some(metadata), &dir.join(ADAPTER_WEIGHTS))
}

/// Writes PEFT's `adapter_config.json` for `spec` in `dir`.
pub fn write_adapter_config(
    spec: &LoraSpec,
    base_model_name_or_path: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let config = json!({
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": spec.alpha,
        "lora_bias": false,
        "lora_dropout": spec.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": null,
        "target_modules": spec.targets,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": spec.use_rslora,
    });
    Ok(write_json(
        &dir.join(ADAPTER_CONFIG),
        &config,
        JsonEnding::Bracket,
    )?)
}
