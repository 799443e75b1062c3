//! Watching the workers until they all succeed or the job must stop: a worker failed here, a
//! signal arrived, or another node reported a stop through the store. The first stop cause
//! recorded in the store is the one every node reports.
//!
//! When one worker dies, its peers fail their next collective and exit with an error a moment
//! later, so the launchers take care to report the death and not its echoes: of the workers
//! found failed together, one killed by a signal is the cause; and a worker that exited with
//! an error is recorded as the cause only after other nodes have had a moment to record theirs.

use std::thread;
use std::time::{Duration, Instant};

use super::error::{LaunchError, WorkerExit, WorkerFailure};
use super::records::{StopCause, STOP_KEY};
use super::signals::SignalWatch;
use super::spec::LaunchSpec;
use super::workers::{failure_of, stop_all, Worker};
use crate::store::{CompareSet, StoreClient};

const POLL: Duration = Duration::from_millis(20);

/// How often the store is asked whether another node stopped the job.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// How long a worker's error exit waits for another node to record a cause first: far more
/// than a launcher takes to notice a dead worker (one poll) and record it (one store call).
const ECHO_WINDOW: Duration = Duration::from_millis(500);

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
        Event::Failed(failure) => match failure.exit {
            WorkerExit::Code(_) if spec.nnodes > 1 => match await_remote_stop(store, ECHO_WINDOW) {
                Some(cause) => cause,
                None => record_stop(store, StopCause::Worker(failure)),
            },
            _ => record_stop(store, StopCause::Worker(failure)),
        },
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
        let mut failures = Vec::new();
        for worker in workers.iter_mut() {
            match worker.poll() {
                Ok(None) => running = true,
                Ok(Some(status)) => {
                    if let Some(exit) = failure_of(status) {
                        failures.push(WorkerFailure {
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
        if let Some(failure) = likeliest_cause(&failures) {
            return Event::Failed(failure);
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

/// Of the workers found failed in one pass, the one that most likely failed first: one killed
/// by a signal (a kill, the OOM killer, a crash), since the others' errors are then its echoes;
/// else the lowest rank.
fn likeliest_cause(failures: &[WorkerFailure]) -> Option<WorkerFailure> {
    failures
        .iter()
        .find(|f| matches!(f.exit, WorkerExit::Signal(_)))
        .or(failures.first())
        .copied()
}

/// The stop cause another node records within `window`, if any.
fn await_remote_stop(store: &StoreClient, window: Duration) -> Option<StopCause> {
    let start = Instant::now();
    loop {
        if let Ok(Some(bytes)) = store.try_get(STOP_KEY) {
            return StopCause::decode(&bytes).ok();
        }
        if start.elapsed() >= window {
            return None;
        }
        thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(rank: usize, exit: WorkerExit) -> WorkerFailure {
        WorkerFailure {
            rank,
            node_rank: 0,
            local_rank: rank,
            exit,
        }
    }

    #[test]
    fn a_signal_death_is_the_cause_of_errors_found_with_it() {
        let error = failure(0, WorkerExit::Code(1));
        let killed = failure(1, WorkerExit::Signal(libc::SIGKILL));
        assert_eq!(likeliest_cause(&[error, killed]), Some(killed));
        let other = failure(2, WorkerExit::Code(3));
        assert_eq!(likeliest_cause(&[error, other]), Some(error));
        assert_eq!(likeliest_cause(&[]), None);
    }
}
