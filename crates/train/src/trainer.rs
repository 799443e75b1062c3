//! The training run: epochs of shuffled micro-batches, logging, evaluation, checkpoints, resume
//! and the files LLaMA-Factory leaves in `output_dir`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ff_config::{
    FsdpConfig, IntervalStrategy, LrSchedulerType, ShardingStrategy, StateDictType, TrainArgs,
};
use ff_dist::ProcessGroup;
use ff_fsdp::{Residency, Sharded, ShardedSetup};
use ff_fsio::{write_json, JsonEnding};
use ff_model::dropout::derive_seed;
use ff_model::peft::write_adapter_config;
use ff_model::CausalLm;
use serde_json::{json, Map, Value};

use crate::batch::{collate, label_tokens, Example};
use crate::checkpoint::{
    check_complete, check_same_finetuning, copy_files, list_checkpoints, load_optimizer,
    load_shard, load_weights, read_run_hash, read_trainer_state, rotate_checkpoints,
    save_optimizer, save_shard, save_weights, shard_file, sharded_world_size, write_run_hash,
    SavedWeights, TrainerState, OPTIMIZER_FILE, RUN_FILE, SHARDED_MARKER, TRAINER_STATE,
};
use crate::engine::Engine;
use crate::error::{TrainError, TrainResult};
use crate::offload::check_offload_dir;
use crate::optim::{AdamW, AdamWConfig, AdamWState, MomentSource, Moments};
use crate::sampler::{epoch_order, rank_slice, EpochPlan};
use crate::schedule::{warmup_steps, Schedule, ScheduleKind};
use crate::step::{eval_nll, train_step, StepOptions, Trainables};

pub const TRAINER_LOG: &str = "trainer_log.jsonl";

/// Receives progress as it happens: a progress bar on a terminal, log lines elsewhere.
pub trait Observer {
    fn on_start(&mut self, total_steps: u64, first_step: u64);
    fn on_step(&mut self, step: u64, loss: f64, lr: f64);
    /// A record as Hugging Face Trainer prints it (`{'loss': ..., 'learning_rate': ..., ...}`).
    fn on_log(&mut self, record: &Map<String, Value>);
    fn on_message(&mut self, message: &str);
    fn on_finish(&mut self);
}

/// Everything a run needs besides the model.
pub struct Run<'a> {
    pub args: &'a TrainArgs,
    pub output_dir: PathBuf,
    pub weights: SavedWeights,
    /// Written into adapter_config.json as `base_model_name_or_path`.
    pub base_model: String,
    pub train: &'a [Example],
    pub eval: &'a [Example],
    pub pad_token_id: u32,
    /// Set by the first Ctrl-C: the run stops after the current step and checkpoints.
    pub stop: &'a AtomicBool,
    /// The data-parallel group; rank 0 alone writes files.
    pub group: &'a dyn ProcessGroup,
    /// FSDP settings from `launch`; `None` (or NO_SHARD) trains replicated.
    pub fsdp: Option<FsdpRun>,
    /// Files copied beside the weights into the output folder and every checkpoint: the
    /// tokenizer and template files, as Hugging Face's Trainer saves its processing class.
    pub tokenizer_files: Vec<PathBuf>,
    pub observer: &'a mut dyn Observer,
}

/// FSDP settings and the node layout they need.
#[derive(Clone, Debug)]
pub struct FsdpRun {
    pub config: FsdpConfig,
    /// Ranks per node (HYBRID_SHARD shards within a node).
    pub local_world_size: usize,
}

/// What this rank held, as the engine counts it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryReport {
    /// Parameter bytes this rank keeps between uses (its shards, or the whole model).
    pub parameter_bytes: usize,
    /// The whole model's parameter bytes.
    pub model_bytes: usize,
    /// Optimizer moment bytes this rank keeps.
    pub optimizer_bytes: usize,
    /// The largest unit gathered (0 when nothing is sharded).
    pub largest_unit_bytes: usize,
    /// The most parameter bytes gathered at one time.
    pub peak_gathered_bytes: usize,
    /// Of `parameter_bytes`, quantized weights (QLoRA's base).
    pub quantized_bytes: usize,
    /// The whole model's quantized weight bytes.
    pub model_quantized_bytes: usize,
}

/// What `train_results.json` holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub global_step: u64,
    pub train_loss: f64,
    pub eval_loss: Option<f64>,
    /// Present for a sharded run.
    pub memory: Option<MemoryReport>,
}

