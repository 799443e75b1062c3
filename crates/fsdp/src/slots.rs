//! The tensors of one part of the model, by name, as slots that can be emptied and refilled.
//!
//! FSDP keeps a unit's tensors out of the model between uses: a released slot holds an empty
//! tensor, and gathering puts the full tensor back. The model itself never knows.

use candle_core::{Device, Result, Tensor, Var};
use ff_model::quant::QuantizedWeight;
use ff_model::{CausalLm, Param, Part};

/// A tensor of the model that FSDP can empty and refill.
pub enum Slot<'a> {
    /// A base-model parameter, frozen or trained.
    Param(&'a mut Param),
    /// A LoRA matrix (always trained).
    Adapter(&'a mut Var),
}

impl Slot<'_> {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Slot::Param(p) => p.tensor(),
            Slot::Adapter(v) => v.as_tensor(),
        }
    }

    /// The quantized weight in the slot, if it holds one (QLoRA's frozen base).
    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        match self {
            Slot::Param(p) => p.quantized(),
            Slot::Adapter(_) => None,
        }
    }

    /// Puts a quantized weight back into a slot that held one.
    pub fn fill_quantized(&mut self, weight: QuantizedWeight) {
        if let Slot::Param(p) = self {
            **p = Param::Quantized(weight);
        }
    }

    pub fn is_trainable(&self) -> bool {
        match self {
            Slot::Param(p) => p.is_trainable(),
            Slot::Adapter(_) => true,
        }
    }

    /// Puts `tensor` in the slot; a trained slot gets a fresh [`Var`], returned so that its
    /// gradient can be found after backward.
    pub fn fill(&mut self, tensor: Tensor) -> Result<Option<Var>> {
        match self {
            Slot::Param(p) if p.is_trainable() => {
                let var = Var::from_tensor(&tensor)?;
                **p = Param::Trainable(var.clone());
                Ok(Some(var))
            }
            Slot::Param(p) => {
                **p = Param::Frozen(tensor);
                Ok(None)
            }
            Slot::Adapter(v) => {
                **v = Var::from_tensor(&tensor)?;
                Ok(Some((*v).clone()))
            }
        }
    }

    /// Drops the slot's tensor, keeping whether it trains.
    pub fn empty(&mut self, device: &Device) -> Result<()> {
        let dtype = self.tensor().dtype();
        let empty = Tensor::zeros(0, dtype, device)?;
        match self {
            Slot::Param(p) if p.is_trainable() => **p = Param::Trainable(Var::from_tensor(&empty)?),
            Slot::Param(p) => **p = Param::Frozen(empty),
            Slot::Adapter(v) => **v = Var::from_tensor(&empty)?,
        }
        Ok(())
    }
}

/// The named slots of `part`. Names are the model's own: Hugging Face names for base
/// parameters, PEFT names (without `base_model.model.`) for adapters, as
/// [`CausalLm::trainable_params`] gives them.
pub fn slots_of(model: &mut CausalLm, part: Part) -> Vec<(String, Slot<'_>)> {
    match part {
        Part::Embed => vec![(
            "model.embed_tokens.weight".into(),
            Slot::Param(&mut model.embed_tokens),
        )],
        Part::Head => {
            let mut out = vec![(
                "model.norm.weight".to_string(),
                Slot::Param(&mut model.norm.weight),
            )];
            if let Some(head) = &mut model.lm_head {
                out.push(("lm_head.weight".into(), Slot::Param(head)));
            }
            out
        }
        Part::Layer(i) => {
            let layer = &mut model.layers[i];
            let prefix = format!("model.layers.{}.", layer.index);
            let (params, adapters) = layer.params_and_adapters_mut();
            let params = params
                .into_iter()
                .map(|(name, p)| (format!("{prefix}{name}"), Slot::Param(p)));
            let adapters = adapters
                .into_iter()
                .map(|(name, v)| (format!("{prefix}{name}"), Slot::Adapter(v)));
            params.chain(adapters).collect()
        }
    }
}
