//! What a run writes so it can resume exactly: trained weights, optimizer moments, and
//! `trainer_state.json` (Hugging Face's file, which also tells where in the data the run was).

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ff_fsio::{write_json, JsonEnding};
use ff_model::finetune::LoraSpec;
use ff_model::peft::{
    load_adapter, read_adapter_config, save_adapter, save_adapter_weights, ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
};
use ff_model::safetensors_io::{save_atomic, save_views_atomic, SafetensorsFiles};
use ff_model::CausalLm;
use safetensors::tensor::View;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{TrainError, TrainResult};
use crate::optim::{AdamWState, Moment, MomentSource, Moments};

pub const TRAINER_STATE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const MODEL_FILE: &str = "model.safetensors";

/// How the trained weights are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum SavedWeights {
    /// A PEFT adapter.
    Lora(LoraSpec),
    /// The whole model in Hugging Face's layout (full and freeze tuning).
    Full,
}

/// Hugging Face's `trainer_state.json`, with the fields resume reads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrainerState {
    pub global_step: u64,
    pub epoch: f64,
    pub max_steps: u64,
    pub num_train_epochs: f64,
    pub logging_steps: f64,
    pub save_steps: f64,
    pub train_batch_size: u64,
    /// Hugging Face's estimate of the run's floating-point operations so far; see
    /// `trainer::flos_per_token`.
    #[serde(default)]
    pub total_flos: f64,
    pub log_history: Vec<Value>,
    #[serde(default)]
    pub best_metric: Option<f64>,
    #[serde(default)]
    pub best_model_checkpoint: Option<String>,
    #[serde(default = "yes")]
    pub is_world_process_zero: bool,
    /// Written to [`RUN_FILE`] beside this file, not in it.
    #[serde(skip)]
    pub run_hash: String,
}

fn yes() -> bool {
    true
}

/// Writes the trained weights of `model` into `dir` (adapter, or full model + config.json).
pub fn save_weights(
    model: &mut CausalLm,
    weights: &SavedWeights,
    base_model: &str,
    dir: &Path,
) -> TrainResult<()> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    match weights {
        SavedWeights::Lora(spec) => save_adapter(model, spec, base_model, dir)?,
        SavedWeights::Full => {
            let tensors: Vec<(String, Tensor)> = model
                .params_mut()
                .into_iter()
                .map(|(name, p)| (name, p.tensor().clone()))
                .collect();
            let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
            save_atomic(&tensors, Some(metadata), &dir.join(MODEL_FILE))?;
            let mut config = model.config.raw.clone();
            config.insert("torch_dtype".into(), Value::String("float32".into()));
            config.insert("dtype".into(), Value::String("float32".into()));
            write_json(&dir.join("config.json"), &config, JsonEnding::Bracket)?;
        }
    }
    Ok(())
}

/// Refuses a checkpoint whose trained weights are not the ones this run trains: an adapter under
/// full or freeze tuning or the other way round, or an adapter of another rank, alpha, set of
/// modules or scaling. Resuming it would train the checkpoint's adapter and save it beside this
/// run's adapter_config.json, an adapter that PEFT loads wrong or not at all.
pub fn check_same_finetuning(weights: &SavedWeights, dir: &Path) -> TrainResult<()> {
    let has_adapter = dir.join(ADAPTER_CONFIG).is_file();
    let has_model = dir.join(MODEL_FILE).is_file() || dir.join(SHARDED_MARKER).is_file();
    let refuse = |what: String| {
        Err(TrainError::Checkpoint(format!(
            "{} was written {what}; resume with the settings it was written with, or start over in another output_dir",
            dir.display()
        )))
    };
    match weights {
        SavedWeights::Full if has_adapter => refuse("by a LoRA run (finetuning_type: lora)".into()),
        SavedWeights::Lora(_) if !has_adapter && has_model => {
            refuse("by a full or freeze run, not a LoRA run".into())
        }
        SavedWeights::Lora(spec) if has_adapter => {
            let saved = read_adapter_config(dir)?;
            let sorted = |targets: &[String]| {
                let mut t = targets.to_vec();
                t.sort();
                t
            };
            let mut differences = Vec::new();
            if saved.rank != spec.rank {
                differences.push(format!(
                    "lora_rank {} (this run: {})",
                    saved.rank, spec.rank
                ));
            }
            if saved.alpha != spec.alpha {
                differences.push(format!(
                    "lora_alpha {} (this run: {})",
                    saved.alpha, spec.alpha
                ));
            }
            if sorted(&saved.targets) != sorted(&spec.targets) {
                differences.push(format!(
                    "lora_target {} (this run: {})",
                    saved.targets.join(","),
                    spec.targets.join(",")
                ));
            }
            if saved.use_rslora != spec.use_rslora {
                differences.push(format!(
                    "use_rslora {} (this run: {})",
                    saved.use_rslora, spec.use_rslora
                ));
            }
            if differences.is_empty() {
                Ok(())
            } else {
                refuse(format!("with {}", differences.join(", ")))
            }
        }
        _ => Ok(()),
    }
}

