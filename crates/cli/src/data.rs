//! The training config's data keys handed to `ff-data`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ff_config::TrainArgs;
use ff_data::{DataArgs, Prepared};

pub fn data_args(args: &TrainArgs) -> Result<DataArgs> {
    let template = args
        .template
        .clone()
        .context("`template` is required; name one of the templates, e.g. template: llama3")?;
    Ok(DataArgs {
        dataset: args.dataset.0.clone(),
        eval_dataset: args.eval_dataset.0.clone(),
        dataset_dir: PathBuf::from(&args.dataset_dir),
        template,
        cutoff_len: args.cutoff_len as usize,
        max_samples: args.max_samples.map(|n| n as usize),
        train_on_prompt: args.train_on_prompt,
        mask_history: args.mask_history,
        val_size: args.val_size,
        seed: args.data_seed.unwrap_or(args.seed),
        default_system: args.default_system.clone(),
        enable_thinking: args.enable_thinking.unwrap_or(true),
    })
}

/// Tokenized training and evaluation sets for `args`, with the tokenizer in `tokenizer_dir`.
pub fn load_examples(args: &TrainArgs, tokenizer_dir: &Path) -> Result<Prepared> {
    Ok(ff_data::prepare(&data_args(args)?, tokenizer_dir)?)
}
