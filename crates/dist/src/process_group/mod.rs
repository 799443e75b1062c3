//! The [`ProcessGroup`] trait: the collectives the training code calls, whatever carries them.
//!
//! Implementations: [`GlooProcessGroup`] (CPU, over TCP) and [`SingleProcessGroup`] (one
//! process, no sockets). [`crate::init_from_env`] picks one from torchrun's variables, so the
//! training loop holds a `Box<dyn ProcessGroup>` and never names a backend.
//!
//! Every collective is blocking and must be called by every rank of the group, in the same
//! order, with the same lengths. A failed collective (a peer died, a timeout passed) leaves
//! the group broken: later calls fail at once with [`DistError::Broken`] and the process
//! should exit, which makes its launcher stop the job.
//!
//! # Where NCCL goes
//!
//! A CUDA backend slots in beside Gloo without changing callers of this trait:
//! - `init_from_env` chooses it when the workers have devices; it bootstraps from the same
//!   store (rank 0 puts the `ncclUniqueId` under the group's key prefix, the others get it),
//!   and `subgroup` does the same per sub-group.
//! - The host-buffer methods here keep their meaning (NCCL's implementation stages through
//!   device memory), so code that reduces a few host scalars (loss sums, token counts) works
//!   on both backends.
//! - Device-resident buffers and asynchronous completion come as an extension trait reached
//!   through a new provided method on this trait (returning `None` for CPU groups) whose
//!   collectives take device buffers and return a work handle with `wait()`. FSDP uses it
//!   when present and these blocking host methods otherwise.

mod gloo;
mod single;

pub use gloo::{GlooOptions, GlooProcessGroup, GlooTransport};
pub use single::SingleProcessGroup;

use crate::env_error::EnvError;
use crate::store::StoreError;

/// A set of processes that run collectives together. Ranks are `0..world_size()`.
pub trait ProcessGroup: Send + Sync {
    /// This process's rank in the group.
    fn rank(&self) -> usize;

    /// How many processes the group has.
    fn world_size(&self) -> usize;

    /// A short name of the implementation ("gloo", "single") for logs.
    fn backend(&self) -> &'static str;

    /// Replaces `data` on every rank with the element-wise sum over ranks.
    fn all_reduce_sum(&self, data: &mut [f32]) -> Result<(), DistError>;

    /// [`ProcessGroup::all_reduce_sum`] in double precision, for sums that must not lose
    /// digits (loss totals, token counts).
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> Result<(), DistError>;

    /// Sums `input` over ranks and leaves rank r's share of the sum, elements
    /// `r * output.len() .. (r + 1) * output.len()`, in `output`. `input` holds
    /// `world_size() * output.len()` elements.
    fn reduce_scatter_sum(&self, input: &[f32], output: &mut [f32]) -> Result<(), DistError>;

    /// Concatenates every rank's `input`, in rank order, into `output` on every rank.
    /// `output` holds `world_size() * input.len()` bytes. Any plain data (bf16, u8, ...)
    /// travels as its bytes.
    fn all_gather_bytes(&self, input: &[u8], output: &mut [u8]) -> Result<(), DistError>;

    /// Copies `data` from rank `root` into `data` on every other rank.
    fn broadcast_bytes(&self, data: &mut [u8], root: usize) -> Result<(), DistError>;

    /// Returns once every rank has entered it.
    fn barrier(&self) -> Result<(), DistError>;

    /// Creates the group of `members` (ranks of this group, listed in the same order by every
    /// member) named `name`; this process must be a member, and only members call it, each
    /// with the same name and members. The new group's ranks follow the order of `members`.
    /// Examples: HYBRID_SHARD's group of the ranks on one node, and its group of the ranks
    /// with the same local rank across nodes (see [`crate::WorkerEnv::intra_node_ranks`]).
    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn ProcessGroup>, DistError>;

    /// Replaces `data` with the element-wise mean over ranks.
    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<(), DistError> {
        self.all_reduce_sum(data)?;
        let n = self.world_size() as f32;
        for x in data.iter_mut() {
            *x /= n;
        }
        Ok(())
    }

    /// [`ProcessGroup::all_gather_bytes`] for f32 elements.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), DistError> {
        check_len(
            "all_gather",
            "output",
            output.len(),
            self.world_size() * input.len(),
            "world size × input length",
        )?;
        self.all_gather_bytes(
            bytemuck::cast_slice(input),
            bytemuck::cast_slice_mut(output),
        )
    }

    /// [`ProcessGroup::broadcast_bytes`] for f32 elements.
    fn broadcast(&self, data: &mut [f32], root: usize) -> Result<(), DistError> {
        self.broadcast_bytes(bytemuck::cast_slice_mut(data), root)
    }

    /// Broadcasts a byte string whose length only `root` knows (a config hash, serialized
    /// state): returns root's `data` on every rank. Non-root ranks' `data` is ignored.
    fn broadcast_blob(&self, data: &[u8], root: usize) -> Result<Vec<u8>, DistError> {
        let mut len = (data.len() as u64).to_le_bytes();
        self.broadcast_bytes(&mut len, root)?;
        // Root's own length, so it fits this (same-architecture) machine's usize.
        let len = u64::from_le_bytes(len) as usize;
        let mut blob = if self.rank() == root {
            data.to_vec()
        } else {
            vec![0u8; len]
        };
        self.broadcast_bytes(&mut blob, root)?;
        Ok(blob)
    }
}

