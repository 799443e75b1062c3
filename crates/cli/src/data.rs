//! The training config's data keys handed to `ff-data`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use ff_config::TrainArgs;
use ff_data::{CacheStatus, DataArgs, Prepared};

pub fn data_args(args: &TrainArgs) -> Result<DataArgs> {
    Ok(DataArgs {
        dataset: args.dataset.0.clone(),
        eval_dataset: args.eval_dataset.0.clone(),
        dataset_dir: PathBuf::from(&args.dataset_dir),
        // Empty: the template comes from the tokenizer's chat template, as in LLaMA-Factory.
        template: args.template.clone().unwrap_or_default(),
        cutoff_len: args.cutoff_len as usize,
        max_samples: args.max_samples.map(|n| n as usize),
        train_on_prompt: args.train_on_prompt,
        mask_history: args.mask_history,
        val_size: args.val_size,
        // LLaMA-Factory splits and resamples with the training seed, not data_seed.
        seed: args.seed,
        default_system: args.default_system.clone(),
        enable_thinking: args.enable_thinking.unwrap_or(true),
        preserve_thinking: args.preserve_thinking,
        tool_format: args.tool_format.clone(),
    })
}

/// Tokenized training and evaluation sets for `args`, with the tokenizer in `tokenizer_dir`,
/// from the preprocessing cache when nothing they depend on has changed.
pub fn load_examples(args: &TrainArgs, tokenizer_dir: &Path, report: bool) -> Result<Prepared> {
    let cache_dir = cache_dir();
    let (prepared, status) = ff_data::prepare_cached(&data_args(args)?, tokenizer_dir, &cache_dir)?;
    let how = match status {
        CacheStatus::Hit => "read from the cache in",
        CacheStatus::Built => "preprocessed and cached in",
    };
    if report {
        eprintln!(
            "{} training and {} evaluation examples {how} {}",
            prepared.train.len(),
            prepared.eval.len(),
            cache_dir.display()
        );
    }
    Ok(prepared)
}

/// `$XDG_CACHE_HOME/ferrofactory/datasets`, else `~/.cache/ferrofactory/datasets`.
fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("ferrofactory").join("datasets")
}
