//! Where the trained parameters live: replicated on every rank (one process, or data
//! parallelism, which is FSDP's NO_SHARD) or sharded across ranks (FSDP's other strategies).
//! The step and the trainer talk to this enum; neither knows how a strategy works inside.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::Var;
use ff_dist::ProcessGroup;
use ff_fsdp::{BackwardExtent, FsdpError, FsdpResult, Part, Pass, Residency, Sharded, Walk};
use ff_model::table_grad::TableGrad;
use ff_model::CausalLm;

use crate::error::TrainResult;
use crate::optim::{grad_sq_norm, AdamW};
use crate::step::{StepPhases, Trainables};

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

    /// The trained tensors when this rank holds all of them in memory with their gradients and
    /// AdamW moments: replicated, nothing offloaded. Their state then outweighs a step's
    /// working memory, which may grow into it.
    pub fn trainables_in_memory(&self) -> Option<&Trainables> {
        match self {
            Engine::Replicated(t) if t.offloaded.is_none() => Some(t),
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

/// Replicated tensors are always in the model; backward only adds gradients.
impl Residency for Trainables {
    fn backward_extent(&self) -> BackwardExtent {
        self.extent
    }

    fn begin(&mut self, _walk: Walk) -> FsdpResult<()> {
        Ok(())
    }

    /// Waits, when the last step's update is still running, for the part's parameters.
    fn enter(&mut self, _model: &mut CausalLm, part: Part, _pass: Pass) -> FsdpResult<()> {
        let pending = |t: &Self| t.offloaded.as_ref()?.pending_update.clone();
        let Some(progress) = pending(self) else {
            return Ok(());
        };
        let needed = self.params_needed_by(part);
        let start = Instant::now();
        progress
            .wait_for(needed)
            .map_err(|e| FsdpError::GradStorage(Box::new(e)))?;
        let waited = start.elapsed();
        let offload = self.offloaded.as_mut().expect("it has a pending update");
        let waits = &mut offload.update_waits;
        *match part {
            Part::Embed => &mut waits.embedding,
            Part::Layer(_) => &mut waits.layers_forward,
            Part::Head => &mut waits.head,
        } += waited;
        if part == Part::Head {
            offload.pending_update = None;
        }
        Ok(())
    }

    fn add_grads(&mut self, _part: Part, grads: &GradStore) -> FsdpResult<()> {
        self.accumulate(grads)
            .map_err(|e| FsdpError::GradStorage(Box::new(e)))
    }

    fn add_table_grad(&mut self, _part: Part, table: &Var, grad: TableGrad) -> FsdpResult<()> {
        self.accumulate_table(table.as_tensor().id(), grad)
            .map_err(|e| FsdpError::GradStorage(Box::new(e)))
    }

    fn leave(&mut self, _model: &mut CausalLm, _part: Part, _pass: Pass) -> FsdpResult<()> {
        Ok(())
    }

    fn end(&mut self, _model: &mut CausalLm) -> FsdpResult<()> {
        Ok(())
    }
}
