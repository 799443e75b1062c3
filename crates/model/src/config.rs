//! `config.json` of a Hugging Face model directory, read into the few numbers the decoder needs.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{ModelError, Result};

/// Architectures whose decoder layer is the llama one, up to the switches in [`ModelConfig`].
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2", "qwen3"];

/// How rotary position frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// The embedding row that lookups never train: transformers builds the table as
    /// `nn.Embedding(padding_idx=pad_token_id)`.
    pub pad_token_id: Option<u32>,
    /// Bias on q, k and v projections (always on for qwen2).
    pub attention_bias: bool,
    pub mlp_bias: bool,
    /// Per-head RMSNorm on queries and keys before rotary embedding (qwen3).
    pub qk_norm: bool,
    /// `quantization_config.quant_method` of a pre-quantized checkpoint, if any.
    pub quant_method: Option<String>,
    /// The file as read, so that saving a full model writes back every key it had.
    pub raw: Map<String, Value>,
}

impl ModelConfig {
    /// Reads `config.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        Self::from_json_str(&text, &path)
    }

    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ModelError::config(path, format!("is not valid JSON ({e})")))?;
        let Value::Object(raw) = value else {
            return Err(ModelError::config(path, "must hold a JSON object"));
        };
        let reader = Reader { path, raw: &raw };
        reader.build()
    }

    pub fn num_kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

