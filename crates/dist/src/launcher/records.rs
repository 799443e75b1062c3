//! What launchers tell each other through the store, and under which keys.

use super::error::{WorkerExit, WorkerFailure};
use crate::wire::{DecodeError, Decoder, Encoder};

/// A node's launch settings, which every node must share.
pub(crate) fn node_key(node_rank: usize) -> String {
    format!("launcher/node/{node_rank}")
}

/// Node 0's verdict on the nodes: empty when they agree, else the error every node reports.
pub(crate) const VERDICT_KEY: &str = "launcher/verdict";

/// Why the job stops early; the first node to set it wins.
pub(crate) const STOP_KEY: &str = "launcher/stop";

/// Set by each node once all its workers are gone, so node 0 keeps the store up until then.
pub(crate) fn done_key(node_rank: usize) -> String {
    format!("launcher/done/{node_rank}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodeInfo {
    pub(crate) nnodes: usize,
    pub(crate) nproc_per_node: usize,
    pub(crate) config_hash: String,
}

impl NodeInfo {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Encoder::new()
            .u64(self.nnodes as u64)
            .u64(self.nproc_per_node as u64)
            .str(&self.config_hash)
            .finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let info = NodeInfo {
            nnodes: d.u64()? as usize,
            nproc_per_node: d.u64()? as usize,
            config_hash: d.string()?,
        };
        d.finish()?;
        Ok(info)
    }

    /// How `other` (node `node_rank`) differs from node 0's settings (`self`), one sentence
    /// per difference, naming the node and the fix.
    pub(crate) fn differences(&self, node_rank: usize, other: &NodeInfo) -> Vec<String> {
        let mut found = Vec::new();
        let world = |info: &NodeInfo| info.nnodes * info.nproc_per_node;
        if other.nnodes != self.nnodes {
            found.push(format!(
                "node {node_rank} was started with NNODES={} (world size {}) but node 0 with NNODES={} (world size {}); start every node with the same NNODES",
                other.nnodes, world(other), self.nnodes, world(self)
            ));
        }
        if other.nproc_per_node != self.nproc_per_node {
            found.push(format!(
                "node {node_rank} was started with NPROC_PER_NODE={} (world size {}) but node 0 with NPROC_PER_NODE={} (world size {}); start every node with the same NPROC_PER_NODE",
                other.nproc_per_node, world(other), self.nproc_per_node, world(self)
            ));
        }
        if other.config_hash != self.config_hash {
            found.push(format!(
                "node {node_rank}'s training configuration differs from node 0's (hash {} vs {}); run every node with the same configuration file and overrides",
                short(&other.config_hash),
                short(&self.config_hash)
            ));
        }
        found
    }
}

fn short(hash: &str) -> String {
    if hash.is_empty() {
        "none".into()
    } else {
        hash.chars().take(12).collect()
    }
}

/// Why the job stopped early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StopCause {
    Worker(WorkerFailure),
    Signal { node_rank: usize, signal: i32 },
    NodeError { node_rank: usize, message: String },
}

impl StopCause {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        match self {
            StopCause::Worker(f) => {
                let (kind, value) = match f.exit {
                    WorkerExit::Code(code) => (0, code),
                    WorkerExit::Signal(signal) => (1, signal),
                };
                e.u8(1)
                    .u64(f.rank as u64)
                    .u64(f.node_rank as u64)
                    .u64(f.local_rank as u64)
                    .u8(kind)
                    .i64(i64::from(value))
            }
            StopCause::Signal { node_rank, signal } => {
                e.u8(2).u64(*node_rank as u64).i64(i64::from(*signal))
            }
            StopCause::NodeError { node_rank, message } => {
                e.u8(3).u64(*node_rank as u64).str(message)
            }
        };
        e.finish()
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut d = Decoder::new(bytes);
        let int = |value: i64| {
            i32::try_from(value).map_err(|_| DecodeError(format!("{value} is not a 32-bit code")))
        };
        let cause = match d.u8()? {
            1 => {
                let rank = d.u64()? as usize;
                let node_rank = d.u64()? as usize;
                let local_rank = d.u64()? as usize;
                let exit = match (d.u8()?, int(d.i64()?)?) {
                    (0, code) => WorkerExit::Code(code),
                    (1, signal) => WorkerExit::Signal(signal),
                    (kind, _) => return Err(DecodeError(format!("unknown exit kind {kind}"))),
                };
                StopCause::Worker(WorkerFailure {
                    rank,
                    node_rank,
                    local_rank,
                    exit,
                })
            }
            2 => StopCause::Signal {
                node_rank: d.u64()? as usize,
                signal: int(d.i64()?)?,
            },
            3 => StopCause::NodeError {
                node_rank: d.u64()? as usize,
                message: d.string()?,
            },
            kind => return Err(DecodeError(format!("unknown stop cause {kind}"))),
        };
        d.finish()?;
        Ok(cause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let info = NodeInfo {
            nnodes: 2,
            nproc_per_node: 8,
            config_hash: "abc".into(),
        };
        assert_eq!(NodeInfo::decode(&info.encode()).unwrap(), info);
        for cause in [
            StopCause::Worker(WorkerFailure {
                rank: 9,
                node_rank: 1,
                local_rank: 1,
                exit: WorkerExit::Signal(9),
            }),
            StopCause::Signal {
                node_rank: 1,
                signal: 2,
            },
            StopCause::NodeError {
                node_rank: 0,
                message: "x".into(),
            },
        ] {
            assert_eq!(StopCause::decode(&cause.encode()).unwrap(), cause);
        }
    }

    #[test]
    fn differences_name_the_node_and_each_setting() {
        let node0 = NodeInfo {
            nnodes: 2,
            nproc_per_node: 2,
            config_hash: "aaaa".into(),
        };
        let node1 = NodeInfo {
            nnodes: 2,
            nproc_per_node: 3,
            config_hash: "bbbb".into(),
        };
        let found = node0.differences(1, &node1);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0], "node 1 was started with NPROC_PER_NODE=3 (world size 6) but node 0 with NPROC_PER_NODE=2 (world size 4); start every node with the same NPROC_PER_NODE");
        assert!(found[1].starts_with(
            "node 1's training configuration differs from node 0's (hash bbbb vs aaaa)"
        ));
        assert!(node0.differences(1, &node0).is_empty());
    }
}
