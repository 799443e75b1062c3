//! Reading and writing safetensors files, with errors that name the file and the tensor.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorView, View};
use safetensors::SafeTensorError;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// One or more safetensors files opened as a single map from tensor name to data.
///
/// Files are memory-mapped, so opening a sharded checkpoint costs nothing until tensors are read.
pub struct SafetensorsFiles {
    files: Vec<MappedFile>,
    location: HashMap<String, usize>,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafetensorsFiles {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut location = HashMap::new();
        for path in paths {
            let file = MappedFile::open(path)?;
            for name in file.metadata.offset_keys() {
                location.insert(name, files.len());
            }
            files.push(file);
        }
        Ok(Self { files, location })
    }

    /// The weights of a Hugging Face model directory: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let shards = read_shard_index(&index)?;
            for shard in &shards {
                if !shard.exists() {
                    return Err(ModelError::file(
                        &index,
                        format!(
                            "lists shard {} which does not exist; the download is incomplete",
                            shard.display()
                        ),
                    ));
                }
            }
            Self::open(&shards)
        } else if single.exists() {
            Self::open(&[single])
        } else {
            Err(ModelError::file(
                dir,
                "holds neither model.safetensors nor model.safetensors.index.json",
            ))
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// The file a tensor lives in, for error messages.
    pub fn path_of(&self, name: &str) -> Option<&Path> {
        self.location
            .get(name)
            .map(|&i| self.files[i].path.as_path())
    }

    /// Loads `name` converted to `dtype`, checking its shape when `shape` is given.
    pub fn load(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(&index) = self.location.get(name) else {
            let path = self
                .files
                .first()
                .map(|f| f.path.clone())
                .unwrap_or_default();
            return Err(ModelError::tensor(path, name, "is missing"));
        };
        let file = &self.files[index];
        let info = file
            .metadata
            .info(name)
            .ok_or_else(|| ModelError::tensor(&file.path, name, "is missing"))?;
        if let Some(shape) = shape {
            if info.shape != shape {
                return Err(ModelError::tensor(
                    &file.path,
                    name,
                    format!("has shape {:?} but the model needs {:?}", info.shape, shape),
                ));
            }
        }
        let start = file.header_len + info.data_offsets.0;
        let end = file.header_len + info.data_offsets.1;
        let view = TensorView::new(info.dtype, info.shape.clone(), &file.mmap[start..end])
            .map_err(|e| ModelError::tensor(&file.path, name, e.to_string()))?;
        let tensor = view
            .load(device)
            .map_err(|e| ModelError::tensor(&file.path, name, e.to_string()))?;
        file.release(start, end - start);
        Ok(tensor.to_dtype(dtype)?)
    }
}

impl MappedFile {
    /// Drops the mapped pages of bytes already copied out, so that loading holds one copy of
    /// the weights instead of the file's pages and the tensors both (twice the model's size).
    fn release(&self, offset: usize, len: usize) {
        // SAFETY: the map is read-only and file-backed: dropped pages are read from the file
        // again if touched. A failure only leaves the pages resident, so it is ignored.
        #[cfg(unix)]
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }

    fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the map is read-only; a file changed underneath us during training is a user
        // error that at worst yields wrong numbers, as with any reader of mapped checkpoints.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        match safetensors::SafeTensors::read_metadata(&mmap) {
            Ok((n, metadata)) => Ok(Self {
                path: path.to_path_buf(),
                mmap,
                header_len: n + 8,
                metadata,
            }),
            Err(SafeTensorError::MetadataIncompleteBuffer) => Err(truncation_error(path, &mmap)),
            Err(e) => Err(ModelError::file(
                path,
                format!("is not a valid safetensors file ({e}); it may be truncated or corrupt"),
            )),
        }
    }
}

/// Names the first tensor whose bytes lie past the end of a truncated file.
fn truncation_error(path: &Path, bytes: &[u8]) -> ModelError {
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
    let data_len = bytes.len().saturating_sub(8 + header_len);
    let header: BTreeMap<String, Value> = std::str::from_utf8(&bytes[8..8 + header_len])
        .ok()
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or_default();
    let cut = header.iter().find_map(|(name, info)| {
        let end = info.get("data_offsets")?.get(1)?.as_u64()? as usize;
        (end > data_len).then_some(name)
    });
    match cut {
        Some(name) => ModelError::tensor(
            path,
            name,
            "runs past the end of the file; the file is truncated, copy or save it again",
        ),
        None => ModelError::file(
            path,
            "has a data section that does not match its header; the file is corrupt",
        ),
    }
}

fn read_shard_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::file(index, format!("is not valid JSON ({e})")))?;
    let Some(map) = value.get("weight_map").and_then(Value::as_object) else {
        return Err(ModelError::file(index, "has no `weight_map` object"));
    };
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut shards: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            return Err(ModelError::tensor(
                index,
                tensor,
                "maps to a non-string file name",
            ));
        };
        let shard = dir.join(file);
        if !shards.contains(&shard) {
            shards.push(shard);
        }
    }
    Ok(shards)
}

/// Writes tensors to `path` atomically: a temporary file renamed into place once complete, so an
/// interrupted save never leaves a file that looks whole.
pub fn save_atomic(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let mut owned = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let tensor = tensor.to_device(&Device::Cpu)?.contiguous()?;
        owned.push((name.clone(), tensor));
    }
    save_views_atomic(owned.iter().map(|(n, t)| (n.as_str(), t)), metadata, path)
}

/// [`save_atomic`] for any safetensors views; their bytes are asked for one tensor at a time,
/// as the file is written, so a view may produce them on demand.
pub fn save_views_atomic<S, V>(
    views: impl IntoIterator<Item = (S, V)>,
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: View,
{
    ff_fsio::write_atomically(path, |file| {
        safetensors::serialize_to_file(views, metadata, file.path()).map_err(std::io::Error::other)
    })?;
    Ok(())
}
