//! The order in which examples are visited, and how each optimizer step's examples are split.
//!
//! The order is a seeded shuffle per epoch (not torch's generator, so not the same order as
//! Hugging Face Trainer). A step's global batch is `world_size × per_device_batch ×
//! accumulation` examples in that order; each rank takes its own contiguous slice of every
//! micro-batch, so the examples of a step do not depend on how many processes share it.

use ff_model::dropout::derive_seed;

/// Indices `0..n` shuffled by a Fisher-Yates pass driven by `seed` and `epoch`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = derive_seed(seed, 0xE90C + epoch);
    for i in (1..n).rev() {
        state = derive_seed(state, i as u64);
        let j = (state % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Layout of an epoch in optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochPlan {
    /// Examples per global micro-batch (all ranks together).
    pub global_micro_batch: usize,
    pub micro_batches_per_epoch: usize,
    pub accumulation: usize,
}

impl EpochPlan {
    pub fn new(
        num_examples: usize,
        per_device_batch: usize,
        world_size: usize,
        accumulation: usize,
    ) -> Self {
        let global_micro_batch = per_device_batch * world_size;
        Self {
            global_micro_batch,
            micro_batches_per_epoch: num_examples.div_ceil(global_micro_batch),
            accumulation,
        }
    }

    /// Optimizer steps per epoch; a last incomplete accumulation still makes a step.
    pub fn steps_per_epoch(&self) -> usize {
        self.micro_batches_per_epoch
            .div_ceil(self.accumulation)
            .max(1)
    }

    /// The micro-batches (ranges of positions in the epoch order) of step `step_in_epoch`.
    pub fn step_micro_batches(
        &self,
        step_in_epoch: usize,
        num_examples: usize,
    ) -> Vec<std::ops::Range<usize>> {
        let first = step_in_epoch * self.accumulation;
        let last = (first + self.accumulation).min(self.micro_batches_per_epoch);
        (first..last)
            .map(|m| {
                let start = m * self.global_micro_batch;
                start..(start + self.global_micro_batch).min(num_examples)
            })
            .collect()
    }
}

/// This rank's share of one global micro-batch: a contiguous slice, as even as possible.
pub fn rank_slice(
    range: std::ops::Range<usize>,
    rank: usize,
    world_size: usize,
) -> std::ops::Range<usize> {
    let len = range.len();
    let base = len / world_size;
    let extra = len % world_size;
    let start = range.start + rank * base + rank.min(extra);
    let size = base + usize::from(rank < extra);
    start..start + size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_a_seeded_permutation() {
        let a = epoch_order(100, 42, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 42, 0));
        assert_ne!(a, epoch_order(100, 42, 1));
        assert_ne!(a, epoch_order(100, 43, 0));
    }

    #[test]
    fn steps_cover_the_epoch() {
        let plan = EpochPlan::new(10, 2, 1, 2);
        assert_eq!(plan.micro_batches_per_epoch, 5);
        assert_eq!(plan.steps_per_epoch(), 3);
        assert_eq!(plan.step_micro_batches(2, 10), vec![8..10]);
        assert_eq!(plan.step_micro_batches(0, 10), vec![0..2, 2..4]);
    }

    #[test]
    fn rank_slices_partition_a_micro_batch() {
        assert_eq!(rank_slice(8..16, 0, 2), 8..12);
        assert_eq!(rank_slice(8..16, 1, 2), 12..16);
        assert_eq!(rank_slice(0..3, 0, 2), 0..2);
        assert_eq!(rank_slice(0..3, 1, 2), 2..3);
    }
}
