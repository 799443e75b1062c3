//! Forward and backward of one micro-batch, layer by layer.
//!
//! With gradient checkpointing (the default, as in LLaMA-Factory) the forward keeps only each
//! decoder layer's input; backward walks the layers from the last, recomputes a layer's forward
//! from its saved input and takes the gradient of `sum(output · upstream_grad)`, which yields the
//! layer's parameter gradients and the gradient for the layer below. Without checkpointing the
//! whole graph is kept and one backward covers every layer. Sharded training builds on the same
//! walk: a unit is gathered before its forward or recomputation and its gradients reduced after.

use std::collections::HashMap;

use candle_core::{backprop::GradStore, Result, Tensor, TensorId, Var};
use ff_dist::ProcessGroup;
use ff_model::{CausalLm, ForwardCtx};

use crate::batch::Batch;
use crate::loss::{head_forward_backward, LabelPositions};

/// The trained tensors of a model, in a fixed order, with gradient accumulators.
pub struct Trainables {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    pub grads: Vec<Option<Tensor>>,
    index: HashMap<TensorId, usize>,
    /// Lowest decoder layer that holds a trained tensor (`layers.len()` when none does), below
    /// which backward has nothing to compute.
    lowest_trained_layer: usize,
    embed_trains: bool,
}

impl Trainables {
    pub fn of(model: &mut CausalLm) -> Self {
        let params = model.trainable_params();
        let layer_of = |name: &str| -> Option<usize> {
            name.strip_prefix("model.layers.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        };
        let lowest_trained_layer = params
            .iter()
            .filter_map(|(n, _)| layer_of(n))
            .min()
            .unwrap_or(model.layers.len());
        let embed_trains = params.iter().any(|(n, _)| n == "model.embed_tokens.weight");
        let index = params
            .iter()
            .enumerate()
            .map(|(i, (_, v))| (v.as_tensor().id(), i))
            .collect();
        let (names, vars): (Vec<_>, Vec<_>) = params.into_iter().unzip();
        Self {
            grads: vec![None; vars.len()],
            names,
            vars,
            index,
            lowest_trained_layer,
            embed_trains,
        }
    }

    pub fn len(&self) -> usize {
        self.vars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vars.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.vars.iter().map(|v| v.elem_count()).sum()
    }

    /// Adds every trained tensor's gradient found in `store` to its accumulator.
    pub fn accumulate(&mut self, store: &GradStore) -> Result<()> {
        for id in store.get_ids() {
            if let Some(&i) = self.index.get(id) {
                let g = store.get_id(*id).expect("id listed by the store").detach();
                self.grads[i] = Some(match self.grads[i].take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    /// Sums every gradient over `group` in one collective (missing gradients count as zero).
    pub fn all_reduce_grads(&mut self, group: &dyn ProcessGroup) -> crate::error::TrainResult<()> {
        let mut flat: Vec<f32> = Vec::with_capacity(self.num_elements());
        for (var, grad) in self.vars.iter().zip(&self.grads) {
            match grad {
                Some(g) => flat.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
            }
        }
        group.all_reduce_sum(&mut flat)?;
        let mut offset = 0;
        for (var, grad) in self.vars.iter().zip(self.grads.iter_mut()) {
            let n = var.elem_count();
            *grad = Some(Tensor::from_slice(
                &flat[offset..offset + n],
                var.shape(),
                var.device(),
            )?);
            offset += n;
        }
        Ok(())
    }

    /// Makes every rank start from rank 0's values of the trained tensors.
    pub fn broadcast_from_rank0(&self, group: &dyn ProcessGroup) -> crate::error::TrainResult<()> {
        if group.world_size() == 1 {
            return Ok(());
        }
        let mut flat: Vec<f32> = Vec::with_capacity(self.num_elements());
        for var in &self.vars {
            flat.extend(var.flatten_all()?.to_vec1::<f32>()?);
        }
        group.broadcast(&mut flat, 0)?;
        let mut offset = 0;
        for var in &self.vars {
            let n = var.elem_count();
            var.set(&Tensor::from_slice(
                &flat[offset..offset + n],
                var.shape(),
                var.device(),
            )?)?;
            offset += n;
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }
}

/// Forward and backward of `batch`, adding the gradient of `nll_sum / loss_denominator` to
/// `trainables`. `loss_denominator` is the number of label tokens of the whole optimizer step
/// (all micro-batches, all ranks), so that accumulation and data parallelism give the gradient
/// of one big batch. Returns the micro-batch's un-normalised NLL sum.
pub fn forward_backward(
    model: &CausalLm,
    trainables: &mut Trainables,
    batch: &Batch,
    loss_denominator: f64,
    gradient_checkpointing: bool,
    dropout_seed: u64,
) -> Result<f64> {
    let device = &model.device;
    let ctx = ForwardCtx::new(
        &model.config,
        &batch.attention_mask,
        model.dtype,
        dropout_seed,
        device,
    )?;
    let input_ids = batch.input_ids_tensor(device)?;
    let positions = LabelPositions::of(batch);
    let first = trainables.lowest_trained_layer;
    let embed_trains = trainables.embed_trains;
    let embedded = model.embed(&input_ids)?;

    if gradient_checkpointing {
        let mut saved = Vec::with_capacity(model.layers.len() + 1);
        saved.push(embedded.detach());
        for layer in &model.layers {
            let x = saved.last().expect("holds the embedding");
            saved.push(layer.forward(x, &ctx)?.detach());
        }
        let top = saved.pop().expect("holds the last layer's output");
        let head = head_forward_backward(model, &top, &positions, loss_denominator, &mut |g| {
            trainables.accumulate(g)
        })?;
        let mut grad = head.grad_hidden;
        let lowest = if embed_trains { 0 } else { first };
        for (i, layer) in model.layers.iter().enumerate().rev() {
            if i < lowest {
                break;
            }
            let input = saved.pop().expect("one saved input per layer");
            let needs_input_grad = i > lowest || embed_trains;
            let input = if needs_input_grad {
                Var::from_tensor(&input)?.as_tensor().clone()
            } else {
                input
            };
            let store = (layer.forward(&input, &ctx)? * &grad)?
                .sum_all()?
                .backward()?;
            trainables.accumulate(&store)?;
            if needs_input_grad {
                grad = match store.get(&input) {
                    Some(g) => g.detach(),
                    None => input.zeros_like()?,
                };
            }
        }
        if embed_trains {
            let store = (embedded * &grad)?.sum_all()?.backward()?;
            trainables.accumulate(&store)?;
        }
        Ok(head.nll_sum)
    } else {
        let mut x = embedded;
        for layer in &model.layers {
            x = layer.forward(&x, &ctx)?;
        }
        let head =
            head_forward_backward(model, &x.detach(), &positions, loss_denominator, &mut |g| {
                trainables.accumulate(g)
            })?;
        let store = (x * head.grad_hidden)?.sum_all()?.backward()?;
        trainables.accumulate(&store)?;
        Ok(head.nll_sum)
    }
}

/// What one optimizer step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean NLL over every label token of the step's micro-batches.
    pub loss: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
    pub num_label_tokens: usize,
}

/// Settings of the step that do not change from one step to the next.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOptions {
    pub max_grad_norm: Option<f64>,
    pub gradient_checkpointing: bool,
}

/// One optimizer step over this rank's `micro_batches` (gradient accumulation): forward and
/// backward of each, gradients summed over `group` (each rank's loss is already divided by the
/// label tokens of all ranks, so the sum is the gradient of the whole step), clip, AdamW update
/// at `lr`. Every rank must call it, even with no examples, since the sums are collective.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    model: &CausalLm,
    trainables: &mut Trainables,
    optimizer: &mut crate::optim::AdamW,
    micro_batches: &[Batch],
    lr: f64,
    options: StepOptions,
    dropout_seed: u64,
    group: &dyn ProcessGroup,
) -> crate::error::TrainResult<StepStats> {
    let mut tokens = [micro_batches
        .iter()
        .map(Batch::num_label_tokens)
        .sum::<usize>() as f64];
    group.all_reduce_sum_f64(&mut tokens)?;
    let num_label_tokens = tokens[0] as usize;
    let denominator = num_label_tokens.max(1) as f64;
    trainables.zero_grads();
    let mut nll_sum = 0.0;
    for (i, batch) in micro_batches.iter().enumerate() {
        if batch.is_empty() {
            continue;
        }
        nll_sum += forward_backward(
            model,
            trainables,
            batch,
            denominator,
            options.gradient_checkpointing,
            crate::seed_for(dropout_seed, i as u64),
        )?;
    }
    if group.world_size() > 1 {
        trainables.all_reduce_grads(group)?;
    }
    let mut nll = [nll_sum];
    group.all_reduce_sum_f64(&mut nll)?;
    let nll_sum = nll[0];
    let grad_norm = crate::optim::grad_sq_norm(&trainables.grads)?.sqrt();
    if let Some(max_norm) = options.max_grad_norm {
        crate::optim::clip_grads(&mut trainables.grads, grad_norm, max_norm)?;
    }
    optimizer.step(&trainables.vars, &trainables.grads, lr)?;
    Ok(StepStats {
        loss: nll_sum / denominator,
        grad_norm,
        num_label_tokens,
    })
}

/// Sum of NLLs and number of label tokens of `batch`, without gradients (evaluation).
pub fn eval_nll(model: &CausalLm, batch: &Batch) -> Result<(f64, usize)> {
    let device = &model.device;
    let ctx = ForwardCtx::new(&model.config, &batch.attention_mask, model.dtype, 0, device)?;
    let mut x = model.embed(&batch.input_ids_tensor(device)?)?.detach();
    for layer in &model.layers {
        x = layer.forward(&x, &ctx)?.detach();
    }
    let positions = LabelPositions::of(batch);
    let nll = crate::loss::head_nll(model, &x, &positions)?;
    Ok((nll, positions.rows.len()))
}
