//! The replicated engine: every rank holds every trained tensor, its gradient accumulator and
//! (through the optimizer) its AdamW moments, in memory or offloaded to disk. One process, data
//! parallelism and FSDP's NO_SHARD all train this way.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use ff_dist::ProcessGroup;
use ff_model::table_grad::TableGrad;
use ff_model::CausalLm;
use ff_walk::{BackwardExtent, Part, Pass, Residency, Walk, WalkError, WalkResult};

use crate::error::TrainResult;
use crate::offload::{OffloadedGrads, UpdateProgress};
use crate::optim::{with_float32_values, AdamW, AdamWConfig};
use crate::phases::StepPhases;

/// The trained tensors of a model, in a fixed order, with gradient accumulators.
pub struct Trainables {
    pub names: Vec<String>,
    /// The part of the model each tensor belongs to.
    pub parts: Vec<Part>,
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
        let params = model.trainable_params_with_parts();
        let extent =
            BackwardExtent::of_parts(params.iter().map(|(part, _, _)| *part), model.layers.len());
        let index = params
            .iter()
            .enumerate()
            .map(|(i, (_, _, v))| (v.as_tensor().id(), i))
            .collect();
        let mut parts = Vec::with_capacity(params.len());
        let mut names = Vec::with_capacity(params.len());
        let mut vars = Vec::with_capacity(params.len());
        for (part, name, var) in params {
            parts.push(part);
            names.push(name);
            vars.push(var);
        }
        Self {
            grads: vec![None; vars.len()],
            offloaded: None,
            names,
            parts,
            vars,
            index,
            extent,
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
        let needs = |of: Part| match part {
            Part::Embed | Part::Layer(_) => of == part,
            Part::Head => true,
        };
        self.parts
            .iter()
            .rposition(|&of| needs(of))
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

/// Replicated tensors are always in the model; backward only adds gradients.
impl Residency for Trainables {
    fn backward_extent(&self) -> BackwardExtent {
        self.extent
    }

    fn begin(&mut self, _walk: Walk) -> WalkResult<()> {
        Ok(())
    }

    /// Waits, when the last step's update is still running, for the part's parameters.
    fn enter(&mut self, _model: &mut CausalLm, part: Part, _pass: Pass) -> WalkResult<()> {
        let pending = |t: &Self| t.offloaded.as_ref()?.pending_update.clone();
        let Some(progress) = pending(self) else {
            return Ok(());
        };
        let needed = self.params_needed_by(part);
        let start = Instant::now();
        progress.wait_for(needed).map_err(WalkError::residency)?;
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

    fn add_grads(&mut self, _part: Part, grads: &GradStore) -> WalkResult<()> {
        self.accumulate(grads).map_err(WalkError::residency)
    }

    fn add_table_grad(&mut self, _part: Part, table: &Var, grad: TableGrad) -> WalkResult<()> {
        self.accumulate_table(table.as_tensor().id(), grad)
            .map_err(WalkError::residency)
    }

    fn leave(&mut self, _model: &mut CausalLm, _part: Part, _pass: Pass) -> WalkResult<()> {
        Ok(())
    }

    fn end(&mut self, _model: &mut CausalLm) -> WalkResult<()> {
        Ok(())
    }
}
