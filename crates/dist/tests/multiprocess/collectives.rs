//! Gloo collectives across real processes that meet in a store this test hosts.

use std::time::Duration;

use ff_dist::testing::{assert_success, spawn_ranks, spawn_self, vars, Finished, SCENARIO_VAR};

use crate::worker::TIMEOUT_MS_VAR;

/// Starts `world` workers running `scenario` against a store hosted here, as the launcher
/// would host it, and waits for all of them.
fn run_workers(scenario: &str, world: usize, timeout_ms: u64, limit: Duration) -> Vec<Finished> {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = vars(&[
        (SCENARIO_VAR, scenario.to_string()),
        (TIMEOUT_MS_VAR, timeout_ms.to_string()),
    ]);
    spawn_ranks(dir.path(), "worker_process", world, &env).wait(limit)
}

/// Every worker of a `world`-process job checked every collective's result.
fn collectives_are_exact(world: usize) {
    for finished in run_workers("collectives", world, 20_000, Duration::from_secs(30)) {
        assert_success(&finished);
        assert!(
            finished.stderr.contains("all collectives checked"),
            "{}",
            finished.stderr
        );
    }
}

#[test]
fn collectives_give_exact_results_across_two_processes() {
    collectives_are_exact(2);
}

#[test]
fn collectives_give_exact_results_across_three_processes() {
    collectives_are_exact(3);
}

/// A peer that dies fails the collective on the survivors at once (not at the timeout). Which
/// rank a survivor can name depends on which broken connection Gloo reports first: the dead
/// rank's, or another survivor's that has already exited; a survivor never blames itself or
/// a rank that is alive. Naming the lost rank for the user is the launcher's job, which sees
/// the worker's exit (crates/cli/tests/distributed_faults.rs).
#[test]
fn a_dead_peer_fails_the_collective_quickly() {
    // A 20 s timeout: the error must come from the broken connection, long before it.
    let finished = run_workers("dead_peer", 3, 20_000, Duration::from_secs(30));
    assert_eq!(finished[2].code(), None, "rank 2 kills itself");
    for (rank, survivor) in finished[..2].iter().enumerate() {
        assert_success(survivor);
        assert!(
            survivor.elapsed < Duration::from_secs(15),
            "{:?}",
            survivor.elapsed
        );
        assert!(
            survivor.stderr.contains("COLLECTIVE ERROR"),
            "{}",
            survivor.stderr
        );
        assert!(
            !survivor
                .stderr
                .contains(&format!("the connection to rank {rank} failed")),
            "rank {rank} blames itself: {}",
            survivor.stderr
        );
    }
}

#[test]
fn a_stalled_peer_fails_the_collective_within_the_timeout() {
    let finished = run_workers("stuck_peer", 2, 2_000, Duration::from_secs(20));
    assert_success(&finished[0]);
    eprintln!("{}", finished[0].stderr);
    assert!(
        finished[0].stderr.contains("COLLECTIVE ERROR"),
        "{}",
        finished[0].stderr
    );
    assert!(
        finished[0]
            .stderr
            .contains("all_reduce failed on rank 0 of 2"),
        "{}",
        finished[0].stderr
    );
}

#[test]
fn without_a_launcher_rank_zero_hosts_the_store() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = ff_dist::testing::free_port();
    let workers: Vec<_> = (0..2)
        .map(|rank| {
            let env = vars(&[
                (SCENARIO_VAR, "collectives".to_string()),
                ("RANK", rank.to_string()),
                ("WORLD_SIZE", "2".to_string()),
                ("MASTER_PORT", port.to_string()),
            ]);
            spawn_self(dir.path(), &format!("rank{rank}"), "worker_process", &env)
        })
        .collect();
    for worker in workers {
        assert_success(&worker.wait(Duration::from_secs(30)));
    }
}
