//! The training run as a recipe: set up (resume point, engine, optimizer, restored state), loop
//! over steps (log, evaluate, checkpoint), finish (the files LLaMA-Factory leaves in
//! `output_dir`). Each stage is a function of its own module; [`train`] shows their order.

mod evaluation;
mod finish;
mod log;
mod output_dir;
mod run_plan;
mod saving;
mod setup;

pub use log::TRAINER_LOG;
pub use output_dir::{check_offload, prepare_output_dir};

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ff_config::{FsdpConfig, IntervalStrategy, TrainArgs};
use ff_dist::ProcessGroup;
use ff_model::dropout::derive_seed;
use ff_model::CausalLm;
use serde_json::{json, Map, Value};

use crate::batch::{collate, label_tokens, Batch, Example};
use crate::checkpoint::{SavedWeights, TrainerState};
use crate::error::{TrainError, TrainResult};
use crate::sampler::{epoch_order, rank_slice};
use crate::step::{train_step, StepOptions, StepStats};

use evaluation::evaluate_where_needed;
use finish::{memory_report, write_final_outputs, FinalFigures};
use log::{append_log_line, progress_line};
use run_plan::{padded_tokens, RunPlan};
use saving::save_checkpoint;
use setup::Setup;

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

/// Trains `model` and writes everything LLaMA-Factory leaves in `output_dir`.
pub fn train(model: &mut CausalLm, mut run: Run<'_>) -> TrainResult<Summary> {
    let args = run.args;
    check_offload(args)?;
    let resume_from = output_dir::agree_on_resume(args, &run.output_dir, run.group)?;
    check_training_set(&run)?;
    let plan = RunPlan::new(args, model, run.train.len(), run.group.world_size())?;
    let mut state = plan.fresh_state(args);
    let resume = match resume_from {
        Some(dir) => Some(setup::check_resume(model, &run, &plan, dir)?),
        None => None,
    };
    let mut setup = setup::build(model, &run)?;
    if let Some(resume) = resume {
        let message = format!(
            "resuming from {} at step {}",
            resume.dir.display(),
            resume.saved.global_step
        );
        setup::restore(&mut setup, &run, resume, &mut state)?;
        run.observer.on_message(&message);
    }
    if let crate::engine::Engine::Replicated(t) = &setup.engine {
        t.broadcast_from_rank0(run.group)?;
    }

    let trained = train_loop(model, &mut run, &plan, &mut setup, &mut state)?;

    let eval_loss = write_final_outputs(
        model,
        &run,
        &mut setup.engine,
        &setup.optimizer,
        &mut state,
        &setup.full_names,
        FinalFigures {
            total_steps: plan.total_steps,
            steps_run: trained.steps_run,
            runtime: trained.runtime,
            train_loss: trained.train_loss,
            samples: plan.samples(args, run.train.len()),
            eval_enabled: eval_enabled(&run),
        },
    )?;
    Ok(Summary {
        global_step: state.global_step,
        train_loss: trained.train_loss,
        eval_loss,
        memory: memory_report(&setup.engine, &setup.optimizer),
    })
}

/// Refuses a training set that would give an empty loss.
fn check_training_set(run: &Run<'_>) -> TrainResult<()> {
    if run.train.is_empty() {
        return Err(TrainError::Config("the training set is empty".into()));
    }
    if run.train.iter().all(|e| label_tokens(&e.labels) == 0) {
        return Err(TrainError::Config(format!(
            "no training example keeps a token to learn after cutting to cutoff_len {}, so the loss would be empty; raise cutoff_len",
            run.args.cutoff_len
        )));
    }
    Ok(())
}

fn eval_enabled(run: &Run<'_>) -> bool {
    !run.eval.is_empty() && (run.args.do_eval || run.args.eval_strategy != IntervalStrategy::No)
}

/// What the loop's steps came to.
struct Trained {
    /// Steps this process ran (at least 1, for the rates).
    steps_run: f64,
    runtime: f64,
    /// The mean of their losses.
    train_loss: f64,
}

