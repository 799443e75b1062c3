//! `ferrofactory preprocess CONFIG.yaml [key=value …] [--output FILE]`: the training examples,
//! one JSON line each, in dataset order before any shuffling.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ff_config::TrainArgs;

pub fn run(config: &Path, overrides: &[String], output: Option<&PathBuf>) -> Result<()> {
    let args = TrainArgs::load(config, overrides)?;
    let model = args
        .model_name_or_path
        .as_deref()
        .context("`model_name_or_path` is required: its tokenizer defines the token ids")?;
    let source = crate::model_source::ModelSource::open(Path::new(model))?;
    let data_args = crate::data::data_args(&args)?;
    let (template, tokenizer) = ff_data::load_template(&data_args, source.files_dir())?;
    let examples = ff_data::encode_datasets(&data_args.dataset, &data_args, &template, &tokenizer)?;
    let lines = ff_data::to_json_lines(&examples);
    match output {
        Some(path) => {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, lines).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
            eprintln!("wrote {} examples to {}", examples.len(), path.display());
        }
        None => std::io::stdout()
            .lock()
            .write_all(lines.as_bytes())
            .context("writing to standard output")?,
    }
    Ok(())
}