/// Checks `output_dir` before any work, as LLaMA-Factory does: an existing non-empty folder is
/// resumed from its newest checkpoint, refused when it has none, or reused with
/// `overwrite_output_dir` (which drops the old trainer log). Returns the checkpoint to resume.
pub fn prepare_output_dir(args: &TrainArgs, output_dir: &Path) -> TrainResult<Option<PathBuf>> {
    let explicit = match args.resume_from_checkpoint.as_deref() {
        None => None,
        Some(v) if v.eq_ignore_ascii_case("false") => None,
        Some(v) if v.eq_ignore_ascii_case("true") => match list_checkpoints(output_dir).pop() {
            Some((_, dir)) => Some(dir),
            None => {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint is true but {} holds no checkpoint-N folder",
                    output_dir.display()
                )))
            }
        },
        Some(path) => {
            let dir = PathBuf::from(path);
            if !dir.exists() {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint {path} does not exist"
                )));
            }
            if !dir.join(TRAINER_STATE).is_file() {
                return Err(TrainError::Config(format!(
                    "resume_from_checkpoint {path} is not a checkpoint folder (it has no {TRAINER_STATE})"
                )));
            }
            Some(dir)
        }
    };
    if output_dir.exists() && !output_dir.is_dir() {
        return Err(TrainError::Config(format!(
            "output_dir {} is a file, not a folder; choose another output_dir",
            output_dir.display()
        )));
    }
    if explicit.is_some() {
        return Ok(explicit);
    }
    let non_empty = std::fs::read_dir(output_dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    if !non_empty {
        return Ok(None);
    }
    if args.overwrite_output_dir {
        let log = output_dir.join(TRAINER_LOG);
        if log.exists() {
            std::fs::remove_file(&log).map_err(|e| TrainError::io(&log, e))?;
        }
        return Ok(None);
    }
    match list_checkpoints(output_dir).pop() {
        Some((_, dir)) => Ok(Some(dir)),
        None => Err(TrainError::Config(format!(
            "output_dir {} already exists and is not empty; set overwrite_output_dir: true or choose another output_dir",
            output_dir.display()
        ))),
    }
}

fn schedule_kind(args: &TrainArgs) -> TrainResult<ScheduleKind> {
    let kwarg = |key: &str| args.lr_scheduler_kwargs.get(key).and_then(|v| v.as_f64());
    Ok(match args.lr_scheduler_type {
        LrSchedulerType::Constant => ScheduleKind::Constant,
        LrSchedulerType::ConstantWithWarmup => ScheduleKind::ConstantWithWarmup,
        LrSchedulerType::Linear => ScheduleKind::Linear,
        LrSchedulerType::Cosine => ScheduleKind::Cosine,
        LrSchedulerType::CosineWithRestarts => ScheduleKind::CosineWithRestarts {
            cycles: kwarg("num_cycles").unwrap_or(1.0) as u32,
        },
        LrSchedulerType::Polynomial => ScheduleKind::Polynomial {
            lr_end: kwarg("lr_end").unwrap_or(1e-7),
            power: kwarg("power").unwrap_or(1.0),
        },
        LrSchedulerType::CosineWithMinLr => {
            let rate = match (kwarg("min_lr_rate"), kwarg("min_lr")) {
                (Some(rate), _) => rate,
                (None, Some(min_lr)) => min_lr / args.learning_rate,
                (None, None) => {
                    return Err(TrainError::Config(
                        "lr_scheduler_type cosine_with_min_lr needs lr_scheduler_kwargs with min_lr or min_lr_rate".into(),
                    ))
                }
            };
            ScheduleKind::CosineWithMinLr { min_lr_rate: rate }
        }
    })
}

/// A step interval given as a count, or as a fraction of the run when below 1 (as in HF).
fn interval(value: f64, total_steps: u64) -> u64 {
    if value < 1.0 {
        ((value * total_steps as f64).ceil() as u64).max(1)
    } else {
        value as u64
    }
}

/// A fingerprint of what decides which examples each step sees.
fn run_hash(args: &TrainArgs, num_examples: usize, total_steps: u64) -> String {
    format!(
        "n={num_examples};bs={};ga={};seed={};steps={total_steps}",
        args.per_device_train_batch_size, args.gradient_accumulation_steps, args.seed
    )
}

