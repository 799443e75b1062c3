//! What a run will do, fixed before its first step: how steps cut the data, how many there are,
//! the learning rate of each, and when to log, evaluate and save.

use std::collections::HashMap;

use ff_config::{LrSchedulerType, TrainArgs};
use ff_model::CausalLm;

use crate::batch::Example;
use crate::checkpoint::TrainerState;
use crate::error::{TrainError, TrainResult};
use crate::sampler::{rank_slice, EpochPlan};
use crate::schedule::{warmup_steps, Schedule, ScheduleKind};

pub(super) struct RunPlan {
    pub epochs: EpochPlan,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    pub schedule: Schedule,
    pub logging_every: u64,
    pub save_every: u64,
    pub eval_every: u64,
    /// What decides which examples each step sees (see [`run_hash`]).
    pub hash: String,
    pub flos_per_token: f64,
}

impl RunPlan {
    pub fn new(
        args: &TrainArgs,
        model: &mut CausalLm,
        num_examples: usize,
        world: usize,
    ) -> TrainResult<Self> {
        let epochs = EpochPlan::new(
            num_examples,
            args.per_device_train_batch_size as usize,
            world,
            args.gradient_accumulation_steps as usize,
        );
        let steps_per_epoch = epochs.steps_per_epoch() as u64;
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
        Ok(Self {
            epochs,
            steps_per_epoch,
            total_steps,
            schedule,
            logging_every: interval(args.logging_steps, total_steps),
            save_every: interval(args.save_steps, total_steps),
            eval_every: interval(args.eval_steps.unwrap_or(args.logging_steps), total_steps),
            hash: run_hash(args, num_examples, total_steps),
            flos_per_token: flos_per_token(model),
        })
    }

    /// The trainer state of a run that has taken no step yet.
    pub fn fresh_state(&self, args: &TrainArgs) -> TrainerState {
        TrainerState {
            max_steps: self.total_steps,
            // Hugging Face records the epochs that max_steps spans, whole.
            num_train_epochs: if args.max_steps > 0 {
                self.total_steps.div_ceil(self.steps_per_epoch.max(1)) as f64
            } else {
                args.num_train_epochs
            },
            logging_steps: args.logging_steps,
            save_steps: args.save_steps,
            train_batch_size: args.per_device_train_batch_size,
            is_world_process_zero: true,
            run_hash: self.hash.clone(),
            ..TrainerState::default()
        }
    }

    /// Samples trained, as Hugging Face counts them: the planned steps times the global batch
    /// under max_steps, else the epochs over the dataset.
    pub fn samples(&self, args: &TrainArgs, num_examples: usize) -> f64 {
        if args.max_steps > 0 {
            self.total_steps as f64
                * (self.epochs.global_micro_batch * self.epochs.accumulation) as f64
        } else {
            num_examples as f64 * args.num_train_epochs
        }
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
pub(super) fn run_difference(saved: &str, current: &str) -> String {
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
pub(super) fn padded_tokens(
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
