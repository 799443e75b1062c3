//! The numeric kernels of training, each an op with its own backward where it needs one, behind
//! one door:
//!
//! - [`bf16_product`]: `a · wᵀ` and `a · w` of bfloat16 on the CPU's bf16 dot-product
//!   instruction, summed in float32, with a weight packed once for many products.
//! - [`cast`]: float32 to another float dtype and back, with gradients (bfloat16 by rounding the
//!   bits, to nearest even).
//! - [`causal_attention`]: `softmax(q kᵀ / √d + mask) v` over the keys a causal mask leaves,
//!   grouped key-value heads, and its replay from kept values.
//! - [`cross_entropy`]: the negative log-likelihood of each row's target and its gradient,
//!   written over the logits.
//! - [`dequantize`]: the float32 values of 4-bit (NF4, FP4) and row-wise int8 weights.
//! - [`frozen_product`]: `x · Wᵀ` by a weight that never trains, and the input gradient `dy · W`.
//! - [`lora_product`]: `x Wᵀ + s · (x Aᵀ) Bᵀ`, a frozen weight with its LoRA adapter.
//! - [`quantized_product`]: `x · Wᵀ` by a quantized weight, dequantized a chunk of rows at a time.
//! - [`rms_normalize`]: `weight ⊙ x / sqrt(mean(x²) + eps)` over the last axis.
//! - [`rope_heads`]: rotary position embedding, moving heads before positions.
//! - [`swiglu`]: `silu(gate) · up`.
//! - [`trained_product`]: `x · Wᵀ` by a weight that trains, both gradients from `dy`.
//! - [`transposed_product`]: `aᵀ · b` into a float32 buffer or added to one (a weight's gradient
//!   summed over chunks of rows).
//! - [`weight_grads`]: weight gradients handed past candle's gradient store.
//!
//! The rules: one file per op; each op's public function takes tensors, slices and the small
//! types defined here, and dispatches on the device, its CPU implementation beside the future
//! CUDA one (a device without a kernel gets candle's ops, `None` or an error, as each op says);
//! callers use the op functions only. What the kernels share (lanes of sums, a vectorized
//! `exp`, products over strided views, reading tensors' values in place) is private.

pub mod bf16_product;
pub mod cast;
pub mod causal_attention;
pub mod cross_entropy;
pub mod dequantize;
pub mod frozen_product;
pub mod lora_product;
pub mod quantized_product;
pub mod rms_normalize;
pub mod rope_heads;
pub mod swiglu;
pub mod trained_product;
pub mod transposed_product;
pub mod weight_grads;

mod fast_exp;
mod lanes;
mod output;
mod strided;
mod values;

pub use output::Output;

#[cfg(test)]
mod test_util;
