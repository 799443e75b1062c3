//! The launcher: in this process for one node, and as separate launcher processes for two
//! "nodes" on loopback.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ff_dist::{launch, LaunchError, LaunchSpec, WorkerExit};

use crate::worker::{FAILING_RANK_VAR, OUT_DIR_VAR, TIMEOUT_MS_VAR};
use ff_dist::testing::{
    assert_success, free_port, self_args, spawn_self, test_binary, vars, wait_gone, Finished,
    Spawned, ROLE_VAR, SCENARIO_VAR,
};

const CONFIG_HASH_VAR: &str = "FF_DIST_TEST_CONFIG_HASH";

/// Body of the `launcher_process` entry point.
pub fn run_launcher_from_env() -> i32 {
    let env: HashMap<String, String> = std::env::vars().collect();
    let args = self_args("worker_process")
        .into_iter()
        .map(Into::into)
        .collect();
    let result = LaunchSpec::from_env(&env, 0, test_binary(), args).and_then(|mut spec| {
        spec.rendezvous_timeout = Duration::from_secs(15);
        spec.stop_grace = Duration::from_secs(2);
        spec.config_hash = env.get(CONFIG_HASH_VAR).cloned().unwrap_or_default();
        launch(&spec)
    });
    match result {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("LAUNCH ERROR: {error}");
            error.exit_code()
        }
    }
}

/// A single-node spec that runs this binary's workers in `scenario`, logging into `dir`.
fn local_spec(scenario: &str, nproc: usize, dir: &Path, extra: &[(&str, String)]) -> LaunchSpec {
    let mut env = vars(&[
        (SCENARIO_VAR, scenario.to_string()),
        (OUT_DIR_VAR, dir.display().to_string()),
        (TIMEOUT_MS_VAR, "20000".to_string()),
    ]);
    env.extend(vars(extra));
    LaunchSpec {
        nnodes: 1,
        node_rank: 0,
        nproc_per_node: nproc,
        master_addr: "127.0.0.1".into(),
        master_port: None,
        program: test_binary(),
        args: self_args("worker_process")
            .into_iter()
            .map(Into::into)
            .collect(),
        env,
        rendezvous_timeout: Duration::from_secs(15),
        config_hash: "same".into(),
        stop_grace: Duration::from_secs(2),
    }
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"))
}

fn var_in(file: &str, var: &str) -> String {
    file.lines()
        .find_map(|line| line.strip_prefix(&format!("{var}=")))
        .unwrap_or_else(|| panic!("{var} missing from\n{file}"))
        .to_string()
}

