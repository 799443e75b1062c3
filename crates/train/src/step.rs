//! Forward and backward of one micro-batch, layer by layer.
//!
//! With gradient checkpointing (the default, as in LLaMA-Factory) the forward keeps only each
//! decoder layer's input; backward walks the layers from the last, recomputes a layer's forward
//! from its saved input and takes the gradient of `sum(output · upstream_grad)`, which yields the
//! layer's parameter gradients and the gradient for the layer below. Without checkpointing the
//! whole graph is kept and one backward covers every layer. Sharded training builds on the same
//! walk: a unit is gathered before its forward or recomputation and its gradients reduced after.
//! Full fine-tuning in memory also keeps some of the layers' results (see [`Checkpointing`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{backprop::GradStore, Tensor, TensorId, Var};
use ff_dist::ProcessGroup;
use ff_fsdp::{BackwardExtent, Part, Pass, Residency, Walk};
use ff_kernels::weight_grads::store_of;
use ff_model::layers::Keep;
use ff_model::table_grad::TableGrad;
use ff_model::{CausalLm, ForwardCtx};

use crate::backward::backward_from;
use crate::batch::Batch;
use crate::engine::Engine;
use crate::error::TrainResult;
use crate::loss::{head_forward_backward, HeadMemory, LabelPositions};
use crate::offload::{OffloadedGrads, UpdateProgress};
use crate::optim::{with_float32_values, AdamW, AdamWConfig};
use crate::row_groups::{row_groups, RowGroups};

/// The trained tensors of a model, in a fixed order, with gradient accumulators.
pub struct Trainables {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    pub grads: Vec<Option<Tensor>>,
    /// Where the gradients go instead of `grads` when they are offloaded to disk.
    pub offloaded: Option<Box<GradOffload>>,
    index: HashMap<TensorId, usize>,
    /// How far down backward must go.
    pub(crate) extent: BackwardExtent,
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
            offloaded: None,
            names,
            vars,
            index,
            extent: BackwardExtent {
                lowest_layer: lowest_trained_layer,
                embedding: embed_trains,
            },
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

    /// Keeps the gradients in an unnamed direct-I/O file in `dir` from now on, and returns the
    /// AdamW whose moments live there too.
    pub fn offload_to(&mut self, dir: &Path, config: AdamWConfig) -> TrainResult<AdamW> {
        let lens: Vec<usize> = self.vars.iter().map(|v| v.elem_count()).collect();
        self.offloaded = Some(Box::new(GradOffload {
            grads: OffloadedGrads::create(dir, &lens)?,
            pending_update: None,
            update_waits: StepPhases::default(),
        }));
        AdamW::offloaded(config, &self.names, &lens, dir)
    }

    /// How many parameters, in order, `part` needs updated before it runs: the update goes
    /// through them in the order the forward uses them (embedding, layers, final norm and head;
    /// a tied head is the embedding, which is first anyway).
    pub(crate) fn params_needed_by(&self, part: Part) -> usize {
        let layer_prefix = match part {
            Part::Layer(i) => format!("model.layers.{i}."),
            Part::Embed | Part::Head => String::new(),
        };
        let needs = |name: &str| match part {
            Part::Embed => name == "model.embed_tokens.weight",
            Part::Layer(_) => name.starts_with(&layer_prefix),
            Part::Head => true,
        };
        self.names
            .iter()
            .rposition(|n| needs(n))
            .map_or(0, |i| i + 1)
    }

    /// Adds every trained tensor's gradient found in `store` to its accumulator.
    pub fn accumulate(&mut self, store: &GradStore) -> TrainResult<()> {
        self.accumulate_grads(self.trained_grads(store))
    }

    /// The gradients in `store` of the trained tensors (a backward's store holds every node's).
    pub(crate) fn trained_grads(&self, store: &GradStore) -> Vec<(TensorId, Tensor)> {
        store
            .get_ids()
            .filter(|id| self.index.contains_key(id))
            .map(|&id| {
                (
                    id,
                    store.get_id(id).expect("id listed by the store").detach(),
                )
            })
            .collect()
    }

    /// Adds gradients of trained tensors to their accumulators.
    pub(crate) fn accumulate_grads(&mut self, grads: Vec<(TensorId, Tensor)>) -> TrainResult<()> {
        for (id, g) in grads {
            let i = self.index[&id];
            if let Some(offload) = &mut self.offloaded {
                with_float32_values(&g, |values| offload.grads.add(i, values))??;
                continue;
            }
            self.grads[i] = Some(match self.grads[i].take() {
                Some(acc) => (acc + g)?,
                None => g,
            });
        }
        Ok(())
    }