/// Refuses a checkpoint folder that lacks a file resume needs, naming it.
pub fn check_complete(weights: &SavedWeights, dir: &Path) -> TrainResult<()> {
    let weight_files: Vec<String> = match (sharded_world_size(dir)?, weights) {
        (Some(world), _) => (0..world).map(|r| shard_file(r, world)).collect(),
        (None, SavedWeights::Lora(_)) => {
            vec![ADAPTER_CONFIG.into(), ADAPTER_WEIGHTS.into()]
        }
        (None, SavedWeights::Full) => vec![MODEL_FILE.into()],
    };
    for name in weight_files
        .iter()
        .map(String::as_str)
        .chain([TRAINER_STATE])
    {
        if !dir.join(name).is_file() {
            return Err(TrainError::Checkpoint(format!(
                "checkpoint {} is incomplete: it has no {name}; resume from another checkpoint or start over",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Puts the weights saved by [`save_weights`] back into `model`.
pub fn load_weights(model: &mut CausalLm, weights: &SavedWeights, dir: &Path) -> TrainResult<()> {
    match weights {
        SavedWeights::Lora(_) => {
            load_adapter(model, dir)?;
        }
        SavedWeights::Full => {
            let files = SafetensorsFiles::open(&[dir.join(MODEL_FILE)])?;
            let device = model.device.clone();
            for (name, p) in model.params_mut() {
                let t = files.load(&name, Some(p.tensor().dims()), p.tensor().dtype(), &device)?;
                match p.var() {
                    Some(v) => v.set(&t)?,
                    None => *p = ff_model::Param::Frozen(t),
                }
            }
        }
    }
    Ok(())
}

/// Marks a checkpoint saved with SHARDED_STATE_DICT; holds the number of shard files.
pub const SHARDED_MARKER: &str = "fsdp_sharded.json";

/// The file rank `rank` of `world` writes in a SHARDED_STATE_DICT checkpoint.
pub fn shard_file(rank: usize, world: usize) -> String {
    format!("fsdp_rank{rank}_of_{world}.safetensors")
}

/// The number of ranks that wrote `dir`, when it is a SHARDED_STATE_DICT checkpoint.
pub fn sharded_world_size(dir: &Path) -> TrainResult<Option<usize>> {
    let path = dir.join(SHARDED_MARKER);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    match value.get("world_size").and_then(Value::as_u64) {
        Some(world) if world > 0 => Ok(Some(world as usize)),
        _ => Err(TrainError::Checkpoint(format!(
            "{} is corrupt: it does not say how many ranks wrote the checkpoint",
            path.display()
        ))),
    }
}

/// One rank's part of a SHARDED_STATE_DICT checkpoint: its pieces of the trained tensors and
/// their optimizer moments, under labels that say which elements they are.
pub fn save_shard(
    path: &Path,
    labels: &[String],
    values: &[Vec<f32>],
    optimizer: &AdamWState,
) -> TrainResult<()> {
    let mut tensors = Vec::new();
    for ((label, v), m) in labels.iter().zip(values).zip(&optimizer.moments) {
        tensors.push((
            format!("param.{label}"),
            Tensor::from_slice(v, v.len(), &Device::Cpu)?,
        ));
        if !m.exp_avg.is_empty() {
            let n = m.exp_avg.len();
            tensors.push((
                format!("exp_avg.{label}"),
                Tensor::from_slice(&m.exp_avg, n, &Device::Cpu)?,
            ));
            tensors.push((
                format!("exp_avg_sq.{label}"),
                Tensor::from_slice(&m.exp_avg_sq, n, &Device::Cpu)?,
            ));
        }
    }
    let metadata = HashMap::from([("step".to_string(), optimizer.step.to_string())]);
    save_atomic(&tensors, Some(metadata), path)?;
    Ok(())
}

/// Turns a SHARDED_STATE_DICT checkpoint of a LoRA run into a PEFT adapter folder `out`
/// (`adapter_model.safetensors` and `adapter_config.json`), for `export` and for PEFT.
pub fn consolidate_sharded_adapter(dir: &Path, out: &Path) -> TrainResult<()> {
    let world = sharded_world_size(dir)?.ok_or_else(|| {
        TrainError::Checkpoint(format!(
            "{} is not a SHARDED_STATE_DICT checkpoint",
            dir.display()
        ))
    })?;
    let config = dir.join("adapter_config.json");
    if !config.is_file() {
        return Err(TrainError::Checkpoint(format!(
            "{} holds sharded full-model weights, not an adapter; export the run's output_dir, which is always whole",
            dir.display()
        )));
    }
    let marker = dir.join(SHARDED_MARKER);
    let text = std::fs::read_to_string(&marker).map_err(|e| TrainError::io(&marker, e))?;
    let corrupt =
        |what: &str| TrainError::Checkpoint(format!("{} is corrupt: {what}", marker.display()));
    let value: Value = serde_json::from_str(&text).map_err(|_| corrupt("not JSON"))?;
    let shapes = value
        .get("tensors")
        .and_then(Value::as_object)
        .ok_or_else(|| corrupt("it lists no tensors"))?;
    let mut full: HashMap<String, (Vec<usize>, Vec<f32>, usize)> = HashMap::new();
    for (name, shape) in shapes {
        let shape: Vec<usize> = serde_json::from_value(shape.clone())
            .map_err(|_| corrupt("a tensor shape is not a list of sizes"))?;
        let n = shape.iter().product();
        full.insert(name.clone(), (shape, vec![0.0; n], 0));
    }
    for rank in 0..world {
        let path = dir.join(shard_file(rank, world));
        let bytes = std::fs::read(&path).map_err(|e| TrainError::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|_| {
            TrainError::Checkpoint(format!(
                "{} is corrupt: its header cannot be read",
                path.display()
            ))
        })?;
        for (key, view) in st.tensors() {
            let Some(label) = key.strip_prefix("param.") else {
                continue;
            };
            let bad = || {
                TrainError::Checkpoint(format!(
                    "{} holds `{key}`, which is not a piece of a listed tensor",
                    path.display()
                ))
            };
            let (name, range) = label.rsplit_once('[').ok_or_else(bad)?;
            let (start, end) = range
                .trim_end_matches(']')
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
                .ok_or_else(bad)?;
            let (_, values, filled) = full.get_mut(name).ok_or_else(bad)?;
            let data = view.data();
            if end > values.len() || start > end || data.len() != (end - start) * 4 {
                return Err(bad());
            }
            for (v, b) in values[start..end].iter_mut().zip(data.chunks_exact(4)) {
                *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            *filled += end - start;
        }
    }
    let mut tensors = Vec::with_capacity(full.len());
    for (name, (shape, values, filled)) in full {
        if filled != values.len() {
            return Err(TrainError::Checkpoint(format!(
                "{} is incomplete: the shard files hold {filled} of `{name}`'s {} values",
                dir.display(),
                values.len()
            )));
        }
        tensors.push((name, Tensor::from_vec(values, shape, &Device::Cpu)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    save_adapter_weights(&tensors, out)?;
    std::fs::copy(&config, out.join("adapter_config.json"))
        .map_err(|e| TrainError::io(&config, e))?;
    Ok(())
}

/// Reads what [`save_shard`] wrote for the pieces `labels`.
pub fn load_shard(path: &Path, labels: &[String]) -> TrainResult<(Vec<Vec<f32>>, AdamWState)> {
    let step = read_step_metadata(path)?;
    let files = SafetensorsFiles::open(&[path.to_path_buf()])?;
    let read = |k: &str| -> TrainResult<Vec<f32>> {
        if !files.contains(k) {
            return Err(TrainError::Checkpoint(format!(
                "{} has no `{k}`; it was written by a run with other FSDP or fine-tuning settings",
                path.display()
            )));
        }
        Ok(files
            .load(k, None, DType::F32, &Device::Cpu)?
            .to_vec1::<f32>()?)
    };
    let mut values = Vec::with_capacity(labels.len());
    let mut moments = Vec::with_capacity(labels.len());
    for label in labels {
        values.push(read(&format!("param.{label}"))?);
        let key = format!("exp_avg.{label}");
        moments.push(if files.contains(&key) {
            Moments {
                exp_avg: read(&key)?,
                exp_avg_sq: read(&format!("exp_avg_sq.{label}"))?,
            }
        } else {
            Moments::default()
        });
    }
    Ok((values, AdamWState { step, moments }))
}

/// Writes the moments of `optimizer` (whole tensors, in `names` order) to `path`. Each moment
/// is fetched as the file reaches it, so moments kept on disk are never all in memory at once.
pub fn save_optimizer(
    optimizer: &dyn MomentSource,
    names: &[String],
    path: &Path,
) -> TrainResult<()> {
    let failure = RefCell::new(None);
    let mut views = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let Some(len) = optimizer.moment_len(i) else {
            continue;
        };
        for (prefix, which) in [
            ("exp_avg", Moment::ExpAvg),
            ("exp_avg_sq", Moment::ExpAvgSq),
        ] {
            views.push((
                format!("{prefix}.{name}"),
                MomentView {
                    optimizer,
                    param: i,
                    which,
                    shape: [len],
                    failure: &failure,
                },
            ));
        }
    }
    let metadata = HashMap::from([("step".to_string(), optimizer.step().to_string())]);
    save_views_atomic(views, Some(metadata), path)?;
    if let Some(e) = failure.into_inner() {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

/// One moment as a safetensors view, read when the writer asks for its bytes. A read that fails
/// gives zeros and leaves its error in `failure`, for the caller to remove the file.
struct MomentView<'a> {
    optimizer: &'a dyn MomentSource,
    param: usize,
    which: Moment,
    shape: [usize; 1],
    failure: &'a RefCell<Option<TrainError>>,
}

impl View for MomentView<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self.optimizer.moment_bytes(self.param, self.which) {
            Ok(bytes) => bytes,
            Err(e) => {
                self.failure.borrow_mut().get_or_insert(e);
                Cow::Owned(vec![0; self.data_len()])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.shape[0] * 4
    }
}

pub fn load_optimizer(names: &[String], path: &Path) -> TrainResult<AdamWState> {
    let step = read_step_metadata(path)?;
    let files = SafetensorsFiles::open(&[path.to_path_buf()])?;
    let mut moments = Vec::with_capacity(names.len());
    for name in names {
        let key = format!("exp_avg.{name}");
        if !files.contains(&key) {
            moments.push(Moments::default());
            continue;
        }
        let read = |k: &str| -> TrainResult<Vec<f32>> {
            Ok(files
                .load(k, None, DType::F32, &Device::Cpu)?
                .to_vec1::<f32>()?)
        };
        moments.push(Moments {
            exp_avg: read(&key)?,
            exp_avg_sq: read(&format!("exp_avg_sq.{name}"))?,
        });
    }
    Ok(AdamWState { step, moments })
}

fn read_step_metadata(path: &Path) -> TrainResult<u64> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::io(path, e))?;
    let corrupt = || {
        TrainError::Checkpoint(format!(
            "{} is corrupt: its header cannot be read",
            path.display()
        ))
    };
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|_| corrupt())?;
    metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get("step"))
        .and_then(|s| s.parse().ok())
        .ok_or_else(corrupt)
}

/// Copies each of `files` into `dir` under its own name.
pub fn copy_files(files: &[PathBuf], dir: &Path) -> TrainResult<()> {
    for from in files {
        let name = from
            .file_name()
            .ok_or_else(|| TrainError::Config(format!("{} names no file", from.display())))?;
        std::fs::copy(from, dir.join(name)).map_err(|e| TrainError::io(from, e))?;
    }
    Ok(())
}

/// Beside `trainer_state.json` in a checkpoint: the settings that decide the data order and
/// step layout. Resuming under other settings would silently train on other data, so it is
/// refused. A file of its own, because Hugging Face's `TrainerState` refuses unknown keys.
pub const RUN_FILE: &str = "ferrofactory_run.json";

pub fn write_run_hash(dir: &Path, hash: &str) -> TrainResult<()> {
    Ok(write_json(
        &dir.join(RUN_FILE),
        &serde_json::json!({ "run_hash": hash }),
        JsonEnding::Bracket,
    )?)
}

/// The run hash a checkpoint was written with: from [`RUN_FILE`], or from `trainer_state.json`
/// where earlier versions kept it. `None` when neither has it.
pub fn read_run_hash(dir: &Path) -> TrainResult<Option<String>> {
    let (path, key) = match dir.join(RUN_FILE) {
        path if path.is_file() => (path, "run_hash"),
        _ => (dir.join(TRAINER_STATE), "ferrofactory_run_hash"),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        TrainError::Checkpoint(format!("{} is not valid JSON ({e})", path.display()))
    })?;
    Ok(value.get(key).and_then(Value::as_str).map(str::to_string))
}

pub fn read_trainer_state(dir: &Path) -> TrainResult<TrainerState> {
    let path = dir.join(TRAINER_STATE);
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        TrainError::Checkpoint(format!(
            "{} is not a valid trainer state ({e})",
            path.display()
        ))
    })
}

/// `checkpoint-N` folders of `output_dir`, oldest first.
pub fn list_checkpoints(output_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(output_dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            entry.path().is_dir().then_some((step, entry.path()))
        })
        .collect();
    found.sort();
    found
}

/// Deletes the oldest checkpoints so that at most `limit` remain.
pub fn rotate_checkpoints(output_dir: &Path, limit: u64) -> TrainResult<()> {
    let found = list_checkpoints(output_dir);
    let excess = found.len().saturating_sub(limit as usize);
    for (_, dir) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    Ok(())
}
