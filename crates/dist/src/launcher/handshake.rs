//! The node check: every node's launcher registers its settings in the store; node 0 compares
//! them with its own and publishes one verdict, so every node reports the same error naming
//! the node that differs (or a node that never came).

use std::time::Duration;

use super::error::LaunchError;
use super::records::{node_key, NodeInfo, VERDICT_KEY};
use super::spec::LaunchSpec;
use crate::store::{CompareSet, StoreClient, StoreError};

/// Extra time the other nodes wait for node 0's verdict, which node 0 may publish only when
/// its own wait for them ends.
const VERDICT_MARGIN: Duration = Duration::from_secs(15);

/// Returns once all nodes have joined with the same settings.
pub(crate) fn agree(store: &StoreClient, spec: &LaunchSpec) -> Result<(), LaunchError> {
    let mine = NodeInfo {
        nnodes: spec.nnodes,
        nproc_per_node: spec.nproc_per_node,
        config_hash: spec.config_hash.clone(),
    };
    if let CompareSet::Mismatch { .. } =
        store.compare_set(&node_key(spec.node_rank), None, &mine.encode())?
    {
        return Err(LaunchError::NodeRankTaken {
            node_rank: spec.node_rank,
        });
    }
    if spec.node_rank == 0 {
        judge(store, spec, &mine)
    } else {
        await_verdict(store, spec)
    }
}

/// Node 0: waits for the other nodes, compares, and publishes the verdict.
fn judge(store: &StoreClient, spec: &LaunchSpec, mine: &NodeInfo) -> Result<(), LaunchError> {
    let others: Vec<String> = (1..spec.nnodes).map(node_key).collect();
    match store.wait(&others, spec.rendezvous_timeout) {
        Ok(()) => {}
        Err(StoreError::Timeout { waited, .. }) => {
            let mut missing = Vec::new();
            for node in 1..spec.nnodes {
                if store.try_get(&node_key(node))?.is_none() {
                    missing.push(node);
                }
            }
            let error = LaunchError::NodesMissing {
                missing,
                addr: spec.master_addr.clone(),
                port: store.port(),
                waited,
            };
            store.set(VERDICT_KEY, error.to_string().as_bytes())?;
            return Err(error);
        }
        Err(other) => return Err(other.into()),
    }
    let mut problems = Vec::new();
    for node in 1..spec.nnodes {
        let bytes = store.get(&node_key(node), spec.rendezvous_timeout)?;
        match NodeInfo::decode(&bytes) {
            Ok(info) => problems.extend(mine.differences(node, &info)),
            Err(e) => problems.push(format!(
                "node {node} registered settings this launcher cannot read ({e}); run the same ferrofactory version on every node"
            )),
        }
    }
    let verdict = problems.join("; also, ");
    store.set(VERDICT_KEY, verdict.as_bytes())?;
    if verdict.is_empty() {
        Ok(())
    } else {
        Err(LaunchError::NodeMismatch(verdict))
    }
}

/// Any other node: waits for node 0's verdict.
fn await_verdict(store: &StoreClient, spec: &LaunchSpec) -> Result<(), LaunchError> {
    // Node 0 waits only for the nodes its own NNODES counts; a node beyond them would wait
    // for a verdict that ignores it.
    let node0 = store.get(&node_key(0), spec.rendezvous_timeout)?;
    if let Ok(node0) = NodeInfo::decode(&node0) {
        if spec.node_rank >= node0.nnodes {
            return Err(LaunchError::NodeOutOfRange {
                node_rank: spec.node_rank,
                nnodes: node0.nnodes,
            });
        }
    }
    let verdict = store.get(
        VERDICT_KEY,
        spec.rendezvous_timeout.saturating_add(VERDICT_MARGIN),
    )?;
    if verdict.is_empty() {
        Ok(())
    } else {
        Err(LaunchError::NodeMismatch(
            String::from_utf8_lossy(&verdict).into_owned(),
        ))
    }
}
