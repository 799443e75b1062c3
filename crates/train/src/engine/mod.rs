//! Where the trained parameters live: replicated on every rank (one process, or data
//! parallelism, which is FSDP's NO_SHARD) or sharded across ranks (FSDP's other strategies).
//! The step and the trainer talk to this enum; neither knows how a strategy works inside.

mod replicated;

pub use replicated::{GradOffload, Trainables};

use candle_core::Var;
use ff_dist::ProcessGroup;
use ff_fsdp::Sharded;
use ff_walk::Residency;

use crate::error::TrainResult;
use crate::optim::{grad_sq_norm, AdamW};
use crate::phases::StepPhases;

pub enum Engine {
    Replicated(Trainables),
    Sharded(Box<Sharded>),
}

impl Engine {
    pub fn residency(&mut self) -> &mut dyn Residency {
        match self {
            Engine::Replicated(t) => t,
            Engine::Sharded(s) => s.as_mut(),
        }
    }

    /// The optimizer's parameter names (a sharded rank's pieces carry their tensor's name).
    pub fn names(&self) -> &[String] {
        match self {
            Engine::Replicated(t) => &t.names,
            Engine::Sharded(s) => &s.names,
        }
    }

    /// How many trained parameters this rank holds in memory with their gradients and AdamW
    /// moments, when it holds all of them there (replicated, nothing offloaded): their state
    /// then outweighs a step's working memory, which may grow into it.
    pub fn trained_in_memory(&self) -> Option<usize> {
        match self {
            Engine::Replicated(t) if t.offloaded.is_none() => Some(t.num_elements()),
            _ => None,
        }
    }

    pub fn vars(&self) -> &[Var] {
        match self {
            Engine::Replicated(t) => &t.vars,
            Engine::Sharded(s) => &s.vars,
        }
    }

    /// The AdamW update of what this rank owns, from the step's gradients.
    pub fn optimizer_step(
        &mut self,
        optimizer: &mut AdamW,
        lr: f64,
        grad_scale: Option<f64>,
    ) -> TrainResult<()> {
        match self {
            Engine::Replicated(t) => match &mut t.offloaded {
                Some(offload) => {
                    let progress =
                        optimizer.step_offloaded(&t.vars, &offload.grads, lr, grad_scale)?;
                    offload.pending_update = Some(progress);
                    Ok(())
                }
                None => optimizer.step(&t.vars, &t.grads, lr, grad_scale),
            },
            Engine::Sharded(s) => optimizer.step(&s.vars, &s.grads, lr, grad_scale),
        }
    }

    pub fn zero_grads(&mut self) {
        match self {
            Engine::Replicated(t) => t.zero_grads(),
            Engine::Sharded(s) => s.zero_grads(),
        }
    }

    /// Time the step's forward spent waiting for the last step's offloaded update, by phase
    /// (zero when nothing is offloaded); the count starts again.
    pub fn take_update_waits(&mut self) -> StepPhases {
        match self {
            Engine::Replicated(t) => t
                .offloaded
                .as_mut()
                .map(|offload| std::mem::take(&mut offload.update_waits))
                .unwrap_or_default(),
            Engine::Sharded(_) => StepPhases::default(),
        }
    }

    /// After every micro-batch: makes each rank's gradients the sum over ranks of what it owns.
    pub fn reduce_grads(&mut self, group: &dyn ProcessGroup) -> TrainResult<()> {
        match self {
            Engine::Replicated(t) if group.world_size() > 1 => t.all_reduce_grads(group),
            Engine::Replicated(_) => Ok(()),
            Engine::Sharded(s) => Ok(s.finish_grads()?),
        }
    }

    /// The global L2 norm of the gradient, across shards.
    pub fn grad_norm(&mut self) -> TrainResult<f64> {
        Ok(match self {
            Engine::Replicated(Trainables {
                offloaded: Some(offload),
                ..
            }) => offload.grads.sq_norm().sqrt(),
            Engine::Replicated(t) => grad_sq_norm(&t.grads)?.sqrt(),
            Engine::Sharded(s) => {
                let mut total = [grad_sq_norm(&s.grads)?];
                s.shard_group().all_reduce_sum_f64(&mut total)?;
                total[0].sqrt()
            }
        })
    }
}
