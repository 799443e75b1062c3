//! Setting a run up: the checkpoint it resumes, the engine that holds its trained tensors, their
//! optimizer, and the state restored into both.

use std::path::{Path, PathBuf};

use ff_config::ShardingStrategy;
use ff_fsdp::{Sharded, ShardedSetup};
use ff_model::CausalLm;

use crate::checkpoint::{
    check_complete, check_same_finetuning, load_optimizer, load_shard, load_weights, read_run_hash,
    read_trainer_state, shard_file, sharded_world_size, TrainerState, OPTIMIZER_FILE, RUN_FILE,
};
use crate::engine::{Engine, Trainables};
use crate::error::{TrainError, TrainResult};
use crate::optim::{AdamW, AdamWConfig};

use super::run_plan::{run_difference, RunPlan};
use super::saving::scatter_optimizer;
use super::Run;

/// A checkpoint this run resumes, checked against it.
pub(super) struct Resume {
    pub dir: PathBuf,
    pub saved: TrainerState,
    /// The world size that wrote it, when it holds one shard per rank.
    pub shards: Option<usize>,
}

/// What a run trains with.
pub(super) struct Setup {
    pub engine: Engine,
    pub optimizer: AdamW,
    /// The trained tensors' names as the model has them: checkpoints are written under these
    /// whatever the engine holds.
    pub full_names: Vec<String>,
    pub gradient_checkpointing: bool,
}

/// Checks that `dir` was written by this run's settings and is not finished, and loads its
/// weights into `model` (a sharded checkpoint's go into the engine, in [`restore`]).
pub(super) fn check_resume(
    model: &mut CausalLm,
    run: &Run<'_>,
    plan: &RunPlan,
    dir: PathBuf,
) -> TrainResult<Resume> {
    check_same_finetuning(&run.weights, &dir)?;
    check_complete(&run.weights, &dir)?;
    let saved = read_trainer_state(&dir)?;
    let Some(saved_hash) = read_run_hash(&dir)? else {
        return Err(TrainError::Checkpoint(format!(
            "{} does not say which data and batch settings wrote it (it has no {RUN_FILE}), so it cannot be resumed exactly; start over in another output_dir",
            dir.display()
        )));
    };
    if saved_hash != plan.hash {
        return Err(TrainError::Checkpoint(format!(
            "{} was written by a run with {}; resume with the same dataset, batch sizes, seed and step count, or start over in another output_dir",
            dir.display(),
            run_difference(&saved_hash, &plan.hash)
        )));
    }
    if saved.global_step >= plan.total_steps {
        return Err(TrainError::Checkpoint(format!(
            "{} is at step {} of {}, so its run is finished and resuming would only overwrite its results; set overwrite_output_dir: true to train again, or choose another output_dir",
            dir.display(),
            saved.global_step,
            plan.total_steps
        )));
    }
    let shards = sharded_world_size(&dir)?;
    if shards.is_none() {
        load_weights(model, &run.weights, &dir)?;
    }
    Ok(Resume { dir, saved, shards })
}

/// The engine the run's FSDP settings ask for (replicated without them, or with NO_SHARD), and
/// its optimizer, in memory or offloaded.
pub(super) fn build(model: &mut CausalLm, run: &Run<'_>) -> TrainResult<Setup> {
    let args = run.args;
    let full_names = Trainables::of(model).names;
    if full_names.is_empty() {
        return Err(TrainError::Config(
            "nothing to train: the fine-tuning settings leave every parameter frozen".into(),
        ));
    }
    let sharding = run
        .fsdp
        .as_ref()
        .filter(|f| f.config.sharding_strategy != ShardingStrategy::NoShard);
    let gradient_checkpointing = !args.disable_gradient_checkpointing
        || sharding.is_some_and(|f| f.config.activation_checkpointing);
    let mut engine = match sharding {
        Some(_) if !gradient_checkpointing => {
            return Err(TrainError::Config(
                "sharded FSDP recomputes each unit in backward, so it needs gradient checkpointing: remove disable_gradient_checkpointing or set fsdp_activation_checkpointing: true".into(),
            ))
        }
        Some(f) => Engine::Sharded(Box::new(Sharded::wrap(
            model,
            ShardedSetup {
                config: &f.config,
                group: run.group,
                local_world_size: f.local_world_size,
            },
        )?)),
        None => Engine::Replicated(Trainables::of(model)),
    };
    let adamw = AdamWConfig {
        beta1: args.adam_beta1,
        beta2: args.adam_beta2,
        eps: args.adam_epsilon,
        weight_decay: args.weight_decay,
    };
    let optimizer = match (&args.offload_optimizer_dir, &mut engine) {
        (None, _) => AdamW::new(adamw, engine.names()),
        (Some(dir), Engine::Replicated(t)) => t.offload_to(Path::new(dir), adamw)?,
        (Some(_), _) => {
            return Err(TrainError::Config(
                "offload_optimizer_dir keeps whole gradients, which a sharded FSDP strategy does not have; remove it or the FSDP config".into(),
            ))
        }
    };
    Ok(Setup {
        engine,
        optimizer,
        full_names,
        gradient_checkpointing,
    })
}

/// Puts the checkpoint's optimizer state (and a sharded checkpoint's trained shards) into the
/// setup, and its progress into `state`.
pub(super) fn restore(
    setup: &mut Setup,
    run: &Run<'_>,
    resume: Resume,
    state: &mut TrainerState,
) -> TrainResult<()> {
    let Resume { dir, saved, shards } = resume;
    let (rank, world) = (run.group.rank(), run.group.world_size());
    let restored = match (&setup.engine, shards) {
        (Engine::Sharded(s), Some(saved_world)) => {
            if saved_world != world {
                return Err(TrainError::Checkpoint(format!(
                    "{} was saved with SHARDED_STATE_DICT by {saved_world} ranks; resume it with {saved_world} ranks",
                    dir.display()
                )));
            }
            let path = dir.join(shard_file(rank, world));
            let (values, state) = load_shard(&path, &s.piece_labels())?;
            for (var, v) in s.vars.iter().zip(values) {
                var.set(&candle_core::Tensor::from_vec(
                    v,
                    var.shape(),
                    var.device(),
                )?)?;
            }
            state
        }
        (Engine::Replicated(_), Some(_)) => {
            return Err(TrainError::Checkpoint(format!(
            "{} was saved with SHARDED_STATE_DICT; resume it with the same FSDP launch settings",
            dir.display()
        )))
        }
        (engine, None) => {
            let optimizer_file = dir.join(OPTIMIZER_FILE);
            if !optimizer_file.exists() {
                return Err(TrainError::Checkpoint(format!(
                    "{} has no optimizer state (it was saved with save_only_model) and cannot be resumed",
                    dir.display()
                )));
            }
            let full = load_optimizer(&setup.full_names, &optimizer_file)?;
            match engine {
                Engine::Replicated(_) => full,
                Engine::Sharded(s) => scatter_optimizer(s, &setup.full_names, full)?,
            }
        }
    };
    setup.optimizer.restore(restored)?;
    state.global_step = saved.global_step;
    state.epoch = saved.epoch;
    state.total_flos = saved.total_flos;
    state.log_history = saved.log_history;
    Ok(())
}
