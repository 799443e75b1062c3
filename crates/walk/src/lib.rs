//! The contract between the walk over a model and whoever keeps its parameters.
//!
//! A training or evaluation step walks the decoder part by part (embedding, layers, head, and
//! back down); before a part computes its parameters must be in the model, and after its
//! backward its gradients must go somewhere. Where parameters and gradients live is a
//! [`Residency`]'s business: replicated in memory or on disk (`ff-train`), a row group's share of
//! them (`ff-train`), or sharded across ranks (`ff-fsdp`). The walk calls the trait and knows
//! none of them; none of them knows how the walk computes.

mod error;

pub use error::{WalkError, WalkResult};
pub use ff_model::Part;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use ff_kernels::weight_grads::store_of;
use ff_model::table_grad::TableGrad;
use ff_model::CausalLm;

/// Which half of the walk a part is used in. The head's forward and backward run together and
/// count as backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

/// Which walk over the model is about to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// Forward through every layer, then the head's forward and backward, then backward from
    /// the last layer down to [`BackwardExtent::lowest_layer`] (and the embedding if it trains).
    Train,
    /// Forward through every layer and the head, no gradients.
    Eval,
}

/// How far down backward must go: below the lowest trained layer nothing needs a gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardExtent {
    /// The number of layers when no layer trains.
    pub lowest_layer: usize,
    pub embedding: bool,
}

impl BackwardExtent {
    /// The extent that trained parameters of `parts` need, in a model of `num_layers` layers.
    pub fn of_parts(parts: impl IntoIterator<Item = Part>, num_layers: usize) -> Self {
        let mut extent = Self {
            lowest_layer: num_layers,
            embedding: false,
        };
        for part in parts {
            match part {
                Part::Layer(i) => extent.lowest_layer = extent.lowest_layer.min(i),
                Part::Embed => extent.embedding = true,
                Part::Head => {}
            }
        }
        extent
    }
}

/// What the walk over the model tells whoever manages where parameters live.
pub trait Residency {
    fn backward_extent(&self) -> BackwardExtent;

    /// Called before each walk, which then enters and leaves parts in the order `walk` says.
    fn begin(&mut self, walk: Walk) -> WalkResult<()>;

    /// Called before `part` computes: its parameters must be in the model afterwards.
    fn enter(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> WalkResult<()>;

    /// Gradients of `part`'s tensors from one backward (the head may give several).
    fn add_grads(&mut self, part: Part, grads: &GradStore) -> WalkResult<()>;

    /// The gradient of `table` from `part`'s backward as dense values and rows (the
    /// embedding's rows, on a tied head's gradient or on none). This adds the rows to the dense
    /// values and hands the sum to [`Self::add_grads`]; a residency that sums gradients in
    /// memory adds the dense values first and the rows after, the bits of adding them in two
    /// hand-overs.
    fn add_table_grad(&mut self, part: Part, table: &Var, grad: TableGrad) -> WalkResult<()> {
        let values = grad.into_values(table.elem_count())?;
        let grad = Tensor::from_vec(values, table.shape(), table.device())?;
        self.add_grads(part, &store_of(table.as_tensor(), grad)?)
    }

    /// Called after `part` computed (and, in backward, after its gradients were added).
    fn leave(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> WalkResult<()>;

    /// Called after each walk.
    fn end(&mut self, model: &mut CausalLm) -> WalkResult<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_reaches_the_lowest_trained_layer_and_the_embedding_only_when_it_trains() {
        let parts = [Part::Head, Part::Layer(3), Part::Layer(1), Part::Layer(2)];
        assert_eq!(
            BackwardExtent::of_parts(parts, 4),
            BackwardExtent {
                lowest_layer: 1,
                embedding: false
            }
        );
        assert_eq!(
            BackwardExtent::of_parts([Part::Head, Part::Embed], 4),
            BackwardExtent {
                lowest_layer: 4,
                embedding: true
            }
        );
    }
}
