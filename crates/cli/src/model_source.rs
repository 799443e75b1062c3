//! Where a run's weights, config.json and tokenizer files come from.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use ff_model::gguf::GgufModel;
use ff_model::load::{from_tensors_quantized, load_model_dir_quantized};
use ff_model::quant::QuantFormat;
use ff_model::CausalLm;

/// Where weights, config and tokenizer come from: a Hugging Face directory, or a GGUF file whose
/// metadata is written out as config.json and tokenizer files in a temporary folder.
pub enum ModelSource {
    Dir(PathBuf),
    Gguf { gguf: GgufModel, files_dir: PathBuf },
}

impl ModelSource {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "model_name_or_path {} does not exist; give a Hugging Face model directory or a .gguf file (this machine cannot download models)",
                path.display()
            );
        }
        // Anything but a directory must be a GGUF file, whatever its extension: opening it
        // checks the magic, so a stray file is named as such rather than read as a directory.
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        let gguf = GgufModel::open(path)?;
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or_default();
        let stem = path.file_stem().unwrap_or_default().to_string_lossy();
        let files_dir = std::env::temp_dir().join(format!("ferrofactory-gguf-{stem}-{len}"));
        std::fs::create_dir_all(&files_dir)
            .with_context(|| format!("creating {}", files_dir.display()))?;
        gguf.write_tokenizer_files(&files_dir)?;
        gguf.write_config_files(&files_dir)?;
        Ok(Self::Gguf { gguf, files_dir })
    }

    /// The folder holding config.json and the tokenizer files.
    pub fn files_dir(&self) -> &Path {
        match self {
            Self::Dir(dir) => dir,
            Self::Gguf { files_dir, .. } => files_dir,
        }
    }

    /// The model, frozen, in `dtype`; with `quant`, the decoder Linears are quantized as they load.
    pub fn load(&self, dtype: DType, quant: Option<QuantFormat>) -> Result<CausalLm> {
        Ok(match self {
            Self::Dir(dir) => load_model_dir_quantized(dir, dtype, &Device::Cpu, quant)?,
            Self::Gguf { gguf, .. } => {
                from_tensors_quantized(gguf.config()?, gguf, dtype, &Device::Cpu, quant)?
            }
        })
    }
}
