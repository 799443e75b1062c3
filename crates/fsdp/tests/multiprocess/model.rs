//! The tiny models the scenarios shard, built alike on every rank without reading a file, and
//! exact snapshots of their tensors.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ff_fsdp::slots::{slots_of, Slot};
use ff_model::finetune::{apply_lora, make_all_trainable, LINEAR_MODULES};
use ff_model::load::{from_tensors, TensorSource, Zeros};
use ff_model::Part;
use ff_model::{CausalLm, LoraSpec, ModelConfig};

pub type Failure = Box<dyn std::error::Error>;
pub type Outcome<T = ()> = Result<T, Failure>;

pub const LAYERS: usize = 3;

/// How a model trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every tensor trains, in float32; the head has its own weight.
    Full,
    /// Full, with the head tied to the embedding.
    FullTied,
    /// A frozen bfloat16 base with float32 adapters on every Linear.
    Lora,
}

/// Where the base weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// The same values on every rank.
    Waves,
    /// Zeros, as a rank builds a model that rank 0's values will replace.
    Zeros,
}

/// A hidden size of 5 (odd, with head_dim 4 for the rotary embedding) makes every unit's flat
/// size odd and no multiple of 3, so shards are padded on 2 ranks and on 3.
fn config(tied: bool) -> ModelConfig {
    let text = format!(
        r#"{{"model_type":"llama","vocab_size":11,"hidden_size":5,"intermediate_size":3,
        "num_hidden_layers":{LAYERS},"num_attention_heads":2,"num_key_value_heads":1,
        "head_dim":4,"tie_word_embeddings":{tied}}}"#
    );
    ModelConfig::from_json_str(&text, Path::new("config.json")).expect("a valid tiny config")
}

/// Values in (−0.5, 0.5), with a phase taken from the tensor's name so no two tensors agree.
struct Waves;

impl TensorSource for Waves {
    fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> ff_model::Result<Tensor> {
        let phase = (fnv(name) % 1000) as f32 * 0.01;
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|i| 0.5 * (i as f32 * 0.37 + phase).sin())
            .collect();
        Ok(Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?)
    }
}

/// FNV-1a, a hash that is the same in every process.
pub fn fnv(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub fn build(kind: Kind, weights: Weights, lora_seed: u64) -> Outcome<CausalLm> {
    let dtype = match kind {
        Kind::Lora => DType::BF16,
        Kind::Full | Kind::FullTied => DType::F32,
    };
    let source: &dyn TensorSource = match weights {
        Weights::Waves => &Waves,
        Weights::Zeros => &Zeros,
    };
    let mut model = from_tensors(config(kind == Kind::FullTied), source, dtype, &Device::Cpu)?;
    match kind {
        Kind::Full | Kind::FullTied => make_all_trainable(&mut model)?,
        Kind::Lora => {
            let spec = LoraSpec {
                rank: 2,
                alpha: 4.0,
                dropout: 0.0,
                targets: LINEAR_MODULES.iter().map(|m| m.to_string()).collect(),
                use_rslora: false,
            };
            apply_lora(&mut model, &spec, lora_seed)?;
        }
    }
    Ok(model)
}

/// Every part of the model, in the order the forward meets them.
pub fn parts() -> Vec<Part> {
    let mut parts = vec![Part::Embed];
    parts.extend((0..LAYERS).map(Part::Layer));
    parts.push(Part::Head);
    parts
}

/// A tensor exactly: its dtype, shape and the bits of its elements.
#[derive(Clone, Debug, PartialEq)]
pub struct Bits {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Bits {
    pub fn of(t: &Tensor) -> Outcome<Self> {
        let flat = t.flatten_all()?;
        let bytes = match t.dtype() {
            DType::F32 => flat
                .to_vec1::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DType::BF16 => flat
                .to_vec1::<half::bf16>()?
                .iter()
                .flat_map(|v| v.to_bits().to_le_bytes())
                .collect(),
            other => return Err(format!("no test model has {other:?} tensors").into()),
        };
        Ok(Self {
            dtype: t.dtype(),
            shape: t.dims().to_vec(),
            bytes,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The elements of a float32 tensor.
    pub fn f32s(&self) -> Vec<f32> {
        self.bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
}

/// The tensors of `part` in the model's slots, by name, in slot order.
pub fn part_bits(model: &mut CausalLm, part: Part) -> Outcome<Vec<(String, Bits)>> {
    slots_of(model, part)
        .into_iter()
        .map(|(name, slot)| Ok((name, Bits::of(slot.tensor())?)))
        .collect()
}

/// Every tensor of the model in its slots, part by part.
pub fn all_bits(model: &mut CausalLm) -> Outcome<Vec<(String, Bits)>> {
    let mut all = Vec::new();
    for part in parts() {
        all.extend(part_bits(model, part)?);
    }
    Ok(all)
}

/// Every tensor of the model, by name.
pub fn snapshot(model: &mut CausalLm) -> Outcome<HashMap<String, Bits>> {
    Ok(all_bits(model)?.into_iter().collect())
}

/// The names of `part`'s trained tensors and the [`candle_core::Var`]s the slots hold now.
pub fn trained_slots(model: &mut CausalLm, part: Part) -> Vec<(String, candle_core::Var)> {
    slots_of(model, part)
        .into_iter()
        .filter_map(|(name, slot)| match slot {
            Slot::Param(p) => p.var().map(|v| (name, v.clone())),
            Slot::Adapter(v) => Some((name, v.clone())),
        })
        .collect()
}
