//! Training: the step (layer-by-layer forward and backward with gradient checkpointing), the
//! chunked causal-LM loss, AdamW, clipping and learning-rate schedules.

mod backward;
pub mod batch;
pub mod checkpoint;
pub mod engine;
pub mod error;
pub mod loss;
pub mod offload;
pub mod optim;
pub mod plot;
mod row_groups;
pub mod sampler;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use backward::backward_from;
pub use batch::{collate, Batch, Example, IGNORE_INDEX};
pub use engine::Engine;
pub use error::{TrainError, TrainResult};
pub use optim::{AdamW, AdamWConfig};
pub use row_groups::{on_row_group_threads, row_groups};
pub use schedule::{Schedule, ScheduleKind};
pub use step::{forward_backward, Checkpointing, Keeping, Trainables};
pub use step::{train_step, StepOptions, StepPhases, StepStats};

/// A distinct dropout seed for each micro-batch of a step.
pub fn seed_for(step_seed: u64, micro_batch: u64) -> u64 {
    ff_model::dropout::derive_seed(step_seed, micro_batch)
}
