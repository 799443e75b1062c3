//! `ferrofactory export CONFIG.yaml [key=value …]`: what `llamafactory-cli export` does — merge a
//! LoRA adapter into its base and write a Hugging Face model directory that transformers loads.
//!
//! The directory appears whole or not at all: it is written under a temporary name beside
//! `export_dir` and renamed at the end. An `export_dir` that already holds files is refused
//! rather than overwritten (LLaMA-Factory writes into it), so nothing of the user's is lost.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ff_config::TrainArgs;
use ff_fsio::{write_json, JsonEnding};
use ff_model::hf_export::{declared_dtype, generation_config, merge_lora, save_model_dir};
use ff_model::peft::load_adapter;
use ff_model::ModelConfig;
use ff_train::checkpoint::copy_files;

use crate::model_source::ModelSource;

/// transformers reads `export_size` as "{n}GB", and a GB as 10⁹ bytes.
const BYTES_PER_GB: u64 = 1_000_000_000;

pub fn run(config: &Path, overrides: &[String]) -> Result<()> {
    let args = TrainArgs::load(config, overrides)?;
    args.require_for_export()?;
    let model_path = PathBuf::from(args.model_name_or_path.as_deref().unwrap_or_default());
    let export_dir = PathBuf::from(args.export_dir.as_deref().unwrap_or_default());
    refuse_prequantized(&model_path, args.adapter_name_or_path.is_some())?;
    if std::fs::read_dir(&export_dir).is_ok_and(|mut entries| entries.next().is_some()) {
        bail!(
            "export_dir {} is not empty; export writes a fresh model directory and overwrites nothing, so remove it or choose another export_dir",
            export_dir.display()
        );
    }
    // A file (or a link) there would only fail the final rename, after the whole merge.
    if std::fs::symlink_metadata(&export_dir).is_ok_and(|meta| !meta.is_dir()) {
        bail!(
            "export_dir {} exists and is not a directory; export writes a fresh model directory and overwrites nothing, so remove it or choose another export_dir",
            export_dir.display()
        );
    }

    let source = ModelSource::open(&model_path)?;
    let files_dir = source.files_dir().to_path_buf();
    let raw = ModelConfig::from_dir(&files_dir)?.raw;
    let dtype = declared_dtype(&raw)?;
    let mut model = source.load(dtype, None)?;
    if let Some(adapter) = &args.adapter_name_or_path {
        load_adapter_or_shards(&mut model, Path::new(adapter))
            .with_context(|| format!("loading adapter_name_or_path {adapter}"))?;
        merge_lora(&mut model)?;
    }

    let tmp = temporary_sibling(&export_dir)?;
    let written = (|| -> Result<()> {
        save_model_dir(&mut model, &tmp, dtype, args.export_size * BYTES_PER_GB)?;
        copy_files(&crate::train::tokenizer_files(&files_dir), &tmp)?;
        if !tmp.join("generation_config.json").exists() {
            write_json(
                &tmp.join("generation_config.json"),
                &generation_config(&raw),
                JsonEnding::Bracket,
            )?;
        }
        if export_dir.exists() {
            std::fs::remove_dir(&export_dir)
                .with_context(|| format!("replacing the empty {}", export_dir.display()))?;
        }
        std::fs::rename(&tmp, &export_dir)
            .with_context(|| format!("moving the export into {}", export_dir.display()))
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    eprintln!(
        "exported {}{} to {}",
        model_path.display(),
        args.adapter_name_or_path
            .as_deref()
            .map(|a| format!(" with adapter {a} merged"))
            .unwrap_or_default(),
        export_dir.display()
    );
    Ok(())
}

/// LLaMA-Factory refuses to merge into a quantized model; a pre-quantized checkpoint cannot be
/// read here at all.
fn refuse_prequantized(model_path: &Path, has_adapter: bool) -> Result<()> {
    if !model_path.join("config.json").is_file() {
        return Ok(());
    }
    let Ok(config) = ModelConfig::from_dir(model_path) else {
        return Ok(());
    };
    match config.quant_method {
        Some(method) if has_adapter => bail!(
            "cannot merge adapters into a quantized model ({} is {method}-quantized); merge into the float checkpoint instead",
            model_path.display()
        ),
        Some(method) => bail!(
            "exporting a pre-quantized model ({} is {method}-quantized) is not supported; export from the float checkpoint",
            model_path.display()
        ),
        None => Ok(()),
    }
}

/// Loads a PEFT adapter folder, or a SHARDED_STATE_DICT checkpoint of a LoRA run (its shards
/// joined into an adapter in a temporary folder first).
fn load_adapter_or_shards(model: &mut ff_model::CausalLm, dir: &Path) -> Result<()> {
    if ff_train::checkpoint::sharded_world_size(dir)?.is_none() {
        load_adapter(model, dir)?;
        return Ok(());
    }
    let joined = std::env::temp_dir().join(format!(
        "ferrofactory-export-{}-adapter",
        std::process::id()
    ));
    let loaded = ff_train::checkpoint::consolidate_sharded_adapter(dir, &joined)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(load_adapter(model, &joined)?));
    let _ = std::fs::remove_dir_all(&joined);
    loaded.map(|_| ())
}

/// A fresh folder beside `dir`, so that the final rename stays on one filesystem.
fn temporary_sibling(dir: &Path) -> Result<PathBuf> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let name = dir.file_name().unwrap_or_default().to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("clearing {}", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}
