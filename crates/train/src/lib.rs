//! The training loop: micro-batches, loss, backward, clipping, optimizer step and schedule.
