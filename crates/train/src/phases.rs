//! Where a step's time goes, phase by phase, for the benchmark's profile.

use std::time::{Duration, Instant};

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
pub(crate) fn lap(clock: &mut Instant) -> Duration {
    let now = Instant::now();
    let elapsed = now - *clock;
    *clock = now;
    elapsed
}