/// What differs between two [`run_hash`]es, in the words of the settings behind them.
fn run_difference(saved: &str, current: &str) -> String {
    let fields = |hash: &str| -> HashMap<String, String> {
        hash.split(';')
            .filter_map(|f| f.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let (saved, current) = (fields(saved), fields(current));
    let differences: Vec<String> = [
        ("n", "training examples"),
        ("bs", "per_device_train_batch_size"),
        ("ga", "gradient_accumulation_steps"),
        ("seed", "seed"),
        ("steps", "training steps"),
    ]
    .iter()
    .filter_map(|(key, words)| {
        let (was, is) = (saved.get(*key)?, current.get(*key)?);
        (was != is).then(|| format!("{words} {was} (this run: {is})"))
    })
    .collect();
    if differences.is_empty() {
        "other data or batch settings".into()
    } else {
        differences.join(", ")
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// Floating-point operations per token as Hugging Face's Trainer estimates them for
/// `total_flos`: six per parameter, adapters included, the embedding table (and a head tied to
/// it) left out. Counted on the whole model whatever a rank holds.
fn flos_per_token(model: &mut CausalLm) -> f64 {
    let (params, _) = model.num_params();
    6.0 * (params - model.embed_tokens.elem_count()) as f64
}

/// The token slots of one step's micro-batches on every rank, as `total_flos` counts them:
/// each rank's share padded to its longest example rounded up to 8, as LLaMA-Factory's
/// collator pads for training (ours pads less; the loss is the same).
fn padded_tokens(
    micro_batches: &[std::ops::Range<usize>],
    order: &[usize],
    examples: &[Example],
    world: usize,
) -> usize {
    let mut tokens = 0;
    for range in micro_batches {
        for rank in 0..world {
            let share = &order[rank_slice(range.clone(), rank, world)];
            let longest = share
                .iter()
                .map(|&i| examples[i].input_ids.len())
                .max()
                .unwrap_or(0);
            tokens += share.len() * longest.next_multiple_of(8);
        }
    }
    tokens
}

/// Refuses an `offload_optimizer_dir` that cannot hold the offload files, before any work.
pub fn check_offload(args: &TrainArgs) -> TrainResult<()> {
    match &args.offload_optimizer_dir {
        Some(dir) => check_offload_dir(Path::new(dir)),
        None => Ok(()),
    }
}

/// Trains `model` and writes everything LLaMA-Factory leaves in `output_dir`.
pub fn train(model: &mut CausalLm, run: Run<'_>) -> TrainResult<Summary> {
    let args = run.args;
    let out = &run.output_dir;
    let (rank, world) = (run.group.rank(), run.group.world_size());
    let main = rank == 0;
    check_offload(args)?;
    // Rank 0 alone inspects and prepares the folder; the others follow its decision.
    let resume_from = if main {
        let resume = prepare_output_dir(args, out)?;
        std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
        resume
    } else {
        None
    };
    let resume_text = resume_from
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let resume_text = run.group.broadcast_blob(resume_text.as_bytes(), 0)?;
    let resume_from = (!resume_text.is_empty())
        .then(|| PathBuf::from(String::from_utf8_lossy(&resume_text).into_owned()));
    if run.train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    if run.train.iter().all(|e| label_tokens(&e.labels) == 0) {
        return Err(TrainError::Config(format!(
            "no training example keeps a token to learn after cutting to cutoff_len {}, so the loss would be empty; raise cutoff_len",
            args.cutoff_len
        )));
    }

    let plan = EpochPlan::new(
        run.train.len(),
        args.per_device_train_batch_size as usize,
        world,
        args.gradient_accumulation_steps as usize,
    );
    let steps_per_epoch = plan.steps_per_epoch() as u64;
    let total_steps = if args.max_steps > 0 {
        args.max_steps as u64
    } else {
        (args.num_train_epochs * steps_per_epoch as f64).ceil() as u64
    };
    let schedule = Schedule {
        kind: schedule_kind(args)?,
        base_lr: args.learning_rate,
        warmup_steps: warmup_steps(args.warmup_steps, args.warmup_ratio, total_steps),
        total_steps,
    };
    let logging_every = interval(args.logging_steps, total_steps);
    let save_every = interval(args.save_steps, total_steps);
    let eval_every = interval(args.eval_steps.unwrap_or(args.logging_steps), total_steps);
    let hash = run_hash(args, run.train.len(), total_steps);
    let flos_per_token = flos_per_token(model);

    let mut state = TrainerState {
        max_steps: total_steps,
        // Hugging Face records the epochs that max_steps spans, whole.
        num_train_epochs: if args.max_steps > 0 {
            total_steps.div_ceil(steps_per_epoch.max(1)) as f64
        } else {
            args.num_train_epochs
        },
        logging_steps: args.logging_steps,
        save_steps: args.save_steps,
        train_batch_size: args.per_device_train_batch_size,
        is_world_process_zero: true,
        run_hash: hash.clone(),
        ..TrainerState::default()
    };
    let resumed = match &resume_from {
        Some(dir) => {
            check_same_finetuning(&run.weights, dir)?;
            check_complete(&run.weights, dir)?;
            let saved = read_trainer_state(dir)?;
            let Some(saved_hash) = read_run_hash(dir)? else {
                return Err(TrainError::Checkpoint(format!(
                    "{} does not say which data and batch settings wrote it (it has no {RUN_FILE}), so it cannot be resumed exactly; start over in another output_dir",
                    dir.display()
                )));
            };
            if saved_hash != hash {
                return Err(TrainError::Checkpoint(format!(
                    "{} was written by a run with {}; resume with the same dataset, batch sizes, seed and step count, or start over in another output_dir",
                    dir.display(),
                    run_difference(&saved_hash, &hash)
                )));
            }
            if saved.global_step >= total_steps {
                return Err(TrainError::Checkpoint(format!(
                    "{} is at step {} of {total_steps}, so its run is finished and resuming would only overwrite its results; set overwrite_output_dir: true to train again, or choose another output_dir",
                    dir.display(),
                    saved.global_step
                )));
            }
            let shards = sharded_world_size(dir)?;
            if shards.is_none() {
                load_weights(model, &run.weights, dir)?;
            }
            Some((saved, shards))
        }
        None => None,
    };
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
    let mut optimizer = match (&args.offload_optimizer_dir, &mut engine) {
        (None, _) => AdamW::new(adamw, engine.names()),
        (Some(dir), Engine::Replicated(t)) => t.offload_to(Path::new(dir), adamw)?,
        (Some(_), _) => {
            return Err(TrainError::Config(
                "offload_optimizer_dir keeps whole gradients, which a sharded FSDP strategy does not have; remove it or the FSDP config".into(),
            ))
        }
    };
    if let (Some(dir), Some((saved, resumed_shards))) = (&resume_from, resumed) {
        let resumed_state = match (&engine, resumed_shards) {
            (Engine::Sharded(s), Some(world)) => {
                if world != run.group.world_size() {
                    return Err(TrainError::Checkpoint(format!(
                        "{} was saved with SHARDED_STATE_DICT by {world} ranks; resume it with {world} ranks",
                        dir.display()
                    )));
                }
                let path = dir.join(shard_file(rank, world));
                let (values, state) = load_shard(&path, &s.piece_labels())?;
                for (var, v) in s.vars.iter().zip(values) {
                    var.set(&candle_core::Tensor::from_vec(v, var.shape(), var.device())?)?;
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
                let full = load_optimizer(&full_names, &optimizer_file)?;
                match engine {
                    Engine::Replicated(_) => full,
                    Engine::Sharded(s) => scatter_optimizer(s, &full_names, full)?,
                }
            }
        };
        optimizer.restore(resumed_state)?;
        state.global_step = saved.global_step;
        state.epoch = saved.epoch;
        state.total_flos = saved.total_flos;
        state.log_history = saved.log_history;
        run.observer.on_message(&format!(
            "resuming from {} at step {}",
            dir.display(),
            saved.global_step
        ));
    }

    if let Engine::Replicated(t) = &engine {
        t.broadcast_from_rank0(run.group)?;
    }
    let options = StepOptions {
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        gradient_checkpointing,
    };
    let eval_enabled =
        !run.eval.is_empty() && (args.do_eval || args.eval_strategy != IntervalStrategy::No);
    let start = Instant::now();
    let first_step = state.global_step;
    let mut loss_since_log = 0.0;
    let mut steps_since_log = 0u64;
    let mut loss_total = 0.0;
    let mut order: Option<(u64, Vec<usize>)> = None;
    run.observer.on_start(total_steps, first_step);

    while state.global_step < total_steps {
        let step = state.global_step;
        let epoch = step / steps_per_epoch;
        let step_in_epoch = (step % steps_per_epoch) as usize;
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            order = Some((
                epoch,
                epoch_order(run.train.len(), args.data_seed.unwrap_or(args.seed), epoch),
            ));
        }
        let indices = &order.as_ref().expect("set above").1;
        let ranges = plan.step_micro_batches(step_in_epoch, run.train.len());
        let step_flos = flos_per_token * padded_tokens(&ranges, indices, run.train, world) as f64;
        let micro_batches: Vec<_> = ranges
            .into_iter()
            .map(|range| {
                let mine = rank_slice(range, rank, world);
                let examples: Vec<&Example> =
                    indices[mine].iter().map(|&i| &run.train[i]).collect();
                collate(&examples, run.pad_token_id)
            })
            .collect();
        let lr = schedule.lr(step);
        let stats = train_step(
            model,
            &mut engine,
            &mut optimizer,
            &micro_batches,
            lr,
            options,
            derive_seed(args.seed, step),
            run.group,
        )?;
        state.global_step += 1;
        state.total_flos += step_flos;
        let step = state.global_step;
        state.epoch = epoch as f64 + (step_in_epoch + 1) as f64 / steps_per_epoch as f64;
        loss_since_log += stats.loss;
        loss_total += stats.loss;
        steps_since_log += 1;
        run.observer.on_step(step, stats.loss, lr);

        let elapsed = start.elapsed().as_secs_f64();
        let per_step = elapsed / (step - first_step) as f64;
        let remaining = per_step * (total_steps - step) as f64;
        if step.is_multiple_of(logging_every) {
            let mut record = Map::new();
            record.insert(
                "loss".into(),
                json!(loss_since_log / steps_since_log as f64),
            );
            record.insert("grad_norm".into(), json!(stats.grad_norm));
            record.insert("learning_rate".into(), json!(schedule.lr(step)));
            record.insert("epoch".into(), json!(state.epoch));
            run.observer.on_log(&record);
            let line = json!({
                "current_steps": step,
                "total_steps": total_steps,
                "loss": record["loss"],
                "lr": record["learning_rate"],
                "epoch": record["epoch"],
                "percentage": round(step as f64 / total_steps as f64 * 100.0, 2),
                "elapsed_time": duration(elapsed),
                "remaining_time": duration(remaining),
            });
            if main {
                append_log_line(out, &line)?;
            }
            record.insert("step".into(), json!(step));
            state.log_history.push(Value::Object(record));
            loss_since_log = 0.0;
            steps_since_log = 0;
        }
        let epoch_end = step.is_multiple_of(steps_per_epoch);
        let eval_now = eval_enabled
            && match args.eval_strategy {
                IntervalStrategy::Steps => step.is_multiple_of(eval_every),
                IntervalStrategy::Epoch => epoch_end,
                IntervalStrategy::No => false,
            };
        let evaluation = if eval_now {
            evaluate_where_needed(model, &mut engine, &run)?
        } else {
            None
        };
        if let (Some(evaluation), true) = (evaluation, main) {
            let mut record = evaluation.metrics(&run);
            record.insert("epoch".into(), json!(state.epoch));
            run.observer.on_log(&record);
            append_log_line(
                out,
                &json!({
                    "current_steps": step,
                    "total_steps": total_steps,
                    "eval_loss": evaluation.loss,
                    "epoch": record["epoch"],
                    "percentage": round(step as f64 / total_steps as f64 * 100.0, 2),
                    "elapsed_time": duration(elapsed),
                    "remaining_time": duration(remaining),
                }),
            )?;
            record.insert("step".into(), json!(step));
            state.log_history.push(Value::Object(record));
        }
        // Every rank must stop at the same step, so the flag is agreed on collectively.
        let mut flag = [f32::from(u8::from(run.stop.load(Ordering::SeqCst)))];
        run.group.all_reduce_sum(&mut flag)?;
        let interrupted = flag[0] > 0.0;
        let save_now = match args.save_strategy {
            IntervalStrategy::Steps => step.is_multiple_of(save_every),
            IntervalStrategy::Epoch => epoch_end,
            IntervalStrategy::No => false,
        };
        if (save_now || interrupted) && step < total_steps {
            optimizer.finish()?;
            let dir = save_checkpoint(model, &run, &mut engine, &optimizer, &state, &full_names)?;
            if interrupted {
                run.observer.on_finish();
                return Err(TrainError::Interrupted {
                    step,
                    checkpoint: dir,
                });
            }
        }
    }
    optimizer.finish()?;
    run.observer.on_finish();

    let runtime = start.elapsed().as_secs_f64();
    let steps_run = (state.global_step - first_step).max(1) as f64;
    let train_loss = loss_total / steps_run;
    let eval_loss = write_final_outputs(
        model,
        &run,
        &mut engine,
        &optimizer,
        &mut state,
        &full_names,
        FinalFigures {
            total_steps,
            steps_run,
            runtime,
            train_loss,
            samples: samples_of(args, &plan, total_steps, run.train.len()),
            eval_enabled,
        },
    )?;
    let memory = match &engine {
        Engine::Sharded(s) => {
            let a = s.accounting();
            Some(MemoryReport {
                parameter_bytes: a.shard_bytes,
                model_bytes: a.full_bytes,
                optimizer_bytes: optimizer_bytes(&optimizer.state),
                largest_unit_bytes: a.largest_unit_bytes,
                peak_gathered_bytes: a.peak_gathered_bytes,
                quantized_bytes: a.quantized_shard_bytes,
                model_quantized_bytes: a.quantized_full_bytes,
            })
        }
        Engine::Replicated(_) => None,
    };
    Ok(Summary {
        global_step: state.global_step,
        train_loss,
        eval_loss,
        memory,
    })
}

fn optimizer_bytes(state: &AdamWState) -> usize {
    state
        .moments
        .iter()
        .map(|m| (m.exp_avg.len() + m.exp_avg_sq.len()) * 4)
        .sum()
}

/// The optimizer state of whole tensors (as a replicated run keeps it) cut into this rank's pieces.
fn scatter_optimizer(
    engine: &Sharded,
    names: &[String],
    full: AdamWState,
) -> TrainResult<AdamWState> {
    let mut avg = HashMap::new();
    let mut avg_sq = HashMap::new();
    for (name, m) in names.iter().zip(full.moments) {
        if !m.exp_avg.is_empty() {
            avg.insert(name.clone(), m.exp_avg);
            avg_sq.insert(name.clone(), m.exp_avg_sq);
        }
    }
    let moments = engine
        .scatter_values(&avg)?
        .into_iter()
        .zip(engine.scatter_values(&avg_sq)?)
        .map(|(exp_avg, exp_avg_sq)| Moments {
            exp_avg,
            exp_avg_sq,
        })
        .collect();
    Ok(AdamWState {
        step: full.step,
        moments,
    })
}

/// The optimizer state of whole tensors, in `names` order, gathered from the pieces of a
/// sharded run (collective).
fn full_optimizer_state(
    s: &Sharded,
    optimizer: &AdamW,
    names: &[String],
) -> TrainResult<AdamWState> {
    // Moments never updated are zeros, as AdamW starts them; every rank must send its share.
    let gather = |moment: fn(&Moments) -> &Vec<f32>| -> TrainResult<HashMap<String, Vec<f32>>> {
        let per_piece: Vec<Vec<f32>> = optimizer
            .state
            .moments
            .iter()
            .zip(&s.vars)
            .map(|(m, var)| match moment(m) {
                v if v.is_empty() => vec![0.0; var.elem_count()],
                v => v.clone(),
            })
            .collect();
        Ok(s.gather_values(&per_piece)?.into_iter().collect())
    };
    let mut avg = gather(|m| &m.exp_avg)?;
    let mut avg_sq = gather(|m| &m.exp_avg_sq)?;
    let moments = names
        .iter()
        .map(|name| match (avg.remove(name), avg_sq.remove(name)) {
            (Some(exp_avg), Some(exp_avg_sq)) if optimizer.state.step > 0 => Moments {
                exp_avg,
                exp_avg_sq,
            },
            _ => Moments::default(),
        })
        .collect();
    Ok(AdamWState {
        step: optimizer.state.step,
        moments,
    })
}

/// Puts every trained tensor (and the frozen ones too for a full save) back into the model of
/// a sharded run, so that the usual writers see whole tensors. Collective.
fn gather_for_saving(
    model: &mut CausalLm,
    engine: &mut Engine,
    weights: &SavedWeights,
) -> TrainResult<()> {
    if let Engine::Sharded(s) = engine {
        s.materialize(model, matches!(weights, SavedWeights::Full))?;
    }
    Ok(())
}

fn release_after_saving(model: &mut CausalLm, engine: &mut Engine) -> TrainResult<()> {
    if let Engine::Sharded(s) = engine {
        s.end(model)?;
    }
    Ok(())
}

fn append_log_line(out: &Path, line: &Value) -> TrainResult<()> {
    use std::io::Write;
    let path = out.join(TRAINER_LOG);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainError::io(&path, e))?;
    writeln!(file, "{line}").map_err(|e| TrainError::io(&path, e))
}

/// The evaluation loss on the ranks that compute it: replicated evaluation involves no
/// collective, so rank 0 alone runs it and the others wait at their next collective; sharded
/// evaluation gathers units, so every rank runs it. `None` on ranks that do not evaluate.
/// An evaluation's mean loss and how long it took.
#[derive(Clone, Copy)]
struct Evaluation {
    loss: f64,
    runtime: f64,
}

impl Evaluation {
    /// Hugging Face's evaluation metrics: the loss and its speed figures, with the steps counted
    /// as its evaluation loop counts them (batches of `per_device_eval_batch_size` on every rank).
    fn metrics(&self, run: &Run<'_>) -> Map<String, Value> {
        let samples = run.eval.len() as f64;
        let batch = (run.args.per_device_eval_batch_size as usize * run.group.world_size()).max(1);
        let steps = run.eval.len().div_ceil(batch) as f64;
        let mut metrics = Map::new();
        metrics.insert("eval_loss".into(), json!(self.loss));
        metrics.insert("eval_runtime".into(), json!(round(self.runtime, 4)));
        metrics.insert(
            "eval_samples_per_second".into(),
            json!(round(samples / self.runtime, 3)),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            json!(round(steps / self.runtime, 3)),
        );
        metrics
    }
}

fn evaluate_where_needed(
    model: &mut CausalLm,
    engine: &mut Engine,
    run: &Run<'_>,
) -> TrainResult<Option<Evaluation>> {
    let sharded = matches!(engine, Engine::Sharded(_));
    if run.group.rank() != 0 && !sharded {
        return Ok(None);
    }
    let start = Instant::now();
    let loss = evaluate(
        model,
        engine.residency(),
        run.eval,
        run.args,
        run.pad_token_id,
    )?;
    Ok(Some(Evaluation {
        loss,
        runtime: start.elapsed().as_secs_f64(),
    }))
}

fn evaluate(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    eval: &[Example],
    args: &TrainArgs,
    pad: u32,
) -> TrainResult<f64> {
    let mut weighted = 0.0;
    let mut examples = 0usize;
    for chunk in eval.chunks(args.per_device_eval_batch_size as usize) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (nll, tokens) = eval_nll(model, params, &collate(&refs, pad))?;
        if tokens > 0 {
            weighted += nll / tokens as f64 * chunk.len() as f64;
            examples += chunk.len();
        }
    }
    Ok(if examples == 0 {
        f64::NAN
    } else {
        weighted / examples as f64
    })
}

/// Writes `checkpoint-N` through a temporary folder renamed at the end, so that a crash never
/// leaves a checkpoint that looks complete. Every rank calls it: a sharded run gathers (full
/// state dict) or has every rank write its shard (sharded state dict); rank 0 writes the rest.
fn save_checkpoint(
    model: &mut CausalLm,
    run: &Run<'_>,
    engine: &mut Engine,
    optimizer: &AdamW,
    state: &TrainerState,
    full_names: &[String],
) -> TrainResult<PathBuf> {
    let out = &run.output_dir;
    let main = run.group.rank() == 0;
    let name = format!("checkpoint-{}", state.global_step);
    let dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    if main {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    let sharded_dict = match (&*engine, &run.fsdp) {
        (Engine::Sharded(_), Some(f)) => {
            f.config.state_dict_type == StateDictType::ShardedStateDict
        }
        _ => false,
    };
    if let (true, Engine::Sharded(s)) = (sharded_dict, &*engine) {
        // Every rank writes its own file into the folder rank 0 made.
        run.group.barrier()?;
        let world = run.group.world_size();
        let values = s
            .vars
            .iter()
            .map(|v| v.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let path = tmp.join(shard_file(run.group.rank(), world));
        save_shard(&path, &s.piece_labels(), &values, &optimizer.state)?;
        run.group.barrier()?;
        if main {
            let tensors: Map<String, Value> = s
                .trained_shapes()
                .into_iter()
                .map(|(name, shape)| (name, json!(shape)))
                .collect();
            write_json(
                &tmp.join(SHARDED_MARKER),
                &json!({
                    "world_size": world,
                    "state_dict_type": "SHARDED_STATE_DICT",
                    "tensors": tensors,
                }),
                JsonEnding::Bracket,
            )?;
            // The adapter's settings, so that the shards can be turned back into an adapter.
            if let SavedWeights::Lora(spec) = &run.weights {
                write_adapter_config(spec, &run.base_model, &tmp)?;
            }
        }
    } else {
        gather_for_saving(model, engine, &run.weights)?;
        let gathered = match &*engine {
            Engine::Sharded(s) => Some(full_optimizer_state(s, optimizer, full_names)?),
            Engine::Replicated(_) => None,
        };
        if main {
            save_weights(model, &run.weights, &run.base_model, &tmp)?;
            let moments: &dyn MomentSource = match &gathered {
                Some(state) => state,
                None => optimizer,
            };
            save_optimizer(moments, full_names, &tmp.join(OPTIMIZER_FILE))?;
        }
        release_after_saving(model, engine)?;
    }
    if main {
        copy_files(&run.tokenizer_files, &tmp)?;
        write_json(&tmp.join(TRAINER_STATE), state, JsonEnding::Bracket)?;
        write_run_hash(&tmp, &state.run_hash)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
        if let Some(limit) = run.args.save_total_limit {
            rotate_checkpoints(out, limit.max(1))?;
        }
    }
    Ok(dir)
}

/// The figures of a finished run that its result files report.
struct FinalFigures {
    total_steps: u64,
    steps_run: f64,
    runtime: f64,
    train_loss: f64,
    samples: f64,
    eval_enabled: bool,
}

/// What a completed run leaves: weights (always whole, whatever the state dict type), last
/// checkpoint, trainer state, results files, the closing log record and plots. Every rank
/// calls it; rank 0 writes. Returns the final evaluation loss, if any.
fn write_final_outputs(
    model: &mut CausalLm,
    run: &Run<'_>,
    engine: &mut Engine,
    optimizer: &AdamW,
    state: &mut TrainerState,
    full_names: &[String],
    figures: FinalFigures,
) -> TrainResult<Option<f64>> {
    let (args, out) = (run.args, &run.output_dir);
    let main = run.group.rank() == 0;
    let FinalFigures {
        total_steps,
        steps_run,
        runtime,
        train_loss,
        samples,
        eval_enabled,
    } = figures;
    gather_for_saving(model, engine, &run.weights)?;
    if main {
        save_weights(model, &run.weights, &run.base_model, out)?;
        copy_files(&run.tokenizer_files, out)?;
    }
    release_after_saving(model, engine)?;
    // Hugging Face saves a last checkpoint at the end whatever the interval.
    if args.save_strategy != IntervalStrategy::No {
        save_checkpoint(model, run, engine, optimizer, state, full_names)?;
    }
    let final_eval = if eval_enabled {
        evaluate_where_needed(model, engine, run)?
    } else {
        None
    };
    if !main {
        return Ok(None);
    }
    let mut eval_loss = None;
    let train_metrics = json!({
        "epoch": state.epoch,
        "train_loss": train_loss,
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(samples / runtime, 3),
        "train_steps_per_second": round(steps_run / runtime, 3),
        "total_flos": state.total_flos,
    });
    let mut final_record = train_metrics.as_object().cloned().unwrap_or_default();
    final_record.insert("step".into(), json!(state.global_step));
    state.log_history.push(Value::Object(final_record));
    // LLaMA-Factory's log ends with a progress record for the end of training.
    append_log_line(
        out,
        &json!({
            "current_steps": state.global_step,
            "total_steps": total_steps,
            "epoch": state.epoch,
            "percentage": round(state.global_step as f64 / total_steps as f64 * 100.0, 2),
            "elapsed_time": duration(runtime),
            "remaining_time": duration(0.0),
        }),
    )?;
    write_json(&out.join(TRAINER_STATE), state, JsonEnding::Bracket)?;
    write_json(
        &out.join("train_results.json"),
        &train_metrics,
        JsonEnding::Bracket,
    )?;
    let mut all = train_metrics.as_object().cloned().unwrap_or_default();
    if let Some(evaluation) = final_eval {
        let mut eval_metrics = evaluation.metrics(run);
        eval_metrics.insert("epoch".into(), json!(state.epoch));
        write_json(
            &out.join("eval_results.json"),
            &eval_metrics,
            JsonEnding::Bracket,
        )?;
        all.extend(eval_metrics);
        eval_loss = Some(evaluation.loss);
    }
    write_json(
        &out.join("all_results.json"),
        &Value::Object(all),
        JsonEnding::Bracket,
    )?;
    if args.plot_loss {
        crate::plot::plot_losses(out, &state.log_history)?;
    }
    Ok(eval_loss)
}

/// Samples trained, as Hugging Face counts them: the planned steps times the global batch under
/// max_steps, else the epochs over the dataset.
fn samples_of(args: &TrainArgs, plan: &EpochPlan, total_steps: u64, num_examples: usize) -> f64 {
    if args.max_steps > 0 {
        total_steps as f64 * (plan.global_micro_batch * plan.accumulation) as f64
    } else {
        num_examples as f64 * args.num_train_epochs
    }
}
