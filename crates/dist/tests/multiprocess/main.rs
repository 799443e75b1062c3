//! Tests that need several processes: Gloo collectives between real processes over loopback,
//! failure handling, and the launcher on one and two "nodes". The processes are this test
//! binary started again with a role (see `ff_dist::testing`), so no helper program is needed.

use ff_dist::testing::{ROLE_VAR, SCENARIO_VAR};

mod collectives;
mod launcher;
mod worker;

/// Entry point of the worker processes the tests start; it does nothing when run directly.
#[test]
#[ignore = "entry point of the worker processes that the other tests start"]
fn worker_process() {
    if let Ok(scenario) = std::env::var(SCENARIO_VAR) {
        std::process::exit(worker::run(&scenario));
    }
}

/// Entry point of the launcher processes the multi-node tests start: a node's launcher built
/// from the NNODES/NODE_RANK/... variables, running this binary's `worker_process` as its
/// workers; it exits with the launch's exit code.
#[test]
#[ignore = "entry point of the launcher processes that the multi-node tests start"]
fn launcher_process() {
    if std::env::var(ROLE_VAR).as_deref() == Ok("launcher") {
        std::process::exit(launcher::run_launcher_from_env());
    }
}
