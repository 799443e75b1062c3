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
use ff_kernels::weight_grads::store_of;
use ff_model::layers::KeptLayer;
use ff_model::table_grad::TableGrad;
use ff_model::{CausalLm, ForwardCtx};
use ff_walk::{BackwardExtent, Part, Pass, Residency, Walk};

use crate::backward::backward_from;
use crate::batch::Batch;
use crate::error::TrainResult;
use crate::loss::{head_forward_backward, head_nll, HeadMemory, HeadOutput, LabelPositions};
use crate::phases::{lap, StepPhases};
use crate::plan::{Checkpointing, Keeping};

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
    let ctx = ForwardCtx::new(
        &model.config,
        &batch.attention_mask,
        model.dtype,
        dropout_seed,
        &model.device,
    )?;
    let mut walk = TrainWalk {
        input_ids: batch.input_ids_tensor(&model.device)?,
        positions: LabelPositions::of(batch),
        extent: params.backward_extent(),
        model,
        params,
        ctx,
        loss_denominator,
        head_memory,
        phases,
        clock: Instant::now(),
    };
    walk.params.begin(Walk::Train)?;
    let nll_sum = match checkpointing {
        Checkpointing::Layers(keeping) => walk.checkpointed(keeping)?,
        Checkpointing::Off => walk.whole_graph()?,
    };
    walk.params.end(walk.model)?;
    Ok(nll_sum)
}

/// One micro-batch's training walk, stage by stage.
struct TrainWalk<'a> {
    model: &'a mut CausalLm,
    params: &'a mut dyn Residency,
    ctx: ForwardCtx,
    input_ids: Tensor,
    positions: LabelPositions,
    extent: BackwardExtent,
    loss_denominator: f64,
    head_memory: HeadMemory,
    phases: &'a mut StepPhases,
    clock: Instant,
}

