use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::duration_text::duration_text;
use crate::env_error::EnvError;
use crate::store::StoreError;

/// How a worker process ended, when it did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this non-zero code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl WorkerExit {
    /// The exit code a shell would report for it: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            WorkerExit::Code(code) => code,
            WorkerExit::Signal(signal) => 128 + signal,
        }
    }
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerExit::Code(code) => write!(f, "exited with code {code}"),
            WorkerExit::Signal(signal) => write!(f, "was killed by {}", signal_name(*signal)),
        }
    }
}

/// The first worker of the job that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerFailure {
    /// Global rank.
    pub rank: usize,
    pub node_rank: usize,
    pub local_rank: usize,
    pub exit: WorkerExit,
}

/// "SIGTERM (signal 15)", or the bare number for signals without a common name.
pub(crate) fn signal_name(signal: i32) -> String {
    let name = match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {signal}"),
    };
    format!("{name} (signal {signal})")
}

fn node_list(nodes: &[usize]) -> String {
    let names: Vec<String> = nodes.iter().map(usize::to_string).collect();
    match nodes.len() {
        1 => format!("node {}", names[0]),
        _ => format!("nodes {}", names.join(", ")),
    }
}

/// Why a launch failed. [`LaunchError::exit_code`] is the code the launching command should
/// exit with.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Env(#[from] EnvError),

    #[error("{0}")]
    InvalidSpec(String),

    #[error(transparent)]
    Store(#[from] StoreError),

    #[error(
        "another launcher already joined as node {node_rank}; give each node a different NODE_RANK"
    )]
    NodeRankTaken { node_rank: usize },

    #[error("this node's NODE_RANK {node_rank} is not below NNODES {nnodes}, which node 0 was started with; number the nodes 0 to {}", nnodes.saturating_sub(1))]
    NodeOutOfRange { node_rank: usize, nnodes: usize },

    #[error(
        "{} did not join the rendezvous at {addr}:{port} within {}; start every node with the same MASTER_ADDR and MASTER_PORT",
        node_list(missing),
        duration_text(*waited)
    )]
    NodesMissing {
        missing: Vec<usize>,
        addr: String,
        port: u16,
        waited: Duration,
    },

    /// The nodes disagree; the message names the node that differs and is the same on every
    /// node.
    #[error("{0}")]
    NodeMismatch(String),

    #[error("could not start worker {local_rank} of this node from '{}' ({source}); check that the program exists and is executable", program.display())]
    Spawn {
        program: PathBuf,
        local_rank: usize,
        source: io::Error,
    },

    #[error(
        "rank {} (node {}, local rank {}) {}; the launcher stopped the other workers, see that rank's output for the cause",
        .0.rank, .0.node_rank, .0.local_rank, .0.exit
    )]
    WorkerFailed(WorkerFailure),

    #[error("the launcher received {}; it stopped all workers", signal_name(*signal))]
    Interrupted { signal: i32 },

    #[error("node {node_rank}'s launcher received {} and stopped the job; this node's workers were stopped too", signal_name(*signal))]
    NodeInterrupted { node_rank: usize, signal: i32 },

    #[error("node {node_rank} failed ({message}); this node's workers were stopped")]
    NodeFailed { node_rank: usize, message: String },

    #[error("lost node 0's rendezvous store while the workers ran ({0}); this node's workers were stopped")]
    StoreLost(StoreError),

    #[error(
        "{} did not report finishing within {} after this node's workers succeeded; check their launchers' output",
        node_list(nodes),
        duration_text(*waited)
    )]
    NodesUnfinished { nodes: Vec<usize>, waited: Duration },
}

impl LaunchError {
    /// The failed worker's exit code (128 + signal when a signal killed it), 128 + the
    /// signal for an interruption, else 1.
    pub fn exit_code(&self) -> i32 {
        match self {
            LaunchError::WorkerFailed(failure) => failure.exit.shell_code(),
            LaunchError::Interrupted { signal } | LaunchError::NodeInterrupted { signal, .. } => {
                128 + signal
            }
            _ => 1,
        }
    }

    /// The failed worker, when a worker's failure ended the job.
    pub fn worker_failure(&self) -> Option<&WorkerFailure> {
        match self {
            LaunchError::WorkerFailed(failure) => Some(failure),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_failures_read_plainly_and_give_the_exit_code() {
        let err = LaunchError::WorkerFailed(WorkerFailure {
            rank: 5,
            node_rank: 1,
            local_rank: 1,
            exit: WorkerExit::Code(3),
        });
        assert_eq!(err.exit_code(), 3);
        assert!(err
            .to_string()
            .starts_with("rank 5 (node 1, local rank 1) exited with code 3;"));
        let killed = LaunchError::WorkerFailed(WorkerFailure {
            rank: 0,
            node_rank: 0,
            local_rank: 0,
            exit: WorkerExit::Signal(libc::SIGKILL),
        });
        assert_eq!(killed.exit_code(), 137);
        assert!(killed
            .to_string()
            .contains("was killed by SIGKILL (signal 9)"));
        assert_eq!(
            LaunchError::Interrupted {
                signal: libc::SIGINT
            }
            .exit_code(),
            130
        );
        assert_eq!(
            LaunchError::NodesMissing {
                missing: vec![1, 2],
                addr: "10.0.0.1".into(),
                port: 29500,
                waited: Duration::from_secs(600),
            }
            .to_string(),
            "nodes 1, 2 did not join the rendezvous at 10.0.0.1:29500 within 10min; start every node with the same MASTER_ADDR and MASTER_PORT"
        );
    }
}