    /// Adds a table's gradient given as dense values and rows: the dense values to the
    /// accumulator, then the rows (in memory, in one buffer: the dense values' own, or a copy
    /// of the accumulator when there are none).
    pub(crate) fn accumulate_table(&mut self, id: TensorId, grad: TableGrad) -> TrainResult<()> {
        let Some(&i) = self.index.get(&id) else {
            return Ok(());
        };
        let len = self.vars[i].elem_count();
        let TableGrad { dense, rows } = grad;
        if let Some(offload) = &mut self.offloaded {
            if let Some(dense) = dense {
                offload.grads.add(i, &dense)?;
            }
            let rows = TableGrad { dense: None, rows }.into_values(len)?;
            return offload.grads.add(i, &rows);
        }
        let mut sum = match (dense, self.grads[i].take()) {
            (Some(mut dense), Some(acc)) => {
                with_float32_values(&acc, |acc| {
                    for (d, &a) in dense.iter_mut().zip(acc) {
                        *d += a;
                    }
                })?;
                dense
            }
            (None, Some(acc)) => with_float32_values(&acc, <[f32]>::to_vec)?,
            (dense, None) => dense.unwrap_or_else(|| vec![0.0; len]),
        };
        if sum.len() != len {
            return Err(candle_core::Error::Msg(format!(
                "a gradient of {} values for a table of {len}",
                sum.len()
            ))
            .into());
        }
        rows.add_to(&mut sum)?;
        let var = &self.vars[i];
        self.grads[i] = Some(Tensor::from_vec(sum, var.shape(), var.device())?);
        Ok(())
    }

    /// Sums every gradient over `group` in one collective (missing gradients count as zero);
    /// offloaded ones a chunk at a time.
    pub fn all_reduce_grads(&mut self, group: &dyn ProcessGroup) -> TrainResult<()> {
        if let Some(offload) = &mut self.offloaded {
            return offload.grads.all_reduce(group);
        }
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
    pub fn broadcast_from_rank0(&self, group: &dyn ProcessGroup) -> TrainResult<()> {
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
        if let Some(offload) = &mut self.offloaded {
            offload.grads.clear();
        }
    }
}

/// Gradients kept on disk, and the last step's update of the parameters from them.
pub struct GradOffload {
    pub grads: OffloadedGrads,
    /// That update, still running on its own thread: a part waits for its parameters before
    /// it is used.
    pub(crate) pending_update: Option<Arc<UpdateProgress>>,
    /// Time parts spent waiting for it, by the step phase they waited in.
    pub(crate) update_waits: StepPhases,
}

/// What the forward keeps for the layers' backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checkpointing {
    /// The whole graph (gradient checkpointing off); only the replicated engine runs this way.
    Off,
    /// Each layer's input, and the results [`Keeping`] names; the backward recomputes each
    /// layer but for those (gradient checkpointing).
    Layers(Keeping),
}

/// Which layers' results the first pass keeps beside their inputs (see
/// [`ff_model::layers::Keep`]): attention's for the topmost `attention_layers` layers, the MLP's
/// gate and up projections' for the topmost `mlp_layers`. The topmost, because the backward
/// frees their kept values first, while full fine-tuning's gradients grow layer by layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keeping {
    pub attention_layers: usize,
    pub mlp_layers: usize,
}

impl Keeping {
    /// What layer `index` of `num_layers` keeps.
    pub fn of_layer(self, index: usize, num_layers: usize) -> Keep {
        let from_top = num_layers - index;
        Keep {
            attention: from_top <= self.attention_layers,
            mlp: from_top <= self.mlp_layers,
        }
    }
}

