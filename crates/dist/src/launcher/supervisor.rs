//! Watching the workers until they all succeed or the job must stop: a worker failed here, a
//! signal arrived, or another node reported a stop through the store. The first stop cause
//! recorded in the store is the one every node reports.

use std::thread;
use std::time::{Duration, Instant};

use super::error::{LaunchError, WorkerFailure};
use super::records::{StopCause, STOP_KEY};
use super::signals::SignalWatch;
use super::spec::LaunchSpec;
use super::workers::{failure_of, stop_all, Worker};
use crate::store::{CompareSet, StoreClient};

const POLL: Duration = Duration::from_millis(20);

/// How often the store is asked whether another node stopped the job.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Records `cause` as the job's stop cause unless one is recorded already, and returns the
/// recorded one. Without the store (it is gone), this node's own cause is all there is.
pub(crate) fn record_stop(store: &StoreClient, cause: StopCause) -> StopCause {
    match store.compare_set(STOP_KEY, None, &cause.encode()) {
        Ok(CompareSet::Mismatch {
            current: Some(first),
        }) => StopCause::decode(&first).unwrap_or(cause),
        _ => cause,
    }
}

/// The error this node reports for a stop cause.
fn error_for(cause: StopCause, this_node: usize) -> LaunchError {
    match cause {
        StopCause::Worker(failure) => LaunchError::WorkerFailed(failure),
        StopCause::Signal { node_rank, signal } if node_rank == this_node => {
            LaunchError::Interrupted { signal }
        }
        StopCause::Signal { node_rank, signal } => {
            LaunchError::NodeInterrupted { node_rank, signal }
        }
        StopCause::NodeError { node_rank, message } => {
            LaunchError::NodeFailed { node_rank, message }
        }
    }
}

enum Event {
    AllSucceeded,
    Failed(WorkerFailure),
    Signal(i32),
    RemoteStop(StopCause),
    StoreLost(crate::store::StoreError),
}

/// Runs until every worker has exited with success (`Ok`) or the job stopped; in the latter
/// case every worker of this node has been stopped and reaped before it returns.
pub(crate) fn supervise(
    spec: &LaunchSpec,
    store: &StoreClient,
    workers: &mut [Worker],
    signals: &SignalWatch,
) -> Result<(), LaunchError> {
    let event = watch(spec, store, workers, signals);
    let cause = match event {
        Event::AllSucceeded => return Ok(()),
        Event::Signal(signal) => {
            // Forward the signal itself, as torchrun does; the recorded cause tells the other
            // nodes why the job ends.
            record_stop(
                store,
                StopCause::Signal {
                    node_rank: spec.node_rank,
                    signal,
                },
            );
            stop_all(workers, signal, spec.stop_grace);
            return Err(LaunchError::Interrupted { signal });
        }
        Event::Failed(failure) => record_stop(store, StopCause::Worker(failure)),
        Event::RemoteStop(cause) => cause,
        Event::StoreLost(error) => {
            stop_all(workers, libc::SIGTERM, spec.stop_grace);
            return Err(LaunchError::StoreLost(error));
        }
    };
    stop_all(workers, libc::SIGTERM, spec.stop_grace);
    Err(error_for(cause, spec.node_rank))
}

fn watch(
    spec: &LaunchSpec,
    store: &StoreClient,
    workers: &mut [Worker],
    signals: &SignalWatch,
) -> Event {
    let mut last_check = Instant::now();
    loop {
        if let Some(signal) = signals.received() {
            return Event::Signal(signal);
        }
        let mut running = false;
        for worker in workers.iter_mut() {
            match worker.poll() {
                Ok(None) => running = true,
                Ok(Some(status)) => {
                    if let Some(exit) = failure_of(status) {
                        return Event::Failed(WorkerFailure {
                            rank: worker.rank,
                            node_rank: spec.node_rank,
                            local_rank: worker.local_rank,
                            exit,
                        });
                    }
                }
                Err(error) => {
                    return Event::RemoteStop(StopCause::NodeError {
                        node_rank: spec.node_rank,
                        message: format!("could not check on rank {}: {error}", worker.rank),
                    })
                }
            }
        }
        if !running {
            return Event::AllSucceeded;
        }
        if last_check.elapsed() >= STOP_CHECK_INTERVAL {
            last_check = Instant::now();
            match store.try_get(STOP_KEY) {
                Ok(None) => {}
                Ok(Some(bytes)) => {
                    let cause = StopCause::decode(&bytes).unwrap_or_else(|e| StopCause::NodeError {
                        node_rank: 0,
                        message: format!("another node stopped the job with a record this launcher cannot read ({e})"),
                    });
                    return Event::RemoteStop(cause);
                }
                Err(error) => return Event::StoreLost(error),
            }
        }
        thread::sleep(POLL);
    }
}
