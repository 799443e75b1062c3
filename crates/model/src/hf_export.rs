//! Writing a model as a Hugging Face model directory, with LoRA merged into the base: what
//! `llamafactory-cli export` (PEFT's `merge_and_unload` + transformers' `save_pretrained`) writes.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use ff_fsio::{write_json, JsonEnding};
use serde_json::{json, Map, Value};

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::param::Param;
use crate::safetensors_io::save_atomic;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Folds every adapter into its base weight, `W + scale · B A`, computed in float32 and cast back
/// to the weight's dtype, and removes the adapters. A quantized base is refused, as
/// LLaMA-Factory refuses it: merging would need a float base.
pub fn merge_lora(model: &mut CausalLm) -> Result<()> {
    for layer in &mut model.layers {
        let index = layer.index;
        for (path, linear) in layer.linears_mut() {
            let Some(lora) = linear.lora.take() else {
                continue;
            };
            if let Param::Quantized(_) = linear.weight {
                return Err(ModelError::Unsupported(format!(
                    "cannot merge adapters into a quantized model (model.layers.{index}.{path} is quantized); load the float base to merge"
                )));
            }
            let dtype = linear.weight.tensor().dtype();
            let w32 = linear.weight.in_dtype(DType::F32)?;
            let delta = lora
                .b
                .as_tensor()
                .matmul(lora.a.as_tensor())?
                .affine(lora.scale, 0.0)?;
            linear.weight = Param::Frozen((w32 + delta)?.to_dtype(dtype)?);
        }
    }
    Ok(())
}

/// The `torch_dtype` a config.json declares (`dtype` in transformers 5), float32 when absent.
pub fn declared_dtype(config: &Map<String, Value>) -> Result<DType> {
    let name = config
        .get("dtype")
        .or_else(|| config.get("torch_dtype"))
        .and_then(Value::as_str)
        .unwrap_or("float32");
    match name {
        "float32" => Ok(DType::F32),
        "bfloat16" => Ok(DType::BF16),
        "float16" => Ok(DType::F16),
        other => Err(ModelError::Unsupported(format!(
            "config.json declares dtype `{other}`; only float32, bfloat16 and float16 models can be written"
        ))),
    }
}

/// Writes the model's weights in `dtype` into `dir` (which must exist) as transformers'
/// `save_pretrained` lays them out: `model.safetensors`, or, past `max_shard_bytes`,
/// `model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json`, tensors kept
/// in order and a new shard started when the next tensor would not fit. Also writes config.json
/// with the dtype updated.
pub fn save_model_dir(
    model: &mut CausalLm,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: u64,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, p) in model.params_mut() {
        if let Param::Quantized(_) = p {
            return Err(ModelError::Unsupported(format!(
                "`{name}` is quantized; only float models can be written"
            )));
        }
        tensors.push((name, p.in_dtype(dtype)?));
    }
    let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let n = size(&t);
        let last = shards.last_mut().expect("at least one shard");
        if !last.is_empty() && current + n > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += n;
        shards
            .last_mut()
            .expect("at least one shard")
            .push((name, t));
    }
    let metadata = || Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if shards.len() == 1 {
        save_atomic(&shards[0], metadata(), &dir.join(SINGLE_FILE))?;
    } else {
        let count = shards.len();
        let mut weight_map = Map::new();
        let mut total = 0u64;
        for (i, shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            for (name, t) in shard {
                total += size(t);
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
            save_atomic(shard, metadata(), &dir.join(&file))?;
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join(INDEX_FILE), &index, JsonEnding::Bracket)?;
    }
    let mut config = model.config.raw.clone();
    let dtype_name = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    // transformers 4 reads `torch_dtype`, 5 writes `dtype`; both are kept in step.
    config.insert("torch_dtype".into(), Value::String(dtype_name.into()));
    if config.contains_key("dtype") {
        config.insert("dtype".into(), Value::String(dtype_name.into()));
    }
    config.remove("quantization_config");
    Ok(write_json(
        &dir.join("config.json"),
        &Value::Object(config),
        JsonEnding::Bracket,
    )?)
}

/// generation_config.json as transformers derives it from a model config (the token ids).
pub fn generation_config(config: &Map<String, Value>) -> Value {
    let mut out = Map::new();
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    Value::Object(out)
}
