//! A weight that is either frozen or trained.

use candle_core::{DType, Result, Tensor, Var};

/// Frozen weights stay in the compute dtype and never enter the backward graph; trained ones are
/// float32 [`Var`]s (master weights) cast to the compute dtype inside the graph, so that bf16 and
/// fp16 compute still update in float32.
#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    /// The stored tensor: compute dtype when frozen, float32 when trained.
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }

    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable(v) => Some(v),
        }
    }

    pub fn is_trainable(&self) -> bool {
        matches!(self, Param::Trainable(_))
    }

    /// The weight as the forward pass uses it.
    pub fn in_dtype(&self, dtype: DType) -> Result<Tensor> {
        self.tensor().to_dtype(dtype)
    }

    /// Turns a frozen weight into a float32 trained one (a copy; the frozen tensor may be shared).
    pub fn make_trainable(&mut self) -> Result<()> {
        if let Param::Frozen(t) = self {
            *self = Param::Trainable(Var::from_tensor(&t.to_dtype(DType::F32)?)?);
        }
        Ok(())
    }

    pub fn freeze(&mut self, dtype: DType) -> Result<()> {
        if let Param::Trainable(v) = self {
            *self = Param::Frozen(v.as_tensor().detach().to_dtype(dtype)?);
        }
        Ok(())
    }
}