/// Waits until every worker has written its pid file, and returns the pids.
fn await_pids(dir: &Path, ranks: std::ops::Range<usize>) -> Vec<i32> {
    let start = Instant::now();
    loop {
        let pids: Vec<Option<i32>> = ranks
            .clone()
            .map(|r| {
                std::fs::read_to_string(dir.join(format!("pid-{r}")))
                    .ok()
                    .and_then(|s| s.parse().ok())
            })
            .collect();
        if pids.iter().all(Option::is_some) {
            return pids.into_iter().flatten().collect();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "workers did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn workers_get_torchrun_variables_and_reduce_together() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = local_spec(
        "launched",
        3,
        dir.path(),
        &[("FF_DIST_TEST_EXTRA", "kept".into())],
    );
    launch(&spec).expect("the launch succeeds");

    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = |var: &str| std::env::var(var).unwrap_or_else(|_| (cores / 3).max(1).to_string());
    let mut ports = Vec::new();
    for rank in 0..3 {
        let env = read(dir.path(), &format!("env-{rank}"));
        for (var, want) in [
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("WORLD_SIZE", "3".into()),
            ("LOCAL_WORLD_SIZE", "3".into()),
            ("NODE_RANK", "0".into()),
            ("GROUP_RANK", "0".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("OMP_NUM_THREADS", threads("OMP_NUM_THREADS")),
            ("RAYON_NUM_THREADS", threads("RAYON_NUM_THREADS")),
            (ff_dist::LAUNCHED_MARKER_VAR, "1".into()),
            ("FF_DIST_TEST_EXTRA", "kept".into()),
        ] {
            assert_eq!(var_in(&env, var), want, "{var} of rank {rank}");
        }
        ports.push(var_in(&env, "MASTER_PORT"));
        assert_eq!(read(dir.path(), &format!("sum-{rank}")), "6");
    }
    assert!(
        ports
            .iter()
            .all(|p| p == &ports[0] && p.parse::<u16>().is_ok()),
        "{ports:?}"
    );
}

#[test]
fn a_failing_worker_stops_the_others_and_its_exit_code_is_returned() {
    let dir = tempfile::tempdir().expect("temp dir");
    let spec = local_spec("hold", 3, dir.path(), &[(FAILING_RANK_VAR, "1".into())]);
    let start = Instant::now();
    let error = launch(&spec).expect_err("rank 1 fails");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let failure = error.worker_failure().expect("a worker failure");
    assert_eq!((failure.rank, failure.exit), (1, WorkerExit::Code(3)));
    assert_eq!(error.exit_code(), 3);
    assert!(
        error
            .to_string()
            .starts_with("rank 1 (node 0, local rank 1) exited with code 3;"),
        "{error}"
    );
    for (rank, pid) in await_pids(dir.path(), 0..3).into_iter().enumerate() {
        assert!(
            wait_gone(pid, Duration::from_secs(1)),
            "rank {rank} (pid {pid}) survived"
        );
    }
}

#[test]
fn a_program_that_cannot_start_is_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut spec = local_spec("launched", 2, dir.path(), &[]);
    spec.program = dir.path().join("no-such-program");
    match launch(&spec) {
        Err(LaunchError::Spawn { local_rank: 0, .. }) => {}
        other => panic!("expected a spawn error, got {other:?}"),
    }
}

/// Starts node `node_rank`'s launcher of a two-node job.
fn start_node(dir: &Path, node_rank: usize, port: u16, extra: &[(&str, String)]) -> Spawned {
    let mut env = vars(&[
        (ROLE_VAR, "launcher".into()),
        (SCENARIO_VAR, "launched".into()),
        (OUT_DIR_VAR, dir.display().to_string()),
        (TIMEOUT_MS_VAR, "20000".into()),
        ("NNODES", "2".into()),
        ("NODE_RANK", node_rank.to_string()),
        ("NPROC_PER_NODE", "2".into()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
        (CONFIG_HASH_VAR, "abc123".into()),
    ]);
    // Later entries win, so `extra` can override the defaults above.
    env.extend(vars(extra));
    spawn_self(dir, &format!("node{node_rank}"), "launcher_process", &env)
}

fn run_two_nodes(
    node1_extra: &[(&str, String)],
    both_extra: &[(&str, String)],
) -> (Finished, Finished, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    // Node 1 first: its launcher must wait for node 0's store to appear.
    let node1_env: Vec<(&str, String)> = both_extra.iter().chain(node1_extra).cloned().collect();
    let node1 = start_node(dir.path(), 1, port, &node1_env);
    std::thread::sleep(Duration::from_millis(300));
    let node0 = start_node(dir.path(), 0, port, both_extra);
    let limit = Duration::from_secs(40);
    let node0 = node0.wait(limit);
    let node1 = node1.wait(limit);
    (node0, node1, dir)
}

#[test]
fn two_nodes_run_one_job_whose_all_reduce_spans_both() {
    let (node0, node1, dir) = run_two_nodes(&[], &[]);
    assert_success(&node0);
    assert_success(&node1);
    for rank in 0..4 {
        assert_eq!(
            read(dir.path(), &format!("sum-{rank}")),
            "10",
            "rank {rank}"
        );
        let env = read(dir.path(), &format!("env-{rank}"));
        assert_eq!(var_in(&env, "NODE_RANK"), (rank / 2).to_string());
        assert_eq!(var_in(&env, "LOCAL_RANK"), (rank % 2).to_string());
        assert_eq!(var_in(&env, "WORLD_SIZE"), "4");
    }
}

fn assert_both_report(node0: &Finished, node1: &Finished, text: &str, code: i32) {
    for node in [node0, node1] {
        assert_eq!(node.code(), Some(code), "{}: {}", node.name, node.stderr);
        assert!(
            node.stderr.contains(text),
            "{} does not report '{text}':\n{}",
            node.name,
            node.stderr
        );
    }
}

#[test]
fn a_node_with_another_worker_count_is_named_on_both_nodes() {
    let (node0, node1, _dir) = run_two_nodes(&[("NPROC_PER_NODE", "3".into())], &[]);
    assert_both_report(
        &node0,
        &node1,
        "LAUNCH ERROR: node 1 was started with NPROC_PER_NODE=3 (world size 6) but node 0 with NPROC_PER_NODE=2 (world size 4)",
        1,
    );
}

#[test]
fn a_node_with_another_configuration_is_named_on_both_nodes() {
    let (node0, node1, _dir) = run_two_nodes(&[(CONFIG_HASH_VAR, "def456".into())], &[]);
    assert_both_report(
        &node0,
        &node1,
        "LAUNCH ERROR: node 1's training configuration differs from node 0's (hash def456 vs abc123)",
        1,
    );
}

#[test]
fn a_worker_failing_on_node_1_stops_node_0_with_the_same_report() {
    let (node0, node1, _dir) = run_two_nodes(
        &[],
        &[
            (SCENARIO_VAR, "hold".into()),
            (FAILING_RANK_VAR, "3".into()),
        ],
    );
    assert_both_report(
        &node0,
        &node1,
        "LAUNCH ERROR: rank 3 (node 1, local rank 1) exited with code 3",
        3,
    );
}

/// Starts a single-node launcher process whose two workers hold until stopped.
fn start_holding_launcher(dir: &Path) -> (Spawned, Vec<i32>) {
    let env = vars(&[
        (ROLE_VAR, "launcher".into()),
        (SCENARIO_VAR, "hold".into()),
        (OUT_DIR_VAR, dir.display().to_string()),
        ("NPROC_PER_NODE", "2".into()),
    ]);
    let launcher = spawn_self(dir, "launcher", "launcher_process", &env);
    let pids = await_pids(dir, 0..2);
    (launcher, pids)
}

#[test]
fn sigterm_to_the_launcher_reaches_the_workers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (launcher, pids) = start_holding_launcher(dir.path());
    // SAFETY: kill(2) on a child we started; no memory is involved.
    unsafe { libc::kill(launcher.pid(), libc::SIGTERM) };
    let finished = launcher.wait(Duration::from_secs(10));
    assert_eq!(
        finished.code(),
        Some(128 + libc::SIGTERM),
        "{}",
        finished.stderr
    );
    assert!(
        finished
            .stderr
            .contains("the launcher received SIGTERM (signal 15); it stopped all workers"),
        "{}",
        finished.stderr
    );
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(1)),
            "worker {pid} survived"
        );
    }
}

#[test]
fn workers_die_with_a_killed_launcher() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (launcher, pids) = start_holding_launcher(dir.path());
    // SAFETY: as above.
    unsafe { libc::kill(launcher.pid(), libc::SIGKILL) };
    let finished = launcher.wait(Duration::from_secs(10));
    assert_eq!(finished.code(), None);
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "worker {pid} outlived its launcher"
        );
    }
}
