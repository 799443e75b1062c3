//! `ferrofactory preprocess CONFIG.yaml [key=value …] [--output FILE]`: the training examples,
//! one JSON line each, in dataset order before any shuffling.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ff_config::TrainArgs;

pub fn run(config: &Path, overrides: &[String], output: Option<&PathBuf>) -> Result<()> {
    let args = TrainArgs::load(config, overrides)?;
    // Checked before tokenizing, so a mistyped --output fails at once rather than after the work.
    if let Some(path) = output {
        check_output(path)?;
    }
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
            ff_fsio::write_atomically(path, |file| file.write_all(lines.as_bytes()))
                .with_context(|| format!("writing --output {}", path.display()))?;
            eprintln!("wrote {} examples to {}", examples.len(), path.display());
        }
        None => std::io::stdout()
            .lock()
            .write_all(lines.as_bytes())
            .context("writing to standard output")?,
    }
    Ok(())
}

/// Refuses an `output` that is a directory itself, or whose directory is missing.
fn check_output(output: &Path) -> Result<()> {
    if output.is_dir() {
        bail!(
            "--output {} is a directory; give the path of the file to write",
            output.display()
        );
    }
    let dir = match output.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "--output {} cannot be written: {} is not an existing directory",
            output.display(),
            dir.display()
        );
    }
    Ok(())
}
