//! A micro-batch's rows split into groups that run forward and backward side by side, one per
//! core, each on a thread whose products and fused ops run on that thread alone.
//!
//! Products shared between threads run well below their threads' sum, and the calling thread
//! sums candle's gradients while the others wait; groups of rows have nothing to wait on each
//! other for (bench/RESULTS.md has the measurements).
//!
//! The groups add into the step's one set of gradients, taking turns: every backward hands its
//! gradients over once per part as it leaves the part (the head, each layer, the embedding),
//! and once at its end, so every group hands over as many times, in the same order, however
//! many pieces a part gave (the head gives one per chunk of its group's label tokens), and a
//! group's k-th hand-over is added after the k-th of the groups before it.
//! The sum is then the same whichever group runs ahead. Turns cost a fraction of the memory a
//! copy of the gradients per group, added at the end, would.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use ff_model::table_grad::TableGrad;
use ff_model::CausalLm;
use ff_walk::{BackwardExtent, Part, Pass, Residency, Walk, WalkError, WalkResult};

use crate::batch::Batch;
use crate::engine::Trainables;
use crate::error::{TrainError, TrainResult};
use crate::loss::HeadMemory;
use crate::phases::StepPhases;
use crate::plan::Checkpointing;
use crate::row_threads::on_row_group_threads;
use crate::walk::forward_backward_timed;

/// A micro-batch's forward and backward in `groups` groups of its rows.
pub(crate) struct RowGroups<'a> {
    pub model: &'a CausalLm,
    pub batch: &'a Batch,
    pub groups: usize,
    pub loss_denominator: f64,
    pub checkpointing: Checkpointing,
    pub head_memory: HeadMemory,
    pub dropout_seed: u64,
}

impl RowGroups<'_> {
    /// Adds the groups' gradients to `trainables` and returns the micro-batch's NLL sum; the
    /// phases are the first group's (the groups run at once).
    pub fn forward_backward(
        &self,
        trainables: &mut Trainables,
        phases: &mut StepPhases,
    ) -> TrainResult<f64> {
        let per_group = self.batch.len().div_ceil(self.groups);
        let extent = trainables.extent;
        let sum = TurnTakingSum::new(trainables, self.groups);
        let jobs: Vec<_> = (0..self.groups)
            .map(|g| {
                // A copy of the model shares every tensor with it; each group walks its own.
                let mut model = self.model.clone();
                let batch = self.batch.rows(g * per_group, per_group);
                let mut grads = GroupGrads {
                    sum: &sum,
                    group: g,
                    handed_over: 0,
                    part: HandOver::default(),
                    extent,
                };
                move || -> TrainResult<(f64, StepPhases)> {
                    let mut phases = StepPhases::default();
                    let nll_sum = forward_backward_timed(
                        &mut model,
                        &mut grads,
                        &batch,
                        self.loss_denominator,
                        self.checkpointing,
                        self.head_memory,
                        crate::seed_for(self.dropout_seed, g as u64),
                        &mut phases,
                    )?;
                    Ok((nll_sum, phases))
                }
            })
            .collect();
        let mut nll_sum = 0.0;
        for (g, result) in on_row_group_threads(jobs).into_iter().enumerate() {
            let (group_nll, group_phases) = result?;
            nll_sum += group_nll;
            if g == 0 {
                phases.add(&group_phases);
            }
        }
        sum.finish()?;
        Ok(nll_sum)
    }
}

/// The step's gradients, which the groups add to in turns: hand-over `k` of group `g` is turn
/// `k · groups + g`. A hand-over ahead of its turn waits in a queue, and whichever group hands
/// over the turn that is due adds it and the queued ones after it, so no group ever waits on
/// another. The queue holds what one group computed ahead of the others: a layer's gradients
/// or two as they run at the same pace, at most one group's whole gradients.
struct TurnTakingSum<'t> {
    state: Mutex<SumState<'t>>,
    groups: usize,
}

struct SumState<'t> {
    trainables: &'t mut Trainables,
    /// Turns added so far: the next is this one.
    turns: usize,
    /// Hand-overs ahead of their turn, by turn.
    queued: BTreeMap<usize, HandOver>,
}

/// The trained tensors' gradients from one part of one group's walk.
#[derive(Default)]
struct HandOver {
    grads: Vec<(TensorId, Tensor)>,
    /// Added after `grads`.
    tables: Vec<(TensorId, TableGrad)>,
}

impl<'t> TurnTakingSum<'t> {
    fn new(trainables: &'t mut Trainables, groups: usize) -> Self {
        Self {
            state: Mutex::new(SumState {
                trainables,
                turns: 0,
                queued: BTreeMap::new(),
            }),
            groups,
        }
    }

