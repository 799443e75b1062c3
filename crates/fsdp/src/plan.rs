//! Which parts of the model form each FSDP unit (accelerate's auto wrap policy).

use ff_config::AutoWrapPolicy;
use ff_model::ModelConfig;

use crate::error::FsdpError;
use ff_model::Part;

/// The decoder layer class transformers uses for `model_type`, the name
/// `fsdp_transformer_layer_cls_to_wrap` refers to.
pub fn decoder_layer_class(model_type: &str) -> String {
    let stem = match model_type {
        "qwen2" => "Qwen2",
        "qwen3" => "Qwen3",
        other => {
            let mut chars = other.chars();
            return match chars.next() {
                Some(first) => format!("{}{}DecoderLayer", first.to_uppercase(), chars.as_str()),
                None => "DecoderLayer".into(),
            };
        }
    };
    format!("{stem}DecoderLayer")
}

/// The units of a model, each a list of parts. The root unit (embedding, final norm and head)
/// comes first; it also takes the decoder layers no other unit wraps.
pub fn plan_units(
    config: &ModelConfig,
    policy: AutoWrapPolicy,
    layer_classes: &[String],
    min_num_params: u64,
) -> Result<Vec<Vec<Part>>, FsdpError> {
    let n = config.num_hidden_layers;
    let layer_unit = |i: usize| vec![Part::Layer(i)];
    let root = vec![Part::Embed, Part::Head];
    match policy {
        AutoWrapPolicy::NoWrap => {
            let mut all = vec![Part::Embed];
            all.extend((0..n).map(Part::Layer));
            all.push(Part::Head);
            Ok(vec![all])
        }
        AutoWrapPolicy::TransformerBased => {
            let class = decoder_layer_class(&config.model_type);
            if let Some(other) = layer_classes.iter().find(|c| c.trim() != class) {
                return Err(FsdpError::Config(format!(
                    "fsdp_transformer_layer_cls_to_wrap names `{}`, but this {} model's decoder layer is `{class}`; use `{class}` or leave the key out",
                    other.trim(),
                    config.model_type
                )));
            }
            let mut units = vec![root];
            units.extend((0..n).map(layer_unit));
            Ok(units)
        }
        AutoWrapPolicy::SizeBased => {
            let per_layer = layer_params(config);
            let mut units = vec![root];
            let mut current = Vec::new();
            let mut size = 0;
            for i in 0..n {
                current.push(Part::Layer(i));
                size += per_layer;
                if size >= min_num_params {
                    units.push(std::mem::take(&mut current));
                    size = 0;
                }
            }
            // Layers that never reached the threshold stay with the root, as unwrapped modules do.
            units[0].extend(current);
            Ok(units)
        }
    }
}

/// Parameters of one decoder layer (base weights, as the size policy counts them).
fn layer_params(c: &ModelConfig) -> u64 {
    let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
    let q = (c.num_attention_heads * c.head_dim) as u64;
    let kv = (c.num_key_value_heads * c.head_dim) as u64;
    h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h
}
