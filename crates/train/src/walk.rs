//! The walk over the model for one micro-batch: forward and backward, layer by layer.
//!
//! With gradient checkpointing (the default, as in LLaMA-Factory) the forward keeps only each
//! decoder layer's input; backward walks the layers from the last, recomputes a layer's forward
//! from its saved input and takes the gradient of `sum(output · upstream_grad)`, which yields the
//! layer's parameter gradients and the gradient for the layer below. Without checkpointing the
//! whole graph is kept and one backward covers every layer. The walk tells a [`Residency`] when
//! it enters and leaves each part, so that whoever keeps the parameters (replicated, a row
//! group's share, sharded) brings them in time and takes the gradients; it knows none of them.

use std::time::Instant;

use candle_core::{Tensor, Var};
use ff_model::table_grad::TableGrad;
use ff_model::weight_grads::store_of;
use ff_model::{CausalLm, ForwardCtx};
use ff_walk::{Part, Pass, Residency, Walk};

use crate::backward::backward_from;
use crate::batch::Batch;
use crate::error::TrainResult;
use crate::loss::{head_forward_backward, head_nll, HeadMemory, HeadOutput, LabelPositions};
use crate::phases::{lap, StepPhases};
use crate::plan::Checkpointing;

/// Forward and backward of `batch`, adding the gradient of `nll_sum / loss_denominator` to the
/// trained tensors through `params`. `loss_denominator` is the number of label tokens of the
/// whole optimizer step (all micro-batches, all ranks), so that accumulation and data
/// parallelism give the gradient of one big batch. Returns the micro-batch's un-normalised NLL
/// sum. `params` is told when each part of the model is entered and left, so that a sharded
/// engine can gather it just in time.
pub fn forward_backward(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    batch: &Batch,
    loss_denominator: f64,
    checkpointing: Checkpointing,
    head_memory: HeadMemory,
    dropout_seed: u64,
) -> TrainResult<f64> {
    let mut phases = StepPhases::default();
    forward_backward_timed(
        model,
        params,
        batch,
        loss_denominator,
        checkpointing,
        head_memory,
        dropout_seed,
        &mut phases,
    )
}

/// [`forward_backward`] that adds the time of its phases to `phases`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_backward_timed(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    batch: &Batch,
    loss_denominator: f64,
    checkpointing: Checkpointing,
    head_memory: HeadMemory,
    dropout_seed: u64,
    phases: &mut StepPhases,
) -> TrainResult<f64> {
    let mut clock = Instant::now();
    let ctx = ForwardCtx::new(
        &model.config,
        &batch.attention_mask,
        model.dtype,
        dropout_seed,
        &model.device,
    )?;
    let input_ids = batch.input_ids_tensor(&model.device)?;
    let positions = LabelPositions::of(batch);
    let extent = params.backward_extent();
    params.begin(Walk::Train)?;
    params.enter(model, Part::Embed, Pass::Forward)?;
    let embedded = model.embed(&input_ids)?;
    params.leave(model, Part::Embed, Pass::Forward)?;
    let num_layers = model.layers.len();
    phases.embedding += lap(&mut clock);

    let nll_sum = if let Checkpointing::Layers(keeping) = checkpointing {
        let mut saved = Vec::with_capacity(num_layers + 1);
        let mut kept = Vec::with_capacity(num_layers);
        saved.push(embedded.detach());
        for i in 0..num_layers {
            params.enter(model, Part::Layer(i), Pass::Forward)?;
            let x = saved.last().expect("holds the embedding");
            let keep = keeping.of_layer(i, num_layers);
            let (y, kept_values) = model.layers[i].forward_keeping(x, &ctx, keep)?;
            params.leave(model, Part::Layer(i), Pass::Forward)?;
            saved.push(y.detach());
            kept.push(kept_values);
        }
        phases.layers_forward += lap(&mut clock);
        let top = saved.pop().expect("holds the last layer's output");
        // See HeadMemory::BelowPeak.
        let tied_grad_waits = head_memory == HeadMemory::BelowPeak
            && extent.embedding
            && model.lm_head.is_none()
            && model.embedding_grad_in_rows();
        let head = head_backward(
            model,
            params,
            &top,
            &positions,
            loss_denominator,
            head_memory,
            tied_grad_waits,
        )?;
        phases.head += lap(&mut clock);
        let mut grad = head.grad_hidden;
        let tied_grad = head.head_grad;
        let lowest = if extent.embedding {
            0
        } else {
            extent.lowest_layer
        };
        for i in (lowest..num_layers).rev() {
            let input = saved.pop().expect("one saved input per layer");
            let kept_values = kept.pop().expect("one entry per layer");
            let needs_input_grad = i > lowest || extent.embedding;
            let input = if needs_input_grad {
                Var::from_tensor(&input)?.as_tensor().clone()
            } else {
                input
            };
            params.enter(model, Part::Layer(i), Pass::Backward)?;
            let recomputed = model.layers[i].forward_for_gradients(&input, &ctx, &kept_values)?;
            let store = backward_from(&recomputed, &grad)?;
            params.add_grads(Part::Layer(i), &store)?;
            params.leave(model, Part::Layer(i), Pass::Backward)?;
            if needs_input_grad {
                grad = match store.get(&input) {
                    Some(g) => g.detach(),
                    None => input.zeros_like()?,
                };
            }
        }
        phases.layers_backward += lap(&mut clock);
        if extent.embedding {
            // Recomputed like the layers: a sharded engine has put a fresh embedding table in
            // the model since the forward pass.
            params.enter(model, Part::Embed, Pass::Backward)?;
            match model.embed_tokens.var() {
                Some(table) if model.embedding_grad_in_rows() => {
                    let rows = model.embedding_row_sums(&input_ids, &grad)?;
                    let dense = tied_grad;
                    params.add_table_grad(Part::Embed, table, TableGrad { dense, rows })?;
                }
                _ => {
                    let store = backward_from(&model.embed(&input_ids)?, &grad)?;
                    params.add_grads(Part::Embed, &store)?;
                }
            }
            params.leave(model, Part::Embed, Pass::Backward)?;
            phases.embedding += lap(&mut clock);
        }
        head.nll_sum
    } else {
        // The whole graph is kept, so every parameter must stay in the model from forward to
        // backward: only the replicated engine runs this way.
        let mut x = embedded;
        for i in 0..num_layers {
            params.enter(model, Part::Layer(i), Pass::Forward)?;
            x = model.layers[i].forward(&x, &ctx)?;
            params.leave(model, Part::Layer(i), Pass::Forward)?;
        }
        phases.layers_forward += lap(&mut clock);
        let head = head_backward(
            model,
            params,
            &x.detach(),
            &positions,
            loss_denominator,
            head_memory,
            false,
        )?;
        phases.head += lap(&mut clock);
        let store = backward_from(&x, &head.grad_hidden)?;
        params.add_grads(Part::Layer(0), &store)?;
        phases.layers_backward += lap(&mut clock);
        head.nll_sum
    };
    params.end(model)?;
    Ok(nll_sum)
}