    /// A panic in another group while it held the lock fails the step anyway, from that
    /// group's thread.
    fn lock(&self) -> MutexGuard<'_, SumState<'t>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The gradients in `store` of the trained tensors.
    fn trained_grads(&self, store: &GradStore) -> Vec<(TensorId, Tensor)> {
        self.lock().trainables.trained_grads(store)
    }

    /// Hand-over `handed_over` of `group`: added now if its turn is due, else queued.
    fn add(&self, group: usize, handed_over: usize, part: HandOver) -> TrainResult<()> {
        let mut state = self.lock();
        let state = &mut *state;
        state.queued.insert(handed_over * self.groups + group, part);
        while let Some(part) = state.queued.remove(&state.turns) {
            state.trainables.accumulate_grads(part.grads)?;
            for (id, table) in part.tables {
                state.trainables.accumulate_table(id, table)?;
            }
            state.turns += 1;
        }
        Ok(())
    }

    /// Whether every hand-over was added: it is not when a group handed over fewer times
    /// than one before it.
    fn finish(self) -> TrainResult<()> {
        let state = self
            .state
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        if state.queued.is_empty() {
            return Ok(());
        }
        Err(TrainError::RowGroups(format!(
            "group {} stopped before handing over gradients {}",
            state.turns % self.groups,
            state.turns / self.groups + 1
        )))
    }
}

/// One group's side of the sum: the gradients it computes are the step's, handed over in turn.
struct GroupGrads<'s, 't> {
    sum: &'s TurnTakingSum<'t>,
    group: usize,
    handed_over: usize,
    /// The trained tensors' gradients from the part being walked, summed until it is left.
    part: HandOver,
    extent: BackwardExtent,
}

impl GroupGrads<'_, '_> {
    fn hand_over(&mut self) -> WalkResult<()> {
        let grads = std::mem::take(&mut self.part);
        self.sum
            .add(self.group, self.handed_over, grads)
            .map_err(storage_error)?;
        self.handed_over += 1;
        Ok(())
    }
}

fn storage_error(e: impl Into<TrainError>) -> WalkError {
    WalkError::residency(e.into())
}

impl Residency for GroupGrads<'_, '_> {
    fn backward_extent(&self) -> BackwardExtent {
        self.extent
    }

    fn begin(&mut self, _walk: Walk) -> WalkResult<()> {
        Ok(())
    }

    fn enter(&mut self, _model: &mut CausalLm, _part: Part, _pass: Pass) -> WalkResult<()> {
        Ok(())
    }

    fn add_grads(&mut self, _part: Part, grads: &GradStore) -> WalkResult<()> {
        for (id, grad) in self.sum.trained_grads(grads) {
            match self.part.grads.iter_mut().find(|(held, _)| *held == id) {
                Some((_, sum)) => *sum = (&*sum + grad).map_err(storage_error)?,
                None => self.part.grads.push((id, grad)),
            }
        }
        Ok(())
    }

    fn add_table_grad(&mut self, _part: Part, table: &Var, grad: TableGrad) -> WalkResult<()> {
        self.part.tables.push((table.as_tensor().id(), grad));
        Ok(())
    }

    fn leave(&mut self, _model: &mut CausalLm, _part: Part, pass: Pass) -> WalkResult<()> {
        match pass {
            Pass::Backward => self.hand_over(),
            Pass::Forward => Ok(()),
        }
    }

