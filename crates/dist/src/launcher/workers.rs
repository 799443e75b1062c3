//! Starting, watching and stopping this node's worker processes.
//!
//! Each worker leads its own process group, so stopping it reaches anything it started, and
//! a terminal's Ctrl-C reaches only the launcher, which forwards it. Each worker also asks
//! the kernel to kill it when the launcher dies (PR_SET_PDEATHSIG), so even a SIGKILLed
//! launcher leaves no worker behind.

use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use super::error::{LaunchError, WorkerExit};
use super::spec::LaunchSpec;
use crate::env::LAUNCHED_MARKER_VAR;

const POLL: Duration = Duration::from_millis(20);

/// Thread-count variables the launcher sets for each worker unless the user already has.
const THREAD_VARS: [&str; 2] = ["OMP_NUM_THREADS", "RAYON_NUM_THREADS"];

pub(crate) struct Worker {
    pub(crate) rank: usize,
    pub(crate) local_rank: usize,
    child: Child,
    status: Option<ExitStatus>,
}

impl Worker {
    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Its exit status once it has exited (reaping it), `None` while it runs.
    pub(crate) fn poll(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    fn running(&mut self) -> bool {
        // A failed wait means the child is not ours to wait for any more: treat it as gone.
        matches!(self.poll(), Ok(None))
    }

    /// Sends `signal` to the worker's whole process group.
    fn signal_group(&self, signal: i32) {
        // SAFETY: kill(2) has no memory-safety preconditions; a group that no longer exists
        // gives ESRCH, which is fine to ignore.
        unsafe {
            libc::kill(-self.pid(), signal);
        }
    }
}

/// How a worker's exit status reads as a failure, `None` for success.
pub(crate) fn failure_of(status: ExitStatus) -> Option<WorkerExit> {
    if status.success() {
        None
    } else if let Some(signal) = status.signal() {
        Some(WorkerExit::Signal(signal))
    } else {
        Some(WorkerExit::Code(status.code().unwrap_or(1)))
    }
}

/// CPU threads per worker: the cores this process may use, split between the workers.
fn threads_per_worker(nproc_per_node: usize) -> usize {
    let cores = thread::available_parallelism().map_or(1, |n| n.get());
    (cores / nproc_per_node).max(1)
}

/// torchrun's variables for worker `local_rank`, plus ours.
fn worker_env(spec: &LaunchSpec, master_port: u16, local_rank: usize) -> Vec<(String, String)> {
    let mut env = vec![
        ("RANK", spec.global_rank(local_rank).to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("WORLD_SIZE", spec.world_size().to_string()),
        ("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string()),
        ("NODE_RANK", spec.node_rank.to_string()),
        ("GROUP_RANK", spec.node_rank.to_string()),
        ("MASTER_ADDR", spec.master_addr.clone()),
        ("MASTER_PORT", master_port.to_string()),
        (LAUNCHED_MARKER_VAR, "1".to_string()),
    ];
    let threads = threads_per_worker(spec.nproc_per_node).to_string();
    for var in THREAD_VARS {
        if std::env::var_os(var).is_none() {
            env.push((var, threads.clone()));
        }
    }
    let mut env: Vec<(String, String)> = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    env.extend(spec.env.iter().cloned());
    env
}

/// Starts all of this node's workers; if one cannot start, stops those already running.
pub(crate) fn spawn_all(spec: &LaunchSpec, master_port: u16) -> Result<Vec<Worker>, LaunchError> {
    let mut workers = Vec::with_capacity(spec.nproc_per_node);
    for local_rank in 0..spec.nproc_per_node {
        match spawn(spec, master_port, local_rank) {
            Ok(child) => workers.push(Worker {
                rank: spec.global_rank(local_rank),
                local_rank,
                child,
                status: None,
            }),
            Err(source) => {
                stop_all(&mut workers, libc::SIGTERM, spec.stop_grace);
                return Err(LaunchError::Spawn {
                    program: spec.program.clone(),
                    local_rank,
                    source,
                });
            }
        }
    }
    Ok(workers)
}

fn spawn(spec: &LaunchSpec, master_port: u16, local_rank: usize) -> io::Result<Child> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(worker_env(spec, master_port, local_rank))
        .process_group(0);
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the launcher died between fork and prctl, no signal will ever come.
            if libc::getppid() != launcher {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Stops every worker still running: `signal` first, SIGKILL for those still there after
/// `grace`, then SIGKILL to every worker's process group so nothing they started survives.
/// Returns once every worker has been reaped.
pub(crate) fn stop_all(workers: &mut [Worker], signal: i32, grace: Duration) {
    for worker in workers.iter_mut().filter(|w| w.status.is_none()) {
        worker.signal_group(signal);
    }
    let deadline = Instant::now() + grace;
    while workers.iter_mut().any(Worker::running) && Instant::now() < deadline {
        thread::sleep(POLL);
    }
    for worker in workers.iter_mut() {
        worker.signal_group(libc::SIGKILL);
        if worker.status.is_none() {
            worker.status = worker.child.wait().ok();
        }
    }
}
