//! Fully sharded data parallelism for a plain [`ff_model::CausalLm`].
//!
//! The model is cut into units ([`plan`]): one per decoder layer (or groups of layers, or
//! one for everything) plus a root unit with the embedding and head. Each unit's tensors are
//! flattened into a float32 buffer of trained tensors and a byte buffer of frozen ones
//! ([`layout`]); a rank keeps 1/W of each. The training walk (in `ff-train`) tells the engine
//! when it enters and leaves each part of the model ([`Residency`]); the engine gathers a unit
//! just before use — or has it gathered already on its communication thread — puts its tensors
//! into the model's slots, empties them after use, and reduce-scatters the unit's gradients
//! after its backward (on that thread, while the backward goes on) so that each rank keeps the
//! gradient of its own shard. The optimizer then updates only the rank's pieces.
//!
//! NO_SHARD is plain data parallelism and does not come here: the training loop's replicated
//! path is that engine.

mod comm_thread;
pub mod error;
mod gathered;
pub mod layout;
mod peer_shards;
pub mod plan;
pub mod sharded;
pub mod slots;

pub use error::{FsdpError, FsdpResult};
pub use sharded::{Accounting, Sharded, ShardedSetup};
pub use slots::Part;

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

/// What the walk over the model tells whoever manages where parameters live.
pub trait Residency {
    fn backward_extent(&self) -> BackwardExtent;

    /// Called before each walk, which then enters and leaves parts in the order `walk` says.
    fn begin(&mut self, walk: Walk) -> FsdpResult<()>;

    /// Called before `part` computes: its parameters must be in the model afterwards.
    fn enter(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> FsdpResult<()>;

    /// Gradients of `part`'s tensors from one backward (the head may give several).
    fn add_grads(&mut self, part: Part, grads: &GradStore) -> FsdpResult<()>;

    /// The gradient of `table` from `part`'s backward as dense values and rows (the
    /// embedding's rows, on a tied head's gradient or on none). This adds the rows to the dense
    /// values and hands the sum to [`Self::add_grads`]; an engine that sums gradients in memory
    /// adds the dense values first and the rows after, the bits of adding them in two
    /// hand-overs.
    fn add_table_grad(&mut self, part: Part, table: &Var, grad: TableGrad) -> FsdpResult<()> {
        let values = grad.into_values(table.elem_count())?;
        let grad = Tensor::from_vec(values, table.shape(), table.device())?;
        self.add_grads(part, &store_of(table.as_tensor(), grad)?)
    }

    /// Called after `part` computed (and, in backward, after its gradients were added).
    fn leave(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> FsdpResult<()>;

    /// Called after each walk.
    fn end(&mut self, model: &mut CausalLm) -> FsdpResult<()>;
}