struct Reader<'a> {
    path: &'a Path,
    raw: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::config(PathBuf::from(self.path), message)
    }

    fn usize_required(&self, key: &str) -> Result<usize> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Err(self.error(format!(
                "has no `{key}`; a llama-family config.json must give it"
            ))),
            Some(v) => self.as_usize(key, v),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => self.as_usize(key, v),
        }
    }

    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .filter(|&n| n > 0)
            .map(|n| n as usize)
            .ok_or_else(|| self.error(format!("`{key}` must be a positive integer, got {v}")))
    }

    fn f64_in(&self, map: &Map<String, Value>, key: &str, default: f64) -> Result<f64> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.error(format!("`{key}` must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.raw.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(format!("`{key}` must be true or false, got {v}"))),
        }
    }

    fn build(&self) -> Result<ModelConfig> {
        let model_type = match self.raw.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => return Err(self.error("has no `model_type`")),
        };
        if !SUPPORTED_MODEL_TYPES.contains(&model_type.as_str()) {
            return Err(self.error(format!(
                "model_type `{model_type}` is not supported; supported types are {}",
                SUPPORTED_MODEL_TYPES.join(", ")
            )));
        }
        if let Some(act) = self.raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(self.error(format!(
                    "hidden_act `{act}` is not supported; llama-family models use silu"
                )));
            }
        }
        let hidden_size = self.usize_required("hidden_size")?;
        let num_attention_heads = self.usize_required("num_attention_heads")?;
        let num_key_value_heads = self.usize_or("num_key_value_heads", num_attention_heads)?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(self.error(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            )));
        }
        let head_dim = self.usize_or("head_dim", hidden_size / num_attention_heads)?;
        if head_dim % 2 != 0 {
            return Err(self.error(format!(
                "head_dim must be even for rotary embeddings, got {head_dim}"
            )));
        }
        let is_qwen2 = model_type == "qwen2";
        let (rope_theta, rope_scaling) = self.rope()?;
        let quant_method = self
            .raw
            .get("quantization_config")
            .and_then(|q| q.get("quant_method"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let vocab_size = self.usize_required("vocab_size")?;
        Ok(ModelConfig {
            vocab_size,
            pad_token_id: self.pad_token_id(vocab_size)?,
            hidden_size,
            intermediate_size: self.usize_required("intermediate_size")?,
            num_hidden_layers: self.usize_required("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: self.f64_in(self.raw, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.usize_or("max_position_embeddings", 2048)?,
            tie_word_embeddings: self.bool_or("tie_word_embeddings", false)?,
            attention_bias: is_qwen2 || self.bool_or("attention_bias", false)?,
            mlp_bias: self.bool_or("mlp_bias", false)?,
            qk_norm: model_type == "qwen3",
            quant_method,
            model_type,
            raw: self.raw.clone(),
        })
    }

    /// `pad_token_id` as `nn.Embedding` takes `padding_idx`: a negative one counts from the end.
    fn pad_token_id(&self, vocab_size: usize) -> Result<Option<u32>> {
        let id = match self.raw.get("pad_token_id") {
            None | Some(Value::Null) => return Ok(None),
            Some(v) => v
                .as_i64()
                .ok_or_else(|| self.error(format!("`pad_token_id` must be an integer, got {v}")))?,
        };
        let row = if id < 0 { vocab_size as i64 + id } else { id };
        if !(0..vocab_size as i64).contains(&row) {
            return Err(self.error(format!(
                "`pad_token_id` {id} is not a row of the {vocab_size}-token embedding"
            )));
        }
        Ok(Some(row as u32))
    }

    /// transformers 5 writes `rope_parameters` (theta and scaling together); older files write
    /// `rope_theta` and `rope_scaling` side by side.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let empty = Map::new();
        let (theta_map, scaling) = match self.raw.get("rope_parameters") {
            Some(Value::Object(p)) => (p, Some(p)),
            Some(Value::Null) | None => (
                self.raw,
                match self.raw.get("rope_scaling") {
                    Some(Value::Object(s)) => Some(s),
                    Some(Value::Null) | None => None,
                    Some(v) => {
                        return Err(self.error(format!("`rope_scaling` must be an object, got {v}")))
                    }
                },
            ),
            Some(v) => {
                return Err(self.error(format!("`rope_parameters` must be an object, got {v}")))
            }
        };
        let theta = self.f64_in(theta_map, "rope_theta", 10000.0)?;
        let scaling = scaling.unwrap_or(&empty);
        let kind = scaling
            .get("rope_type")
            .or_else(|| scaling.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let factor = || -> Result<f64> {
            match scaling.get("factor").and_then(Value::as_f64) {
                Some(f) if f > 0.0 => Ok(f),
                _ => Err(self.error(format!("rope scaling `{kind}` needs a positive `factor`"))),
            }
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: factor()? },
            "llama3" => RopeScaling::Llama3 {
                factor: factor()?,
                low_freq_factor: self.f64_in(scaling, "low_freq_factor", 1.0)?,
                high_freq_factor: self.f64_in(scaling, "high_freq_factor", 4.0)?,
                original_max_position_embeddings: self.f64_in(
                    scaling,
                    "original_max_position_embeddings",
                    8192.0,
                )?,
            },
            other => {
                return Err(self.error(format!(
                "rope scaling type `{other}` is not supported; supported: default, linear, llama3"
            )))
            }
        };
        Ok((theta, scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        ModelConfig::from_json_str(text, Path::new("config.json"))
    }

    const BASE: &str = r#""model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
        "num_hidden_layers":1,"num_attention_heads":2"#;

    #[test]
    fn defaults_follow_transformers() {
        let c = parse(&format!("{{{BASE}}}")).unwrap();
        assert_eq!(c.num_key_value_heads, 2);
        assert_eq!(c.head_dim, 4);
        assert_eq!(c.rope_theta, 10000.0);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        assert!(!c.tie_word_embeddings);
    }

    #[test]
    fn pad_token_id_as_embedding_padding_idx() {
        let pad = |v: &str| parse(&format!(r#"{{{BASE},"pad_token_id":{v}}}"#));
        assert_eq!(parse(&format!("{{{BASE}}}")).unwrap().pad_token_id, None);
        assert_eq!(pad("null").unwrap().pad_token_id, None);
        assert_eq!(pad("3").unwrap().pad_token_id, Some(3));
        assert_eq!(pad("-1").unwrap().pad_token_id, Some(9));
        let msg = pad("10").unwrap_err().to_string();
        assert!(
            msg.contains("`pad_token_id` 10 is not a row of the 10-token embedding"),
            "{msg}"
        );
    }

    #[test]
    fn rope_parameters_of_transformers_5() {
        let c = parse(&format!(
            r#"{{{BASE},"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn classic_rope_scaling_linear() {
        let c = parse(&format!(
            r#"{{{BASE},"rope_theta":1e6,"rope_scaling":{{"type":"linear","factor":2.0}}}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn missing_hidden_size_is_one_line() {
        let text = r#"{"model_type":"llama","vocab_size":10}"#;
        let msg = parse(text).unwrap_err().to_string();
        assert!(msg.contains("has no `hidden_size`"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let msg = parse(r#"{"model_type":"bert"}"#).unwrap_err().to_string();
        assert!(msg.contains("`bert` is not supported"), "{msg}");
        assert!(msg.contains("llama, mistral, qwen2, qwen3"), "{msg}");
    }

    #[test]
    fn qwen_switches() {
        let q2 = parse(&format!("{{{BASE}}}").replace("llama", "qwen2")).unwrap();
        assert!(q2.attention_bias && !q2.qk_norm);
        let q3 = parse(&format!("{{{BASE}}}").replace("llama", "qwen3")).unwrap();
        assert!(q3.qk_norm && !q3.attention_bias);
    }
}
