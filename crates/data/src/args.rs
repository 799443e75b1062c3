//! The data keys of a training config, with LLaMA-Factory's defaults.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// What to load and how to encode it. Streaming, mixing strategies other than concatenation,
/// packing and multimodal inputs are not supported, so they have no fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataArgs {
    /// Training datasets, names from dataset_info.json, concatenated in order.
    pub dataset: Vec<String>,
    /// Evaluation datasets; cannot be combined with `val_size`.
    pub eval_dataset: Vec<String>,
    /// The folder holding dataset_info.json and the data files.
    pub dataset_dir: PathBuf,
    /// A built-in template name (see `TEMPLATE_NAMES`). Empty means none was named: then, as in
    /// LLaMA-Factory, the tokenizer's chat template is used, or `empty` when it has none.
    pub template: String,
    /// The most tokens an example keeps.
    pub cutoff_len: usize,
    /// Keep only the first N rows of each dataset.
    pub max_samples: Option<usize>,
    /// Train on prompt tokens too.
    pub train_on_prompt: bool,
    /// Train only on the last turn; earlier turns fill what is left of `cutoff_len`.
    pub mask_history: bool,
    /// Evaluation split taken from the training data: a fraction when below 1, else a number
    /// of rows (truncated to an integer).
    pub val_size: f64,
    /// Seed of the evaluation split and of `num_samples` draws; LLaMA-Factory uses the training
    /// `seed` for both (not `data_seed`).
    pub seed: u64,
    /// Replaces the template's default system prompt.
    pub default_system: Option<String>,
    /// Reasoning templates: train on thoughts (true) or remove them (false).
    pub enable_thinking: bool,
    /// Reasoning templates: keep the thoughts of earlier turns under `mask_history`.
    pub preserve_thinking: bool,
    /// Overrides the template's tool format (default, qwen, llama3, mistral).
    pub tool_format: Option<String>,
}

impl Default for DataArgs {
    fn default() -> Self {
        Self {
            dataset: Vec::new(),
            eval_dataset: Vec::new(),
            dataset_dir: PathBuf::from("data"),
            template: String::new(),
            cutoff_len: 2048,
            max_samples: None,
            train_on_prompt: false,
            mask_history: false,
            val_size: 0.0,
            seed: 42,
            default_system: None,
            enable_thinking: true,
            preserve_thinking: false,
            tool_format: None,
        }
    }
}

/// How many rows go to evaluation: LLaMA-Factory ignores sizes up to 1e-6.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum ValSize {
    None,
    Fraction(f64),
    Count(usize),
}

impl DataArgs {
    pub(crate) fn val_size(&self) -> ValSize {
        if self.val_size <= 1e-6 {
            ValSize::None
        } else if self.val_size > 1.0 {
            ValSize::Count(self.val_size as usize)
        } else {
            ValSize::Fraction(self.val_size)
        }
    }
}
