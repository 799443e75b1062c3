//! Building a [`CausalLm`] from a Hugging Face model directory.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::causal_lm::CausalLm;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::layers::{Attention, DecoderLayer, Mlp, RmsNorm};
use crate::linear::Linear;
use crate::param::Param;
use crate::quant::{QuantFormat, QuantizedWeight};
use crate::safetensors_io::SafetensorsFiles;

/// Loads every weight frozen, in `dtype`. Fine-tuning setups (LoRA, full, freeze) are applied
/// afterwards by [`crate::finetune`].
pub fn load_model_dir(dir: &Path, dtype: DType, device: &Device) -> Result<CausalLm> {
    load_model_dir_quantized(dir, dtype, device, None)
}

/// [`load_model_dir`], with the decoder layers' Linear weights quantized to `quant` as they are
/// read (see [`from_tensors_quantized`]).
pub fn load_model_dir_quantized(
    dir: &Path,
    dtype: DType,
    device: &Device,
    quant: Option<QuantFormat>,
) -> Result<CausalLm> {
    if !dir.is_dir() {
        return Err(ModelError::file(
            dir,
            "is not a directory; model_name_or_path must name a Hugging Face model directory",
        ));
    }
    let config = ModelConfig::from_dir(dir)?;
    if let Some(method) = &config.quant_method {
        return Err(ModelError::Unsupported(format!(
            "{} is a pre-quantized `{method}` checkpoint, which cannot be trained here; use the float checkpoint (with quantization_bit for QLoRA)",
            dir.display()
        )));
    }
    let files = SafetensorsFiles::open_model_dir(dir)?;
    from_tensors_quantized(config, &files, dtype, device, quant)
}

/// Where weights come from: checkpoint files, or a random initialisation for benchmarks.
pub trait TensorSource {
    /// The tensor `name` (Hugging Face naming) with shape `shape`, converted to `dtype`.
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;
}

impl TensorSource for SafetensorsFiles {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        self.load(name, Some(shape), dtype, device)
    }
}

/// Zeros of the right shapes, for a rank that will receive its weights from rank 0 (FSDP's
/// cpu_ram_efficient_loading): no weight file is read, and the zero pages the allocator maps
/// cost no memory until written.
pub struct Zeros;

impl TensorSource for Zeros {
    fn tensor(
        &self,
        _name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        Ok(Tensor::zeros(shape, dtype, device)?)
    }
}

/// Weights drawn as transformers initialises a fresh model: normal(0, 0.02) matrices, norms at 1.
pub struct RandomInit;

impl TensorSource for RandomInit {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::ones(shape, DType::F32, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, device)?
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// Builds the model from named tensors in Hugging Face's naming; shapes are checked against the
/// config so a wrong file fails with the tensor's name instead of deep inside a matmul.
pub fn from_tensors(
    config: ModelConfig,
    source: &dyn TensorSource,
    dtype: DType,
    device: &Device,
) -> Result<CausalLm> {
    from_tensors_quantized(config, source, dtype, device, None)
}

/// [`from_tensors`], with every Linear weight of the decoder layers quantized to `quant` right
/// after it is read, so that only one float matrix exists at a time. Embeddings, norms, biases
/// and `lm_head` stay in `dtype`, as transformers leaves them under bitsandbytes.
pub fn from_tensors_quantized(
    config: ModelConfig,
    source: &dyn TensorSource,
    dtype: DType,
    device: &Device,
    quant: Option<QuantFormat>,
) -> Result<CausalLm> {
    let c = &config;
    let get = |name: &str, shape: &[usize]| -> Result<Param> {
        Ok(Param::Frozen(source.tensor(name, shape, dtype, device)?))
    };
    let get_weight = |name: &str, shape: &[usize]| -> Result<Param> {
        match quant {
            None => get(name, shape),
            Some(format) => {
                let float = source.tensor(name, shape, dtype, device)?;
                Ok(Param::Quantized(QuantizedWeight::quantize(&float, format)?))
            }
        }
    };
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q_out, kv_out) = (
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
        let weight = get_weight(&format!("{name}.weight"), &[out, inp])?;
        let bias = if bias {
            Some(get(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        Ok(Linear::new(weight, bias))
    };
    let norm = |name: &str, dim: usize| -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: get(name, &[dim])?,
            eps: c.rms_norm_eps,
        })
    };

    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for index in 0..c.num_hidden_layers {
        let p = format!("model.layers.{index}");
        let qk_norm = |which: &str| -> Result<Option<RmsNorm>> {
            if c.qk_norm {
                Ok(Some(norm(
                    &format!("{p}.self_attn.{which}.weight"),
                    c.head_dim,
                )?))
            } else {
                Ok(None)
            }
        };
        layers.push(DecoderLayer {
            index,
            input_layernorm: norm(&format!("{p}.input_layernorm.weight"), h)?,
            self_attn: Attention {
                q_proj: linear(&format!("{p}.self_attn.q_proj"), q_out, h, c.attention_bias)?,
                k_proj: linear(
                    &format!("{p}.self_attn.k_proj"),
                    kv_out,
                    h,
                    c.attention_bias,
                )?,
                v_proj: linear(
                    &format!("{p}.self_attn.v_proj"),
                    kv_out,
                    h,
                    c.attention_bias,
                )?,
                o_proj: linear(&format!("{p}.self_attn.o_proj"), h, q_out, false)?,
                q_norm: qk_norm("q_norm")?,
                k_norm: qk_norm("k_norm")?,
                num_heads: c.num_attention_heads,
                num_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
            },
            post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
            mlp: Mlp {
                gate_proj: linear(&format!("{p}.mlp.gate_proj"), i, h, c.mlp_bias)?,
                up_proj: linear(&format!("{p}.mlp.up_proj"), i, h, c.mlp_bias)?,
                down_proj: linear(&format!("{p}.mlp.down_proj"), h, i, c.mlp_bias)?,
            },
        });
    }
    let embed_tokens = get("model.embed_tokens.weight", &[c.vocab_size, h])?;
    // Some tied checkpoints still carry a copy of the head; tying wins, as in transformers.
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(get("lm_head.weight", &[c.vocab_size, h])?)
    };
    Ok(CausalLm {
        norm: norm("model.norm.weight", h)?,
        embed_tokens,
        layers,
        lm_head,
        dtype,
        device: device.clone(),
        config,
    })
}
