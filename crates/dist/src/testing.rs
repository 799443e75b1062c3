//! The multi-process test harness (feature `testing`): starting and reaping the processes a
//! test needs. Every child is the test binary run again with a role: an ignored `#[test]`
//! entry point of that binary (such as `worker_process`) that reads [`ROLE_VAR`] or
//! [`SCENARIO_VAR`] and does its part, so no helper program is needed. A child's output goes
//! to files (a pipe nobody reads could block it), and a guard kills it if a test fails before
//! reaping it, so no test leaves a process behind. [`spawn_ranks`] starts the ranks of a Gloo
//! job that meet in a store the test hosts, as the launcher hosts it for its workers.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::store::StoreServer;

/// Tells a child which role and scenario to run.
pub const ROLE_VAR: &str = "FF_DIST_TEST_ROLE";
pub const SCENARIO_VAR: &str = "FF_DIST_TEST_SCENARIO";

/// Launch variables the tests set themselves; inherited values would confuse the children.
const LAUNCH_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "NNODES",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GLOO_SOCKET_IFNAME",
    "OMP_NUM_THREADS",
    "RAYON_NUM_THREADS",
    crate::LAUNCHED_MARKER_VAR,
];

/// The arguments that make this test binary run only the entry point `entry`.
pub fn self_args(entry: &str) -> Vec<String> {
    [
        entry,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

pub fn test_binary() -> PathBuf {
    std::env::current_exe().expect("the test binary knows its own path")
}

/// A port nothing listens on right now (the OS picks it; it stays free with high probability
/// until the test binds it a moment later).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

pub struct Spawned {
    pub name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
}

pub struct Finished {
    pub name: String,
    pub status: ExitStatus,
    pub elapsed: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Starts this test binary as `entry` with `env`, logging into `dir/<name>.{out,err}`.
pub fn spawn_self(dir: &Path, name: &str, entry: &str, env: &[(String, String)]) -> Spawned {
    let stdout = dir.join(format!("{name}.out"));
    let stderr = dir.join(format!("{name}.err"));
    let mut command = Command::new(test_binary());
    command.args(self_args(entry));
    for var in LAUNCH_VARS {
        command.env_remove(var);
    }
    command
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("create stdout log"))
        .stderr(std::fs::File::create(&stderr).expect("create stderr log"));
    let child = command.spawn().expect("start the test binary again");
    Spawned {
        name: name.to_string(),
        child: Some(child),
        stdout,
        stderr,
    }
}

impl Spawned {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Waits for the process to exit; past `limit` it is killed and the test fails.
    pub fn wait(mut self, limit: Duration) -> Finished {
        let start = Instant::now();
        let mut child = self.child.take().expect("not yet reaped");
        let status = loop {
            if let Some(status) = child.try_wait().expect("poll child") {
                break status;
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {:?}; its stderr:\n{}",
                    self.name,
                    limit,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Finished {
            name: self.name.clone(),
            status,
            elapsed: start.elapsed(),
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts the process exited with code 0, showing its output otherwise.
pub fn assert_success(finished: &Finished) {
    assert!(
        finished.status.success(),
        "{} exited with {:?}\nstdout:\n{}\nstderr:\n{}",
        finished.name,
        finished.status,
        finished.stdout,
        finished.stderr
    );
}

/// Whether a process with this id still exists (and is not a zombie awaiting its parent).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesized command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Polls until `pid` is gone or `limit` passes; true if it is gone.
pub fn wait_gone(pid: i32, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !process_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !process_alive(pid)
}

pub fn vars(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The ranks of one job, started by [`spawn_ranks`], and the store they meet in.
pub struct Ranks {
    workers: Vec<Spawned>,
    /// Kept until every rank is reaped: the ranks reach each other through it.
    _store: StoreServer,
}

/// Starts `world` ranks of this test binary's `entry` with `env`, logging into
/// `dir/rank<r>.{out,err}`. They meet in a store hosted here, as a launcher hosts it, so
/// `ff_dist::init_from_env` in each gives the job's Gloo process group.
pub fn spawn_ranks(dir: &Path, entry: &str, world: usize, env: &[(String, String)]) -> Ranks {
    let store = StoreServer::bind("127.0.0.1", 0).expect("host a store");
    let workers = (0..world)
        .map(|rank| {
            let mut env = env.to_vec();
            env.extend(vars(&[
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", world.to_string()),
                ("MASTER_ADDR", "127.0.0.1".to_string()),
                ("MASTER_PORT", store.port().to_string()),
                (crate::LAUNCHED_MARKER_VAR, "1".to_string()),
            ]));
            spawn_self(dir, &format!("rank{rank}"), entry, &env)
        })
        .collect();
    Ranks {
        workers,
        _store: store,
    }
}

impl Ranks {
    /// Waits for every rank, in rank order; each one past `limit` fails the test.
    pub fn wait(self, limit: Duration) -> Vec<Finished> {
        let Ranks { workers, _store } = self;
        workers.into_iter().map(|w| w.wait(limit)).collect()
    }
}
