//! The sharded engine across real processes: Gloo process groups over loopback between ranks
//! that each build the same tiny model, shard it, and drive the engine as the training walk
//! does. Each scenario checks, on every rank, one thing the engine promises: gathered units
//! are the unsharded model's tensors, reduced gradients are each rank's shard of the sum,
//! prefetching keeps the walk's order and changes no value, and the full and sharded state
//! dicts round-trip. The ranks are this test binary started again (see `ff_dist::testing`).

use std::time::Duration;

use ff_dist::testing::{assert_success, spawn_ranks, vars, SCENARIO_VAR};

mod model;
mod recording;
mod worker;

/// Entry point of the rank processes the tests start; it does nothing when run directly.
#[test]
#[ignore = "entry point of the rank processes that the other tests start"]
fn worker_process() {
    if let Ok(scenario) = std::env::var(SCENARIO_VAR) {
        std::process::exit(worker::run(&scenario));
    }
}

/// Runs `scenario` on `world` ranks and asserts every rank passed every check.
fn run_ranks(scenario: &str, world: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let env = vars(&[(SCENARIO_VAR, scenario.to_string())]);
    let ranks = spawn_ranks(dir.path(), "worker_process", world, &env);
    for finished in ranks.wait(Duration::from_secs(60)) {
        assert_success(&finished);
        assert!(
            finished.stderr.contains(worker::CHECKED),
            "{}: {}",
            finished.name,
            finished.stderr
        );
    }
}

#[test]
fn gathered_units_are_the_unsharded_model_on_two_ranks() {
    run_ranks("gather", 2);
}

#[test]
fn gathered_units_are_the_unsharded_model_on_three_ranks() {
    run_ranks("gather", 3);
}

#[test]
fn reduced_gradients_are_each_ranks_shard_of_the_sum_on_two_ranks() {
    run_ranks("reduce_scatter", 2);
}

#[test]
fn reduced_gradients_are_each_ranks_shard_of_the_sum_on_three_ranks() {
    run_ranks("reduce_scatter", 3);
}

#[test]
fn prefetch_keeps_the_walks_order_and_changes_no_value() {
    run_ranks("prefetch", 2);
}

#[test]
fn full_and_sharded_state_dicts_round_trip_on_two_ranks() {
    run_ranks("state_dict", 2);
}

#[test]
fn full_and_sharded_state_dicts_round_trip_on_three_ranks() {
    run_ranks("state_dict", 3);
}
