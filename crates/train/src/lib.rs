//! Training: the recipe (`trainer`), one optimizer step (`step`), the walk over the model for a
//! micro-batch (`walk`), where trained parameters live (`engine`), the chunked causal-LM loss,
//! AdamW, clipping and learning-rate schedules.
//!
//! Modules depend downwards only: `trainer` → `step` → `row_groups`, `engine` → `walk` →
//! `loss`, `plan`, `phases` → `batch`.
//!
//! The engine's words (walk, part, unit, piece, residency, hand-over, …) are defined in
//! [`glossary`].

mod backward;
pub mod batch;
pub mod checkpoint;
pub mod engine;
pub mod error;
#[doc = include_str!("../GLOSSARY.md")]
pub mod glossary {}
pub mod loss;
pub mod offload;
pub mod optim;
pub mod phases;
pub mod plan;
pub mod plot;
mod row_groups;
mod row_threads;
pub mod sampler;
pub mod schedule;
pub mod step;
pub mod trainer;
pub mod walk;

pub use backward::backward_from;
pub use batch::{collate, Batch, Example, IGNORE_INDEX};
pub use engine::{Engine, Trainables};
pub use error::{TrainError, TrainResult};
pub use optim::{AdamW, AdamWConfig};
pub use phases::StepPhases;
pub use plan::{Checkpointing, Keeping, MicroBatchPlan, PlanInputs};
pub use row_threads::{on_row_group_threads, row_group_threads};
pub use schedule::{Schedule, ScheduleKind};
pub use step::{train_step, StepOptions, StepStats};
pub use walk::{eval_nll, forward_backward};

/// A distinct dropout seed for each micro-batch of a step.
pub fn seed_for(step_seed: u64, micro_batch: u64) -> u64 {
    ff_model::dropout::derive_seed(step_seed, micro_batch)
}