/// What can go wrong creating or using a process group.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(transparent)]
    Env(#[from] EnvError),

    #[error("rank {rank} of {size} could not join process group '{group}': {message}")]
    Connect {
        group: String,
        rank: usize,
        size: usize,
        message: String,
    },

    #[error(
        "{op} failed on rank {rank} of {size} in process group '{group}'{}",
        collective_cause(*peer_rank, message)
    )]
    Collective {
        op: &'static str,
        group: String,
        rank: usize,
        size: usize,
        /// The peer whose connection failed, when Gloo's message names it.
        peer_rank: Option<usize>,
        message: String,
    },

    #[error("{op} cannot run: process group '{group}' has been broken since {failed_op} failed ({message}); stop this process and restart the job")]
    Broken {
        op: &'static str,
        group: String,
        failed_op: &'static str,
        message: String,
    },

    #[error("{op}'s {buffer} has {actual} elements but must have {expected} ({rule})")]
    BufferSize {
        op: &'static str,
        buffer: &'static str,
        actual: usize,
        expected: usize,
        rule: &'static str,
    },

    #[error("{op} root {root} is not a rank of this group of {size}; pick a root below {size}")]
    InvalidRoot {
        op: &'static str,
        root: usize,
        size: usize,
    },

    #[error("cannot create sub-group '{name}': {reason}")]
    InvalidSubgroup { name: String, reason: String },
}

fn collective_cause(peer_rank: Option<usize>, message: &str) -> String {
    match peer_rank {
        Some(peer) => format!(
            ": the connection to rank {peer} failed (Gloo: {message}); rank {peer} has probably stopped, see its output"
        ),
        None => format!(
            " (Gloo: {message}); another rank has probably failed or is stuck, see the other ranks' output"
        ),
    }
}

pub(crate) fn check_len(
    op: &'static str,
    buffer: &'static str,
    actual: usize,
    expected: usize,
    rule: &'static str,
) -> Result<(), DistError> {
    if actual == expected {
        Ok(())
    } else {
        Err(DistError::BufferSize {
            op,
            buffer,
            actual,
            expected,
            rule,
        })
    }
}

pub(crate) fn check_root(op: &'static str, root: usize, size: usize) -> Result<(), DistError> {
    if root < size {
        Ok(())
    } else {
        Err(DistError::InvalidRoot { op, root, size })
    }
}

/// Checks a sub-group request and returns this process's rank in the new group.
pub(crate) fn subgroup_rank(
    name: &str,
    members: &[usize],
    rank: usize,
    size: usize,
) -> Result<usize, DistError> {
    let invalid = |reason: String| DistError::InvalidSubgroup {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() || name.contains('/') {
        return Err(invalid(
            "its name must be non-empty and contain no '/'".into(),
        ));
    }
    if let Some(bad) = members.iter().find(|&&m| m >= size) {
        return Err(invalid(format!(
            "rank {bad} is not in the parent group of {size}; list ranks below {size}"
        )));
    }
    let mut seen = vec![false; size];
    for &m in members {
        if std::mem::replace(&mut seen[m], true) {
            return Err(invalid(format!(
                "rank {m} is listed twice; list each member once"
            )));
        }
    }
    members.iter().position(|&m| m == rank).ok_or_else(|| {
        invalid(format!(
            "this process (rank {rank}) is not among its members {members:?}; only members create a sub-group"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subgroup_rank_follows_member_order_and_rejects_bad_lists() {
        assert_eq!(subgroup_rank("inter", &[3, 1], 1, 4).unwrap(), 1);
        assert_eq!(subgroup_rank("inter", &[3, 1], 3, 4).unwrap(), 0);
        let not_member = subgroup_rank("g", &[0, 2], 1, 4).unwrap_err().to_string();
        assert!(not_member.contains("rank 1) is not among"), "{not_member}");
        let twice = subgroup_rank("g", &[1, 1], 1, 4).unwrap_err().to_string();
        assert!(twice.contains("listed twice"), "{twice}");
        let outside = subgroup_rank("g", &[1, 4], 1, 4).unwrap_err().to_string();
        assert!(
            outside.contains("rank 4 is not in the parent group of 4"),
            "{outside}"
        );
        assert!(subgroup_rank("a/b", &[1], 1, 4).is_err());
    }

    #[test]
    fn collective_errors_name_the_peer_when_known() {
        let err = DistError::Collective {
            op: "all_reduce",
            group: "world".into(),
            rank: 0,
            size: 3,
            peer_rank: Some(2),
            message: "Connection closed by peer [127.0.0.1]:1".into(),
        };
        let text = err.to_string();
        assert!(text.starts_with("all_reduce failed on rank 0 of 3 in process group 'world': the connection to rank 2 failed"), "{text}");
    }
}
