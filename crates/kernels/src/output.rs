//! What a fused product hands on besides its graph.

use candle_core::Tensor;

/// What a forward hands on besides its graph.
#[derive(Clone, Debug)]
pub enum Output {
    /// The values.
    Values,
    /// Only the node: for a value that nothing reads, in a forward run for its gradients alone
    /// (a checkpointed layer's recomputation). The fused products' backwards read their inputs
    /// and the output's gradient, never the output, so they skip the product and hand on zeros;
    /// a caller without a fused product for its tensors computes the values anyway.
    Unread,
    /// The values an earlier pass computed from the same input, handed on as they are: a
    /// recomputation that kept them skips the product (a caller without a fused product
    /// computes the same values again).
    Kept(Tensor),
}
