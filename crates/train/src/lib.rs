//! Training: the recipe (`trainer`), one optimizer step (`step`), the walk over the model for a
//! micro-batch (`walk`), where trained parameters live (`engine`), the chunked causal-LM loss,
//! AdamW, clipping and learning-rate schedules.
//!
//! Modules depend downwards only: `trainer` → `step` → `row_groups`, `engine` → `walk` →
//! `loss`, `plan`, `phases` → `batch`.
//!
//! # Words
//!
//! - **walk**: one pass over the model for a micro-batch, part by part: forward through the
//!   embedding and every layer, the head's forward and backward, then backward from the top
//!   layer down as far as something trains ([`walk`]; `ff_walk::Walk::Train`), or forward only
//!   for evaluation (`Walk::Eval`).
//! - **part**: what the walk enters and leaves as one: the embedding, one decoder layer, or the
//!   head (final norm and LM head) — `ff_model::Part`. Every trained tensor belongs to one.
//! - **residency**: whoever keeps the parameters and takes the gradients during a walk
//!   (`ff_walk::Residency`): told before and after each part, it brings the part's parameters
//!   and stores its gradients. The replicated engine, a row group's share and the sharded FSDP
//!   engine are residencies.
//! - **extent**: how far down the backward walk goes: to the lowest trained layer, and into the
//!   embedding only when it trains.
//! - **engine**: where trained tensors, gradients and optimizer state live for a whole run:
//!   replicated ([`engine::Trainables`], in memory or offloaded to disk) or sharded.
//! - **unit**: FSDP's group of parts flattened and sharded together (a decoder layer, or the
//!   embedding and head); gathered before a part of it computes, freed after.
//! - **piece**: the slice of one trained tensor that a rank owns inside a unit's shard; the
//!   optimizer of a sharded run updates pieces.
//! - **row group**: a share of a micro-batch's rows walked on its own thread beside the others
//!   (`row_groups`); groups add their gradients into the step's one sum in turns.
//! - **hand-over**: a row group's gradients from one part of its walk, added to the step's sum
//!   when its turn comes, so the sum does not depend on which group ran ahead.
//! - **checkpointing / keeping**: what the forward keeps for the backward: each layer's input
//!   (and, where memory allows, some of its results), the rest recomputed ([`plan`]).
//! - **head memory**: whether the head's backward is the step's memory peak, which bounds the
//!   logits a chunk of the loss may hold ([`loss::HeadMemory`]).

mod backward;
pub mod batch;
pub mod checkpoint;
mod cross_entropy;
pub mod engine;
pub mod error;
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
