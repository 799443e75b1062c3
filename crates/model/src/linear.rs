//! Linear layers: dense or quantized, with or without a LoRA adapter on top.

use candle_core::{DType, Result, Tensor, Var};
use ff_kernels::frozen_product::matmul_frozen_t;
use ff_kernels::lora_product::lora_product;
use ff_kernels::quantized_product::quantized_matmul_t;
use ff_kernels::trained_product::trained_product;
use ff_kernels::Output;

use crate::dropout::{derive_seed, dropout};
use crate::param::Param;

/// `y = x Wᵀ + b`, plus `scale · B(A(dropout(x)))` when an adapter is attached.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub lora: Option<Lora>,
}

/// A low-rank adapter as PEFT defines it: `A` is `[r, in]`, `B` is `[out, r]`.
#[derive(Clone, Debug)]
pub struct Lora {
    pub a: Var,
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

impl Linear {
    pub fn new(weight: Param, bias: Option<Param>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x` is `[..., in]`; `dropout_seed` must be the same on a recomputation as on the first pass.
    pub fn forward(&self, x: &Tensor, dropout_seed: u64) -> Result<Tensor> {
        self.forward_to(x, dropout_seed, Output::Values)
    }

    /// [`Self::forward`], handing on `output`.
    pub fn forward_to(&self, x: &Tensor, dropout_seed: u64, output: Output) -> Result<Tensor> {
        let dtype = x.dtype();
        // Kept values include the bias, which the fused products add after them.
        let output = match output {
            Output::Kept(_) if self.bias.is_some() => Output::Values,
            output => output,
        };
        // The fused ops read `[batch, seq, in]` as rows in place and answer `[batch, seq, out]`.
        if let Some(y) = self.fused(x, output)? {
            return match &self.bias {
                Some(bias) => y.broadcast_add(&bias.in_dtype(dtype)?),
                None => Ok(y),
            };
        }
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / self.in_features();
        let x2 = x.reshape((rows, self.in_features()))?;
        let mut y = match &self.weight {
            Param::Quantized(q) => quantized_matmul_t(q, &x2)?,
            Param::Frozen(w) => matmul_frozen_t(&x2, w)?,
            Param::Trainable(w) => x2.matmul(&w.as_tensor().to_dtype(dtype)?.t()?)?,
        };
        if let Some(lora) = &self.lora {
            y = (y + lora.forward(&x2, dtype, dropout_seed)?)?;
        }
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(&bias.in_dtype(dtype)?)?;
        }
        let mut out_dims = dims;
        *out_dims
            .last_mut()
            .expect("linear input has at least one dimension") = self.out_features();
        y.reshape(out_dims)
    }

    /// The product as one op, where there is a kernel for it: a dense frozen weight in float32
    /// or half precision with an adapter without dropout, or a trained weight in a float32
    /// model (full fine-tuning).
    fn fused(&self, x: &Tensor, output: Output) -> Result<Option<Tensor>> {
        if x.rank() < 2 {
            return Ok(None);
        }
        match (&self.weight, &self.lora) {
            (Param::Frozen(w), Some(lora)) if lora.dropout == 0.0 => {
                let (a, b) = (lora.a.as_tensor(), lora.b.as_tensor());
                lora_product(x, w, a, b, lora.scale, output)
            }
            (Param::Trainable(w), None) => trained_product(x, w.as_tensor(), output),
            _ => Ok(None),
        }
    }
}

impl Lora {
    fn forward(&self, x2: &Tensor, dtype: DType, dropout_seed: u64) -> Result<Tensor> {
        let x = dropout(x2, self.dropout, derive_seed(dropout_seed, 0x10_4A))?;
        let a = self.a.as_tensor().to_dtype(dtype)?;
        let b = self.b.as_tensor().to_dtype(dtype)?;
        // Scaled at rank width, where it costs `r` values per row instead of `out`.
        x.matmul(&a.t()?)?.affine(self.scale, 0.0)?.matmul(&b.t()?)
    }

    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }
}
