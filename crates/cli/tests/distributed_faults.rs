//! Failures of multi-process `ferrofactory train` jobs, through the real binary on loopback: a
//! worker killed mid-training, a node that never comes, a MASTER_PORT already taken. Each
//! must end every process of the job with a non-zero exit and a message that says what
//! happened, and leave no process behind.

mod support;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use support::{
    assert_failed_with, await_logged_steps, fixture_config, free_port, signal, Finished, Job,
};

/// How long a job may take to stop after a fault, as the design requires.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// Long enough that training is still running when the test strikes.
const MANY_STEPS: &str = "max_steps=100000";

/// Exit code of a launcher whose worker was SIGKILLed: 128 + 9, as a shell reports it.
const KILLED_EXIT: i32 = 137;

fn assert_names_killed_rank_1(finished: &Finished) {
    assert_failed_with(finished, KILLED_EXIT);
    assert!(
        finished
            .last_error_line()
            .starts_with("error: rank 1 (node ")
            && finished
                .last_error_line()
                .contains("was killed by SIGKILL (signal 9)"),
        "{} names the lost rank last:\n{}",
        finished.name,
        finished.stderr
    );
}

#[test]
fn a_killed_worker_stops_the_whole_single_node_job_naming_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let job = Job::new(dir.path());
    let launcher = job.train(
        "launcher",
        &config,
        &[MANY_STEPS, "per_device_train_batch_size=1"],
        &[("FORCE_TORCHRUN", "1"), ("NPROC_PER_NODE", "2")],
    );
    await_logged_steps(&dir.path().join("out"), 2, STOP_LIMIT);
    let victim = job.await_worker(1, STOP_LIMIT);
    let rank0 = job.await_worker(0, STOP_LIMIT);
    signal(victim.pid, "KILL");
    let killed_at = Instant::now();

    let finished = launcher.wait_until(killed_at + STOP_LIMIT);
    assert_names_killed_rank_1(&finished);
    assert!(
        finished
            .last_error_line()
            .contains("(node 0, local rank 1)"),
        "{}",
        finished.stderr
    );
    // The launcher reaps its workers before it exits.
    assert!(
        !job.processes().iter().any(|p| p.pid == rank0.pid),
        "rank 0 outlived its launcher"
    );
    job.assert_no_survivors(Duration::from_secs(2));
}

#[test]
fn a_killed_worker_on_node_1_stops_both_nodes_naming_its_rank() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let job = Job::new(dir.path());
    let port = free_port().to_string();
    let nodes: Vec<_> = ["0", "1"]
        .into_iter()
        .map(|node| {
            job.train(
                &format!("node{node}"),
                &config,
                &[MANY_STEPS, "per_device_train_batch_size=1"],
                &[
                    ("FORCE_TORCHRUN", "1"),
                    ("NNODES", "2"),
                    ("NODE_RANK", node),
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", &port),
                ],
            )
        })
        .collect();
    await_logged_steps(&dir.path().join("out"), 2, STOP_LIMIT);
    let victim = job.await_worker(1, STOP_LIMIT);
    signal(victim.pid, "KILL");
    let killed_at = Instant::now();

    for node in nodes {
        let finished = node.wait_until(killed_at + STOP_LIMIT);
        assert_names_killed_rank_1(&finished);
        assert!(
            finished
                .last_error_line()
                .contains("(node 1, local rank 0)"),
            "{}",
            finished.stderr
        );
    }
    job.assert_no_survivors(Duration::from_secs(2));
}

#[test]
fn a_node_that_never_comes_times_out_the_rendezvous_naming_it_and_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let job = Job::new(dir.path());
    let port = free_port().to_string();
    let started = Instant::now();
    let node0 = job.train(
        "node0",
        &config,
        &[],
        &[
            ("FORCE_TORCHRUN", "1"),
            ("NNODES", "2"),
            ("NODE_RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
            ("FERROFACTORY_RDZV_TIMEOUT", "2"),
        ],
    );
    let finished = node0.wait_until(started + STOP_LIMIT);
    assert_failed_with(&finished, 1);
    assert_eq!(
        finished.last_error_line(),
        format!(
            "error: node 1 did not join the rendezvous at 127.0.0.1:{port} within 2.0s; start every node with the same MASTER_ADDR and MASTER_PORT"
        )
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the 2 s rendezvous timeout took {:?}",
        started.elapsed()
    );
    assert!(
        !dir.path().join("out").exists(),
        "no worker started training"
    );
    job.assert_no_survivors(Duration::from_secs(2));

    // The other way round: node 1 alone cannot reach node 0's store.
    let node1 = job.train(
        "node1",
        &config,
        &[],
        &[
            ("FORCE_TORCHRUN", "1"),
            ("NNODES", "2"),
            ("NODE_RANK", "1"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
            ("FERROFACTORY_RDZV_TIMEOUT", "2"),
        ],
    );
    let finished = node1.wait_until(Instant::now() + STOP_LIMIT);
    assert_failed_with(&finished, 1);
    let error = finished.last_error_line();
    assert!(
        error.starts_with(&format!(
            "error: could not reach the rendezvous store at 127.0.0.1:{port} within 2.0s"
        )) && error.contains("check that node 0 was started"),
        "{}",
        finished.stderr
    );
    job.assert_no_survivors(Duration::from_secs(2));
}

#[test]
fn a_master_port_in_use_is_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let job = Job::new(dir.path());
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let expected = format!("error: port {port} on 127.0.0.1 is in use; pick another MASTER_PORT");

    // Through the launcher, which hosts the store.
    let launcher = job.train(
        "launcher",
        &config,
        &[],
        &[
            ("FORCE_TORCHRUN", "1"),
            ("NPROC_PER_NODE", "2"),
            ("MASTER_PORT", &port),
        ],
    );
    let finished = launcher.wait_until(Instant::now() + STOP_LIMIT);
    assert_failed_with(&finished, 1);
    assert_eq!(finished.last_error_line(), expected, "{}", finished.stderr);
    assert_eq!(
        finished
            .stderr
            .lines()
            .filter(|l| l.starts_with("error:"))
            .count(),
        1,
        "{}",
        finished.stderr
    );

    // A worker started by hand as rank 0, which hosts the store itself, as torch's env://.
    let rank0 = job.train(
        "rank0",
        &config,
        &[],
        &[
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", &port),
        ],
    );
    let finished = rank0.wait_until(Instant::now() + STOP_LIMIT);
    assert_failed_with(&finished, 1);
    assert_eq!(finished.last_error_line(), expected, "{}", finished.stderr);
    assert!(!dir.path().join("out").exists(), "nothing was trained");
    job.assert_no_survivors(Duration::from_secs(2));
}
