//! Fully sharded data parallelism for a plain [`ff_model::CausalLm`].
//!
//! The model is cut into units ([`plan`]): one per decoder layer (or groups of layers, or
//! one for everything) plus a root unit with the embedding and head. Each unit's tensors are
//! flattened into a float32 buffer of trained tensors and a byte buffer of frozen ones
//! ([`layout`]); a rank keeps 1/W of each. The training walk (in `ff-train`) tells the engine
//! when it enters and leaves each part of the model (`ff_walk::Residency`); the engine gathers a unit
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
