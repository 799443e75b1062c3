//! A weight that is frozen, frozen and quantized, or trained.

use candle_core::{DType, Error, Result, Tensor, Var};

use crate::quant::QuantizedWeight;

/// Frozen weights stay in the compute dtype and never enter the backward graph; trained ones are
/// float32 [`Var`]s (master weights) cast to the compute dtype inside the graph, so that bf16 and
/// fp16 compute still update in float32. Quantized weights (QLoRA's base) are frozen matrices
/// kept in their quantized form; only [`crate::linear::Linear`] multiplies by them.
#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
    Quantized(QuantizedWeight),
}

impl Param {
    /// The stored tensor: compute dtype when frozen, float32 when trained, and the u8 codes of a
    /// quantized weight (use [`Param::dims`] for the matrix's shape).
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
            Param::Quantized(q) => q.codes(),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            Param::Frozen(t) => t.dims().to_vec(),
            Param::Trainable(v) => v.dims().to_vec(),
            Param::Quantized(q) => q.dims().to_vec(),
        }
    }

    pub fn elem_count(&self) -> usize {
        self.dims().iter().product()
    }

    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Trainable(v) => Some(v),
            Param::Frozen(_) | Param::Quantized(_) => None,
        }
    }

    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        match self {
            Param::Quantized(q) => Some(q),
            Param::Frozen(_) | Param::Trainable(_) => None,
        }
    }

    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }

    /// The weight as the forward pass uses it; a quantized one is dequantized whole, which only
    /// export and tests do (Linear multiplies by it chunk by chunk instead).
    pub fn in_dtype(&self, dtype: DType) -> Result<Tensor> {
        match self {
            Param::Frozen(t) => t.to_dtype(dtype),
            Param::Trainable(v) => v.as_tensor().to_dtype(dtype),
            Param::Quantized(q) => q.dequantize(dtype, &candle_core::Device::Cpu),
        }
    }

    /// Turns a frozen weight into a float32 trained one (a copy; the frozen tensor may be shared).
    /// Quantized weights cannot train: QLoRA trains adapters on top of them.
    pub fn make_trainable(&mut self) -> Result<()> {
        match self {
            Param::Frozen(t) => {
                *self = Param::Trainable(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
                Ok(())
            }
            Param::Trainable(_) => Ok(()),
            Param::Quantized(_) => Err(Error::Msg(
                "a quantized weight cannot be trained; use finetuning_type lora with quantization_bit"
                    .into(),
            )),
        }
    }

    pub fn freeze(&mut self, dtype: DType) -> Result<()> {
        if let Param::Trainable(v) = self {
            *self = Param::Frozen(v.as_tensor().detach().to_dtype(dtype)?);
        }
        Ok(())
    }
}