/// Steps from `state`'s to the plan's last, logging, evaluating and checkpointing on the way.
/// An interrupt stops every rank after the same step, with a checkpoint.
fn train_loop(
    model: &mut CausalLm,
    run: &mut Run<'_>,
    plan: &RunPlan,
    setup: &mut Setup,
    state: &mut TrainerState,
) -> TrainResult<Trained> {
    let args = run.args;
    let options = StepOptions {
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        gradient_checkpointing: setup.gradient_checkpointing,
    };
    let start = Instant::now();
    let first_step = state.global_step;
    let mut since_log = LossSinceLog::default();
    let mut loss_total = 0.0;
    let mut order: Option<(u64, Vec<usize>)> = None;
    run.observer.on_start(plan.total_steps, first_step);

    while state.global_step < plan.total_steps {
        let step = state.global_step;
        let epoch = step / plan.steps_per_epoch;
        if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let seed = args.data_seed.unwrap_or(args.seed);
            order = Some((epoch, epoch_order(run.train.len(), seed, epoch)));
        }
        let order = &order.as_ref().expect("set above").1;
        let (micro_batches, step_flos) = micro_batches_of(run, plan, order, step);
        let lr = plan.schedule.lr(step);
        let stats = train_step(
            model,
            &mut setup.engine,
            &mut setup.optimizer,
            &micro_batches,
            lr,
            options,
            derive_seed(args.seed, step),
            run.group,
        )?;
        let step_in_epoch = step % plan.steps_per_epoch;
        state.global_step += 1;
        state.total_flos += step_flos;
        let step = state.global_step;
        state.epoch = epoch as f64 + (step_in_epoch + 1) as f64 / plan.steps_per_epoch as f64;
        since_log.add(stats.loss);
        loss_total += stats.loss;
        run.observer.on_step(step, stats.loss, lr);

        let elapsed = start.elapsed().as_secs_f64();
        let per_step = elapsed / (step - first_step) as f64;
        let times = (elapsed, per_step * (plan.total_steps - step) as f64);
        if step.is_multiple_of(plan.logging_every) {
            log_training(run, plan, state, since_log.take(), &stats, times)?;
        }
        let epoch_end = step.is_multiple_of(plan.steps_per_epoch);
        let eval_now = eval_enabled(run)
            && match args.eval_strategy {
                IntervalStrategy::Steps => step.is_multiple_of(plan.eval_every),
                IntervalStrategy::Epoch => epoch_end,
                IntervalStrategy::No => false,
            };
        if eval_now {
            evaluate_and_log(model, run, plan, setup, state, times)?;
        }
        // Every rank must stop at the same step, so the flag is agreed on collectively.
        let mut flag = [f32::from(u8::from(run.stop.load(Ordering::SeqCst)))];
        run.group.all_reduce_sum(&mut flag)?;
        let interrupted = flag[0] > 0.0;
        let save_now = match args.save_strategy {
            IntervalStrategy::Steps => step.is_multiple_of(plan.save_every),
            IntervalStrategy::Epoch => epoch_end,
            IntervalStrategy::No => false,
        };
        if (save_now || interrupted) && step < plan.total_steps {
            setup.optimizer.finish()?;
            let dir = save_checkpoint(
                model,
                run,
                &mut setup.engine,
                &setup.optimizer,
                state,
                &setup.full_names,
            )?;
            if interrupted {
                run.observer.on_finish();
                return Err(TrainError::Interrupted {
                    step,
                    checkpoint: dir,
                });
            }
        }
    }
    setup.optimizer.finish()?;
    run.observer.on_finish();
    let steps_run = (state.global_step - first_step).max(1) as f64;
    Ok(Trained {
        steps_run,
        runtime: start.elapsed().as_secs_f64(),
        train_loss: loss_total / steps_run,
    })
}

