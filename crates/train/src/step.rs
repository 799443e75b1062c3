//! One optimizer step: every micro-batch's walk, the gradients summed over ranks, clipping and
//! the AdamW update, in the order they run.

use std::time::Instant;

use ff_dist::ProcessGroup;
use ff_model::CausalLm;

use crate::batch::Batch;
use crate::engine::Engine;
use crate::error::TrainResult;
use crate::optim::{clip_coefficient, AdamW};
use crate::phases::{lap, StepPhases};
use crate::plan::{MicroBatchPlan, PlanInputs};
use crate::row_groups::RowGroups;
use crate::row_threads::row_group_threads;
use crate::walk::forward_backward_timed;

/// What one optimizer step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean NLL over every label token of the step's micro-batches.
    pub loss: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub num_label_tokens: usize,
    pub phases: StepPhases,
}

/// Settings of the step that do not change from one step to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    pub max_grad_norm: Option<f64>,
    pub gradient_checkpointing: bool,
}

/// One optimizer step over this rank's `micro_batches` (gradient accumulation): forward and
/// backward of each, gradients summed over ranks (each rank's loss is already divided by the
/// label tokens of all ranks, so the sum is the gradient of the whole step), clip, AdamW update
/// at `lr` of what this rank owns. Every rank must call it, even with no examples, since the
/// sums are collective.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &mut CausalLm,
    engine: &mut Engine,
    optimizer: &mut AdamW,
    micro_batches: &[Batch],
    lr: f64,
    options: StepOptions,
    dropout_seed: u64,
    group: &dyn ProcessGroup,
) -> TrainResult<StepStats> {
    let mut phases = StepPhases::default();
    let mut clock = Instant::now();
    let mut tokens = [micro_batches
        .iter()
        .map(Batch::num_label_tokens)
        .sum::<usize>() as f64];
    group.all_reduce_sum_f64(&mut tokens)?;
    phases.communication += lap(&mut clock);
    let num_label_tokens = tokens[0] as usize;
    let denominator = num_label_tokens.max(1) as f64;
    engine.zero_grads();
    let mut nll_sum = 0.0;
    let placeholder = Batch::placeholder();
    let plan_inputs = PlanInputs::of(
        model,
        engine.trained_in_memory(),
        options.gradient_checkpointing,
        row_group_threads(),
    );
    for (i, batch) in micro_batches.iter().enumerate() {
        // A sharded engine's walk is collective: a rank without examples walks a placeholder.
        let batch = match (batch.is_empty(), &*engine) {
            (false, _) => batch,
            (true, Engine::Replicated(_)) => continue,
            (true, Engine::Sharded(_)) => &placeholder,
        };
        let seed = crate::seed_for(dropout_seed, i as u64);
        let plan = MicroBatchPlan::new(&plan_inputs, batch.len(), batch.num_tokens());
        nll_sum += match engine {
            Engine::Replicated(trainables) if plan.row_groups > 1 => {
                let groups = RowGroups {
                    model,
                    batch,
                    groups: plan.row_groups,
                    loss_denominator: denominator,
                    checkpointing: plan.checkpointing,
                    head_memory: plan.head_memory,
                    dropout_seed: seed,
                };
                groups.forward_backward(trainables, &mut phases)?
            }
            _ => forward_backward_timed(
                model,
                engine.residency(),
                batch,
                denominator,
                plan.checkpointing,
                plan.head_memory,
                seed,
                &mut phases,
            )?,
        };
    }
    // Waiting for the last step's offloaded update is that update's time, not the forward's.
    let waits = engine.take_update_waits();
    phases.embedding = phases.embedding.saturating_sub(waits.embedding);
    phases.layers_forward = phases.layers_forward.saturating_sub(waits.layers_forward);
    phases.head = phases.head.saturating_sub(waits.head);
    phases.optimizer += waits.total();
    clock = Instant::now();
    engine.reduce_grads(group)?;
    let mut nll = [nll_sum];
    group.all_reduce_sum_f64(&mut nll)?;
    let nll_sum = nll[0];
    phases.communication += lap(&mut clock);
    let grad_norm = engine.grad_norm()?;
    let clip = options
        .max_grad_norm
        .and_then(|max_norm| clip_coefficient(grad_norm, max_norm));
    engine.optimizer_step(optimizer, lr, clip)?;
    phases.optimizer += lap(&mut clock);
    Ok(StepStats {
        loss: nll_sum / denominator,
        grad_norm,
        num_label_tokens,
        phases,
    })
}