    /// Without checkpointing, the layers' gradients come from one backward with no part left
    /// after it.
    fn end(&mut self, _model: &mut CausalLm) -> WalkResult<()> {
        self.hand_over()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use ff_kernels::weight_grads::store_of;
    use ff_model::load::load_model_dir;
    use ff_model::table_grad::RowSums;

    fn tiny_trainables() -> (CausalLm, Trainables) {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
        let mut model = load_model_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        ff_model::finetune::make_all_trainable(&mut model).unwrap();
        let trainables = Trainables::of(&mut model);
        (model, trainables)
    }

    fn ones_for(trainables: &Trainables, i: usize, value: f32) -> GradStore {
        let var = trainables.vars[i].as_tensor();
        let grad = Tensor::full(value, var.shape(), &Device::Cpu).unwrap();
        store_of(var, grad).unwrap()
    }

    fn first_grad(trainables: &Trainables) -> Vec<f32> {
        let grad = trainables.grads[0].as_ref().unwrap();
        grad.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn assert_first_grad_is(trainables: &Trainables, value: f32) {
        let grad = first_grad(trainables);
        assert!(grad.iter().all(|&g| g == value), "{:?}", &grad[..4]);
    }

    fn grads_only(grads: Vec<(TensorId, Tensor)>) -> HandOver {
        HandOver {
            grads,
            tables: Vec::new(),
        }
    }

    /// A table's gradient adds its dense values to the sum before its rows: (1e8 + -1e8) + 1
    /// is 1 in row 0, where adding the row to the dense values first gives 0.
    #[test]
    fn a_table_hand_over_adds_its_dense_values_then_its_rows() {
        let (_model, mut trainables) = tiny_trainables();
        assert_eq!(trainables.names[0], "model.embed_tokens.weight");
        let dense = ones_for(&trainables, 0, 1e8);
        let table = trainables.vars[0].clone();
        let (len, width) = (table.elem_count(), table.dim(1).unwrap());
        let rows = RowSums::of(&[0], &vec![1.0; width], width, None).unwrap();
        let sum = TurnTakingSum::new(&mut trainables, 2);
        let mut second = GroupGrads {
            sum: &sum,
            group: 1,
            handed_over: 0,
            part: HandOver::default(),
            extent: BackwardExtent {
                lowest_layer: 0,
                embedding: true,
            },
        };
        let grad = TableGrad {
            dense: Some(vec![-1e8; len]),
            rows,
        };
        second.add_table_grad(Part::Embed, &table, grad).unwrap();
        second.hand_over().unwrap();
        sum.add(0, 0, grads_only(sum.trained_grads(&dense)))
            .unwrap();
        drop(second);
        sum.finish().unwrap();
        let grad = first_grad(&trainables);
        assert!(grad[..width].iter().all(|&g| g == 1.0), "{:?}", &grad[..4]);
        assert!(grad[width..].iter().all(|&g| g == 0.0));
    }

    /// The later groups hand over first, yet the sum is the groups' in order: (1e8 + -1e8)
    /// + 1 is 1 in float32, where any other order gives 0.
    #[test]
    fn groups_add_in_turn_whichever_runs_ahead() {
        let (_model, mut trainables) = tiny_trainables();
        let values = [1e8, -1e8, 1.0];
        let stores: Vec<GradStore> = values
            .iter()
            .map(|&v| ones_for(&trainables, 0, v))
            .collect();
        let sum = TurnTakingSum::new(&mut trainables, 3);
        for (group, store) in stores.iter().enumerate().rev() {
            sum.add(group, 0, grads_only(sum.trained_grads(store)))
                .unwrap();
        }
        sum.finish().unwrap();
        assert_first_grad_is(&trainables, 1.0);
    }

    /// A group that hands over fewer times than the one before it leaves a hand-over
    /// queued: the step fails instead of dropping it.
    #[test]
    fn a_missing_hand_over_fails_the_sum() {
        let (_model, mut trainables) = tiny_trainables();
        let grads = ones_for(&trainables, 0, 1.0);
        let sum = TurnTakingSum::new(&mut trainables, 2);
        let trained = || grads_only(sum.trained_grads(&grads));
        sum.add(0, 0, trained()).unwrap();
        sum.add(1, 0, trained()).unwrap();
        sum.add(1, 1, trained()).unwrap();
        let err = sum.finish().unwrap_err();
        assert!(
            err.to_string()
                .contains("group 0 stopped before handing over gradients 2"),
            "{err}"
        );
    }

    /// The head gives a store per chunk of a group's label tokens, so groups give different
    /// numbers of them: a part is handed over once, when it is left, whatever it gave.
    #[test]
    fn a_part_is_handed_over_once_however_many_stores_it_gave() {
        let (mut model, mut trainables) = tiny_trainables();
        let one = ones_for(&trainables, 0, 1.0);
        let extent = trainables.extent;
        let sum = TurnTakingSum::new(&mut trainables, 2);
        let group = |g: usize| GroupGrads {
            sum: &sum,
            group: g,
            handed_over: 0,
            part: HandOver::default(),
            extent,
        };
        let (mut first, mut second) = (group(0), group(1));
        for (grads, chunks) in [(&mut first, 3), (&mut second, 1)] {
            for _ in 0..chunks {
                grads.add_grads(Part::Head, &one).unwrap();
            }
            grads.leave(&mut model, Part::Head, Pass::Backward).unwrap();
            grads.end(&mut model).unwrap();
        }
        assert_eq!((first.handed_over, second.handed_over), (2, 2));
        drop((first, second));
        sum.finish().unwrap();
        assert_first_grad_is(&trainables, 4.0);
    }
}
