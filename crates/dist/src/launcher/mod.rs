//! The torchrun-style launcher: on each node, [`launch`] starts `nproc_per_node` workers with
//! torchrun's variables and supervises them until they all succeed or the job must stop.
//!
//! Node 0's launcher hosts the rendezvous store, so the store outlives any worker. Every
//! node's launcher joins it, and the nodes check that they agree on the layout and the
//! training configuration before any worker starts. When a worker fails (non-zero exit or a
//! signal), its launcher records the failure in the store and stops its other workers; the
//! other nodes' launchers see the record and stop theirs. Every node then returns the same
//! [`LaunchError::WorkerFailed`], whose [`LaunchError::exit_code`] is the failed worker's.
//! SIGINT and SIGTERM are forwarded to the workers. Workers die with the launcher even when
//! it is killed outright: they are started with PR_SET_PDEATHSIG, which Linux ties to the
//! thread that started them, so call [`launch`] from a thread that outlives it (any caller
//! does, since it blocks).

mod error;
mod handshake;
mod records;
mod signals;
mod spec;
mod supervisor;
mod workers;

use std::time::Duration;

pub use error::{LaunchError, WorkerExit, WorkerFailure};
pub use spec::{
    LaunchSpec, DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_STOP_GRACE, RENDEZVOUS_TIMEOUT_VAR,
};

use records::{done_key, node_key, StopCause};
use signals::SignalWatch;
use supervisor::record_stop;

use crate::store::{StoreClient, StoreServer};

/// After a failure, how much longer than the stop grace node 0 keeps the store up for the
/// other nodes to stop their workers and read why.
const FAILURE_LINGER: Duration = Duration::from_secs(10);

/// Runs this node's part of the job described by `spec` and returns when it is over: `Ok`
/// when every worker on every node succeeded.
pub fn launch(spec: &LaunchSpec) -> Result<(), LaunchError> {
    spec.validate()?;
    let server = match spec.node_rank {
        0 => Some(StoreServer::host_master(
            &spec.master_addr,
            spec.master_port.unwrap_or(0),
        )?),
        _ => None,
    };
    let port = match (&server, spec.master_port) {
        (Some(server), _) => server.port(),
        (None, Some(port)) => port,
        (None, None) => {
            return Err(LaunchError::InvalidSpec(
                "MASTER_PORT is needed to reach node 0's store; set it on every node".into(),
            ))
        }
    };
    let store = StoreClient::connect(&spec.master_addr, port, spec.rendezvous_timeout)?;
    let result = run(spec, &store, port);
    let finished = finish(spec, &store, result.is_ok());
    // The server (node 0) closes only now, after the other nodes are done with it.
    drop(server);
    result.and(finished)
}

/// The node check, then the workers' whole life.
fn run(spec: &LaunchSpec, store: &StoreClient, port: u16) -> Result<(), LaunchError> {
    handshake::agree(store, spec)?;
    let signals = SignalWatch::start().map_err(|e| LaunchError::NodeFailed {
        node_rank: spec.node_rank,
        message: format!("could not watch for SIGINT and SIGTERM: {e}"),
    })?;
    let mut workers = workers::spawn_all(spec, port).inspect_err(|error| {
        record_stop(
            store,
            StopCause::NodeError {
                node_rank: spec.node_rank,
                message: error.to_string(),
            },
        );
    })?;
    supervisor::supervise(spec, store, &mut workers, &signals)
}

/// Tells the other nodes this one is done; node 0 then waits for the others before its store
/// closes: for as long as the rendezvous allows after a success, briefly after a failure.
fn finish(spec: &LaunchSpec, store: &StoreClient, succeeded: bool) -> Result<(), LaunchError> {
    let _ = store.set(&done_key(spec.node_rank), b"");
    if spec.node_rank != 0 {
        return Ok(());
    }
    // Only nodes that joined will say they are done.
    let mut joined = Vec::new();
    for node in 1..spec.nnodes {
        if matches!(store.try_get(&node_key(node)), Ok(Some(_))) {
            joined.push(node);
        }
    }
    let limit = if succeeded {
        spec.rendezvous_timeout
    } else {
        spec.stop_grace.saturating_add(FAILURE_LINGER)
    };
    let keys: Vec<String> = joined.iter().map(|&n| done_key(n)).collect();
    match store.wait(&keys, limit) {
        Ok(()) => Ok(()),
        Err(_) if !succeeded => Ok(()),
        Err(_) => {
            let nodes = joined
                .into_iter()
                .filter(|&n| !matches!(store.try_get(&done_key(n)), Ok(Some(_))))
                .collect();
            Err(LaunchError::NodesUnfinished {
                nodes,
                waited: limit,
            })
        }
    }
}
