//! Benchmarks that need several processes run this same command again as workers of a local
//! torchrun-style job. A worker is told where to write its results by the hidden
//! `--report-to FILE` argument, which is also how it knows it is a worker; the command that
//! started the job reads the file once every worker has exited.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use ff_dist::{LaunchSpec, ProcessGroup, DEFAULT_RENDEZVOUS_TIMEOUT, DEFAULT_STOP_GRACE};

/// Bounds the workers' joining and each of their collectives.
pub(super) const WORKER_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs this command again as `processes` workers on this machine, each with `threads` CPU
/// threads, and returns what rank 0 reported.
pub(super) fn run_as_workers(processes: usize, threads: usize, label: &str) -> Result<String> {
    run_as_workers_with_args(processes, threads, label, &[])
}

/// [`run_as_workers`] with `extra` arguments added to the workers' command line.
pub(super) fn run_as_workers_with_args(
    processes: usize,
    threads: usize,
    label: &str,
    extra: &[&str],
) -> Result<String> {
    let program = std::env::current_exe().context("finding the ferrofactory executable")?;
    let report = std::env::temp_dir().join(format!(
        "ferrofactory-bench-{}-{label}.txt",
        std::process::id()
    ));
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.extend(extra.iter().map(OsString::from));
    args.extend(["--report-to".into(), report.clone().into_os_string()]);
    let threads = threads.to_string();
    let spec = LaunchSpec {
        nnodes: 1,
        node_rank: 0,
        nproc_per_node: processes,
        master_addr: ff_dist::DEFAULT_MASTER_ADDR.into(),
        master_port: None,
        program,
        args,
        env: ["RAYON_NUM_THREADS", "OMP_NUM_THREADS"]
            .into_iter()
            .map(|var| (var.to_string(), threads.clone()))
            .collect(),
        rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
        config_hash: String::new(),
        stop_grace: DEFAULT_STOP_GRACE,
    };
    let launched = ff_dist::launch(&spec)
        .map_err(|e| anyhow!("the benchmark's {processes} worker processes failed: {e}"));
    let text = launched.and_then(|()| {
        std::fs::read_to_string(&report)
            .with_context(|| format!("reading the workers' report {}", report.display()))
    });
    let _ = std::fs::remove_file(&report);
    text
}

/// Where a worker writes its report; rank 0 alone writes it.
pub(super) fn write_report(group: &dyn ProcessGroup, to: &Path, text: &str) -> Result<()> {
    if group.rank() == 0 {
        std::fs::write(to, text).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(())
}

/// For each measured iteration, the time of the slowest rank: a collective step is only as
/// fast as its last participant.
pub(super) fn slowest_rank(group: &dyn ProcessGroup, seconds: &[f64]) -> Result<Vec<f64>> {
    let mine: Vec<f32> = seconds.iter().map(|&s| s as f32).collect();
    let mut all = vec![0f32; mine.len() * group.world_size()];
    group.all_gather(&mine, &mut all)?;
    Ok((0..mine.len())
        .map(|i| {
            all.chunks_exact(mine.len())
                .map(|rank| f64::from(rank[i]))
                .fold(0.0, f64::max)
        })
        .collect())
}