impl Checkpointing {
    /// The policy for a micro-batch of `tokens` when the run sets `gradient_checkpointing`:
    /// layers keep results while all that is kept takes at most a quarter of the memory the
    /// optimizer's side of training holds anyway (a float32 weight, its gradient and two AdamW
    /// moments, 16 bytes a trained parameter, when they live in memory on this rank), attention's
    /// first, layer by layer from the top, then the MLP's. Full fine-tuning of SmolLM2-135M at
    /// 4 × 256 tokens keeps attention's results in all 30 layers (260 MB) and the MLP's in 22
    /// (277 MB) beside its 2.2 GB; LoRA, offloaded or sharded state, or long batches leave little
    /// room, and their layers are recomputed whole.
    pub fn for_step(
        gradient_checkpointing: bool,
        model: &CausalLm,
        engine: &Engine,
        tokens: usize,
    ) -> Self {
        if !gradient_checkpointing {
            return Checkpointing::Off;
        }
        let state_bytes = engine
            .trainables_in_memory()
            .map_or(0, |t| 16 * t.num_elements());
        let mut budget = state_bytes / 4;
        let mut keeping_from_top = |keep: Keep| {
            model
                .layers
                .iter()
                .rev()
                .take_while(|layer| {
                    let bytes = 4 * tokens * layer.kept_values_per_token(keep);
                    let fits = bytes <= budget;
                    if fits {
                        budget -= bytes;
                    }
                    fits
                })
                .count()
        };
        let attention_layers = keeping_from_top(Keep {
            attention: true,
            mlp: false,
        });
        let mlp_layers = keeping_from_top(Keep {
            attention: false,
            mlp: true,
        });
        Checkpointing::Layers(Keeping {
            attention_layers,
            mlp_layers,
        })
    }
}

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
) -> TrainResult<crate::loss::HeadOutput> {
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

/// Wall time of a step's phases, for the benchmark's profile (a few clock reads per layer).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepPhases {
    /// Embedding lookup, and its backward when the embedding trains.
    pub embedding: Duration,
    /// The decoder layers' forward pass.
    pub layers_forward: Duration,
    /// Final norm, LM head and loss, forward and backward.
    pub head: Duration,
    /// The decoder layers' backward, recomputation included.
    pub layers_backward: Duration,
    /// Collectives: token counts and gradient reduction (a sharded engine's gathers are in the
    /// layer phases).
    pub communication: Duration,
    /// Gradient norm, clipping and the AdamW update.
    pub optimizer: Duration,
}

impl StepPhases {
    pub(crate) fn add(&mut self, other: &StepPhases) {
        self.embedding += other.embedding;
        self.layers_forward += other.layers_forward;
        self.head += other.head;
        self.layers_backward += other.layers_backward;
        self.communication += other.communication;
        self.optimizer += other.optimizer;
    }

    pub fn total(&self) -> Duration {
        self.embedding
            + self.layers_forward
            + self.head
            + self.layers_backward
            + self.communication
            + self.optimizer
    }
}

/// Time since `clock`, which restarts.
fn lap(clock: &mut Instant) -> Duration {
    let now = Instant::now();
    let elapsed = now - *clock;
    *clock = now;
    elapsed
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
    optimizer: &mut crate::optim::AdamW,
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
    for (i, batch) in micro_batches.iter().enumerate() {
        // A sharded engine's walk is collective: a rank without examples walks a placeholder.
        let batch = match (batch.is_empty(), &*engine) {
            (false, _) => batch,
            (true, Engine::Replicated(_)) => continue,
            (true, Engine::Sharded(_)) => &placeholder,
        };
        let seed = crate::seed_for(dropout_seed, i as u64);
        let checkpointing = Checkpointing::for_step(
            options.gradient_checkpointing,
            model,
            engine,
            batch.num_tokens(),
        );
        let head_memory = HeadMemory::for_step(model, engine);
        let groups = row_groups(model, engine, batch.len());
        nll_sum += match engine {
            Engine::Replicated(trainables) if groups > 1 => {
                let groups = RowGroups {
                    model,
                    batch,
                    groups,
                    loss_denominator: denominator,
                    checkpointing,
                    head_memory,
                    dropout_seed: seed,
                };
                groups.forward_backward(trainables, &mut phases)?
            }
            _ => forward_backward_timed(
                model,
                engine.residency(),
                batch,
                denominator,
                checkpointing,
                head_memory,
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
        .and_then(|max_norm| crate::optim::clip_coefficient(grad_norm, max_norm));
    engine.optimizer_step(optimizer, lr, clip)?;
    phases.optimizer += lap(&mut clock);
    Ok(StepStats {
        loss: nll_sum / denominator,
        grad_norm,
        num_label_tokens,
        phases,
    })
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
    let nll = crate::loss::head_nll(model, &x, &positions)?;
    params.leave(model, Part::Head, Pass::Forward)?;
    params.end(model)?;
    Ok((nll, positions.rows.len()))
}
