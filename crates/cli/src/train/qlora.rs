//! QLoRA in `train`: the quantization the YAML asks for, and the refusals for checkpoints that
//! are quantized already (GPTQ, AWQ, ...), decided from config.json before any work starts.

use std::path::Path;

use anyhow::{bail, Result};
use ff_config::{FsdpConfig, QuantizationType, TrainArgs};
use ff_model::quant::{FourBitType, QuantFormat};
use ff_model::ModelConfig;

/// The format of `quantization_bit` / `quantization_type` / `double_quantization`, validated by
/// ff-config (4 with nf4 or fp4, or 8).
pub fn quant_format(args: &TrainArgs) -> Option<QuantFormat> {
    match args.quantization_bit? {
        8 => Some(QuantFormat::Int8Rowwise),
        _ => Some(QuantFormat::FourBit {
            kind: match args.quantization_type {
                QuantizationType::Nf4 => FourBitType::Nf4,
                QuantizationType::Fp4 => FourBitType::Fp4,
            },
            double_quant: args.double_quantization,
        }),
    }
}

/// Refuses a model directory whose config.json carries a `quantization_config`: quantizing it
/// again, training it under FSDP (GPTQ/AWQ cannot be sharded as FSDP+QLoRA shards bitsandbytes
/// weights), and training it at all, which is not supported.
pub fn refuse_prequantized(args: &TrainArgs, model_path: &Path) -> Result<()> {
    if !model_path.join("config.json").is_file() {
        return Ok(());
    }
    // A config.json that does not parse is reported, with its reason, when the model loads.
    let Ok(config) = ModelConfig::from_dir(model_path) else {
        return Ok(());
    };
    let Some(method) = config.quant_method else {
        return Ok(());
    };
    let dir = model_path.display();
    if args.quantization_bit.is_some() {
        bail!(
            "{dir} is already quantized ({method}, per its config.json quantization_config), so quantization_bit cannot quantize it again; remove quantization_bit, or use the float checkpoint with quantization_bit"
        );
    }
    if FsdpConfig::from_env()?.is_some() && method != "bitsandbytes" {
        bail!(
            "{dir} is a {} model, and GPTQ/AWQ models cannot be used with FSDP+QLoRA; use the float checkpoint with quantization_bit: 4 instead",
            method.to_uppercase()
        );
    }
    bail!(
        "training a pre-quantized model ({dir}, quant_method {method}) is not supported; use the float checkpoint, with quantization_bit for QLoRA"
    )
}