/// The head's forward and backward, as one use of the head part. The trained head's gradient
/// is handed on with the part's, unless `keep_head_grad`: then it stays in the output for the
/// embedding's rows.
fn head_backward(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    top: &Tensor,
    positions: &LabelPositions,
    loss_denominator: f64,
    head_memory: HeadMemory,
    keep_head_grad: bool,
) -> TrainResult<HeadOutput> {
    params.enter(model, Part::Head, Pass::Backward)?;
    let mut failed = None;
    let mut head = head_forward_backward(
        model,
        top,
        positions,
        loss_denominator,
        head_memory,
        &mut |g| {
            if let Err(e) = params.add_grads(Part::Head, g) {
                failed = Some(e);
            }
            Ok(())
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if !keep_head_grad {
        if let (Some(grad), Some(var)) = (head.head_grad.take(), model.lm_head_weight().var()) {
            let grad = Tensor::from_vec(grad, var.shape(), &model.device)?;
            params.add_grads(Part::Head, &store_of(var.as_tensor(), grad)?)?;
        }
    }
    params.leave(model, Part::Head, Pass::Backward)?;
    Ok(head)
}

/// Sum of NLLs and number of label tokens of `batch`, without gradients (evaluation).
pub fn eval_nll(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    batch: &Batch,
) -> TrainResult<(f64, usize)> {
    let device = model.device.clone();
    let ctx = ForwardCtx::new(
        &model.config,
        &batch.attention_mask,
        model.dtype,
        0,
        &device,
    )?;
    params.begin(Walk::Eval)?;
    params.enter(model, Part::Embed, Pass::Forward)?;
    let mut x = model.embed(&batch.input_ids_tensor(&device)?)?.detach();
    params.leave(model, Part::Embed, Pass::Forward)?;
    for i in 0..model.layers.len() {
        params.enter(model, Part::Layer(i), Pass::Forward)?;
        x = model.layers[i].forward(&x, &ctx)?.detach();
        params.leave(model, Part::Layer(i), Pass::Forward)?;
    }
    let positions = LabelPositions::of(batch);
    params.enter(model, Part::Head, Pass::Forward)?;
    let nll = head_nll(model, &x, &positions)?;
    params.leave(model, Part::Head, Pass::Forward)?;
    params.end(model)?;
    Ok((nll, positions.rows.len()))
}
