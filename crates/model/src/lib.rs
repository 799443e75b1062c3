//! LLaMA-family decoder on candle: configuration, layers, Linear kinds (dense, LoRA, quantized), and
//! checkpoint I/O (Hugging Face safetensors, sharded indexes, PEFT adapters).
//!
//! The model knows nothing about training loops or distribution: it computes a forward pass
//! layer by layer, and exposes its parameters by name so that others can train or shard them.

pub mod causal_lm;
pub mod config;
pub mod dropout;
pub mod error;
pub mod finetune;
pub mod gguf;
pub mod hf_export;
pub mod layers;
pub mod linear;
pub mod load;
pub mod param;
pub mod part;
pub mod peft;
pub mod quant;
pub mod safetensors_io;
pub mod table_grad;

pub use causal_lm::CausalLm;
pub use config::ModelConfig;
pub use error::{ModelError, Result};
pub use finetune::LoraSpec;
pub use layers::{DecoderLayer, ForwardCtx};
pub use param::Param;
pub use part::Part;