impl TrainWalk<'_> {
    /// Gradient checkpointing: each layer's input (and what `keeping` names) is kept, and each
    /// layer recomputed in backward from it.
    fn checkpointed(&mut self, keeping: Keeping) -> TrainResult<f64> {
        let embedded = self.embed()?;
        let num_layers = self.model.layers.len();
        let mut saved = Vec::with_capacity(num_layers + 1);
        let mut kept = Vec::with_capacity(num_layers);
        saved.push(embedded.detach());
        for i in 0..num_layers {
            self.params
                .enter(self.model, Part::Layer(i), Pass::Forward)?;
            let x = saved.last().expect("holds the embedding");
            let keep = keeping.of_layer(i, num_layers);
            let (y, kept_values) = self.model.layers[i].forward_keeping(x, &self.ctx, keep)?;
            self.params
                .leave(self.model, Part::Layer(i), Pass::Forward)?;
            saved.push(y.detach());
            kept.push(kept_values);
        }
        self.phases.layers_forward += lap(&mut self.clock);
        let top = saved.pop().expect("holds the last layer's output");
        // See HeadMemory::BelowPeak.
        let tied_grad_waits = self.head_memory == HeadMemory::BelowPeak
            && self.extent.embedding
            && self.model.lm_head.is_none()
            && self.model.embedding_grad_in_rows();
        let head = self.head(&top, tied_grad_waits)?;
        let grad = self.layers_backward(head.grad_hidden, saved, kept)?;
        if self.extent.embedding {
            self.embedding_backward(&grad, head.head_grad)?;
        }
        Ok(head.nll_sum)
    }

    /// Gradient checkpointing off: the whole graph is kept, so every parameter must stay in
    /// the model from forward to backward: only the replicated engine runs this way.
    fn whole_graph(&mut self) -> TrainResult<f64> {
        let mut x = self.embed()?;
        for i in 0..self.model.layers.len() {
            self.params
                .enter(self.model, Part::Layer(i), Pass::Forward)?;
            x = self.model.layers[i].forward(&x, &self.ctx)?;
            self.params
                .leave(self.model, Part::Layer(i), Pass::Forward)?;
        }
        self.phases.layers_forward += lap(&mut self.clock);
        let head = self.head(&x.detach(), false)?;
        let store = backward_from(&x, &head.grad_hidden)?;
        self.params.add_grads(Part::Layer(0), &store)?;
        self.phases.layers_backward += lap(&mut self.clock);
        Ok(head.nll_sum)
    }

    fn embed(&mut self) -> TrainResult<Tensor> {
        self.params.enter(self.model, Part::Embed, Pass::Forward)?;
        let embedded = self.model.embed(&self.input_ids)?;
        self.params.leave(self.model, Part::Embed, Pass::Forward)?;
        self.phases.embedding += lap(&mut self.clock);
        Ok(embedded)
    }

    /// The head's forward and backward, as one use of the head part. The trained head's
    /// gradient is handed on with the part's, unless `keep_head_grad`: then it stays in the
    /// output for the embedding's rows.
    fn head(&mut self, top: &Tensor, keep_head_grad: bool) -> TrainResult<HeadOutput> {
        let (model, params) = (&mut *self.model, &mut *self.params);
        params.enter(model, Part::Head, Pass::Backward)?;
        let mut failed = None;
        let mut head = head_forward_backward(
            model,
            top,
            &self.positions,
            self.loss_denominator,
            self.head_memory,
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
        self.phases.head += lap(&mut self.clock);
        Ok(head)
    }

    /// Each layer from the top down to the extent, recomputed from its `saved` input with what
    /// its first pass `kept`; returns the gradient at the lowest layer's input.
    fn layers_backward(
        &mut self,
        mut grad: Tensor,
        mut saved: Vec<Tensor>,
        mut kept: Vec<KeptLayer>,
    ) -> TrainResult<Tensor> {
        let num_layers = self.model.layers.len();
        let lowest = if self.extent.embedding {
            0
        } else {
            self.extent.lowest_layer
        };
        for i in (lowest..num_layers).rev() {
            let input = saved.pop().expect("one saved input per layer");
            let kept_values = kept.pop().expect("one entry per layer");
            let needs_input_grad = i > lowest || self.extent.embedding;
            let input = if needs_input_grad {
                Var::from_tensor(&input)?.as_tensor().clone()
            } else {
                input
            };
            self.params
                .enter(self.model, Part::Layer(i), Pass::Backward)?;
            let layer = &self.model.layers[i];
            let recomputed = layer.forward_for_gradients(&input, &self.ctx, &kept_values)?;
            let store = backward_from(&recomputed, &grad)?;
            self.params.add_grads(Part::Layer(i), &store)?;
            self.params
                .leave(self.model, Part::Layer(i), Pass::Backward)?;
            if needs_input_grad {
                grad = match store.get(&input) {
                    Some(g) => g.detach(),
                    None => input.zeros_like()?,
                };
            }
        }
        self.phases.layers_backward += lap(&mut self.clock);
        Ok(grad)
    }

    /// The embedding's gradient from `grad` at its output, recomputed like the layers (a
    /// sharded engine has put a fresh table in the model since the forward pass); a tied
    /// head's `head_grad`, when it waited, goes with the table's rows.
    fn embedding_backward(
        &mut self,
        grad: &Tensor,
        head_grad: Option<Vec<f32>>,
    ) -> TrainResult<()> {
        let (model, params) = (&mut *self.model, &mut *self.params);
        params.enter(model, Part::Embed, Pass::Backward)?;
        match model.embed_tokens.var() {
            Some(table) if model.embedding_grad_in_rows() => {
                let rows = model.embedding_row_sums(&self.input_ids, grad)?;
                params.add_table_grad(
                    Part::Embed,
                    table,
                    TableGrad {
                        dense: head_grad,
                        rows,
                    },
                )?;
            }
            _ => {
                let store = backward_from(&model.embed(&self.input_ids)?, grad)?;
                params.add_grads(Part::Embed, &store)?;
            }
        }
        params.leave(model, Part::Embed, Pass::Backward)?;
        self.phases.embedding += lap(&mut self.clock);
        Ok(())
    }
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