/// This rank's micro-batches of `step` (examples in `order`), and the step's floating-point
/// operations on every rank as `total_flos` counts them.
fn micro_batches_of(
    run: &Run<'_>,
    plan: &RunPlan,
    order: &[usize],
    step: u64,
) -> (Vec<Batch>, f64) {
    let (rank, world) = (run.group.rank(), run.group.world_size());
    let step_in_epoch = (step % plan.steps_per_epoch) as usize;
    let ranges = plan
        .epochs
        .step_micro_batches(step_in_epoch, run.train.len());
    let flos = plan.flos_per_token * padded_tokens(&ranges, order, run.train, world) as f64;
    let batches = ranges
        .into_iter()
        .map(|range| {
            let mine = rank_slice(range, rank, world);
            let examples: Vec<&Example> = order[mine].iter().map(|&i| &run.train[i]).collect();
            collate(&examples, run.pad_token_id)
        })
        .collect();
    (batches, flos)
}

/// The losses of the steps since the last training record.
#[derive(Default)]
struct LossSinceLog {
    sum: f64,
    steps: u64,
}

impl LossSinceLog {
    fn add(&mut self, loss: f64) {
        self.sum += loss;
        self.steps += 1;
    }

    /// Their mean; the count starts again.
    fn take(&mut self) -> f64 {
        let mean = self.sum / self.steps as f64;
        *self = Self::default();
        mean
    }
}

/// The training record of the step just taken, written where [`log_record`] writes.
fn log_training(
    run: &mut Run<'_>,
    plan: &RunPlan,
    state: &mut TrainerState,
    loss: f64,
    stats: &StepStats,
    times: (f64, f64),
) -> TrainResult<()> {
    let mut record = Map::new();
    record.insert("loss".into(), json!(loss));
    record.insert("grad_norm".into(), json!(stats.grad_norm));
    record.insert(
        "learning_rate".into(),
        json!(plan.schedule.lr(state.global_step)),
    );
    record.insert("epoch".into(), json!(state.epoch));
    let line_keys = [("loss", "loss"), ("lr", "learning_rate")];
    log_record(run, plan, state, record, &line_keys, times)
}

/// An evaluation during training and its record.
fn evaluate_and_log(
    model: &mut CausalLm,
    run: &mut Run<'_>,
    plan: &RunPlan,
    setup: &mut Setup,
    state: &mut TrainerState,
    times: (f64, f64),
) -> TrainResult<()> {
    let evaluation = evaluate_where_needed(model, &mut setup.engine, run)?;
    let (Some(evaluation), 0) = (evaluation, run.group.rank()) else {
        return Ok(());
    };
    let mut record = evaluation.metrics(run);
    record.insert("epoch".into(), json!(state.epoch));
    log_record(
        run,
        plan,
        state,
        record,
        &[("eval_loss", "eval_loss")],
        times,
    )
}

/// A record of the step just taken: to the observer, to the log history (with the step), and,
/// on rank 0, to `trainer_log.jsonl` as a progress line holding the record's values that
/// `line_keys` names (the line's key, the record's key). `times` are the seconds elapsed and
/// remaining.
fn log_record(
    run: &mut Run<'_>,
    plan: &RunPlan,
    state: &mut TrainerState,
    mut record: Map<String, Value>,
    line_keys: &[(&str, &str)],
    (elapsed, remaining): (f64, f64),
) -> TrainResult<()> {
    let step = state.global_step;
    run.observer.on_log(&record);
    if run.group.rank() == 0 {
        let values: Vec<(&str, &Value)> = line_keys
            .iter()
            .map(|&(line_key, key)| (line_key, &record[key]))
            .collect();
        let line = progress_line(
            step,
            plan.total_steps,
            &values,
            state.epoch,
            elapsed,
            remaining,
        );
        append_log_line(&run.output_dir, &line)?;
    }
    record.insert("step".into(), json!(step));
    state.log_history.push(Value::Object(record));
    Ok(())
}
