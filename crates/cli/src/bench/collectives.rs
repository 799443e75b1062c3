//! `ferrofactory bench collectives`: how fast Gloo's all_reduce and reduce_scatter move data
//! between processes on this machine, in nccl-tests' terms (algorithm and bus bandwidth).

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args;
use ff_dist::ProcessGroup;

use super::median;
use super::workers::{run_as_workers, slowest_rank, write_report, WORKER_TIMEOUT};

#[derive(Args)]
pub struct CollectivesArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
    /// Buffer sizes in MiB (f32 elements), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    sizes_mib: Vec<usize>,
    /// Timed iterations per size; the median is reported. One untimed warm-up runs first.
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long, hide = true)]
    report_to: Option<PathBuf>,
}

#[derive(Clone, Copy)]
enum Collective {
    AllReduce,
    ReduceScatter,
}

impl Collective {
    fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::ReduceScatter => "reduce_scatter",
        }
    }

    /// nccl-tests' bus bandwidth factor for `n` ranks: what each link carries relative to the
    /// buffer, so figures compare across world sizes.
    fn bus_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            Collective::AllReduce => 2.0 * (n - 1.0) / n,
            Collective::ReduceScatter => (n - 1.0) / n,
        }
    }
}

pub fn run(args: CollectivesArgs) -> Result<()> {
    if args.nproc < 2 || args.iters == 0 || args.sizes_mib.contains(&0) {
        bail!("--nproc must be at least 2, --iters positive and every size at least 1 MiB");
    }
    match &args.report_to {
        Some(report) => worker(&args, report),
        None => {
            print!("{}", run_as_workers(args.nproc, 1, "collectives")?);
            Ok(())
        }
    }
}

fn worker(args: &CollectivesArgs, report: &Path) -> Result<()> {
    let group = ff_dist::init_from_env(WORKER_TIMEOUT)?;
    let n = group.world_size();
    let mut table = String::new();
    writeln!(
        table,
        "Gloo collectives between {n} processes on {}, f32, median of {} iterations after 1 warm-up",
        ff_dist::DEFAULT_MASTER_ADDR,
        args.iters
    )?;
    writeln!(
        table,
        "busbw = algbw x 2(n-1)/n for all_reduce, x (n-1)/n for reduce_scatter (nccl-tests); size = the whole input buffer"
    )?;
    writeln!(
        table,
        "reduce_scatter runs as an all_reduce of a copy (as PyTorch's Gloo backend does), so expect about half all_reduce's busbw\n"
    )?;
    writeln!(
        table,
        "{:<15} {:>8} {:>12} {:>13} {:>13}",
        "collective", "size", "time (ms)", "algbw (GB/s)", "busbw (GB/s)"
    )?;
    for collective in [Collective::AllReduce, Collective::ReduceScatter] {
        for &mib in &args.sizes_mib {
            // Whole elements, and a multiple of the world size so reduce_scatter's shares are equal.
            let elements = (mib << 20) / 4 / n * n;
            let seconds = median(slowest_rank(
                group.as_ref(),
                &time(group.as_ref(), collective, elements, args.iters)?,
            )?);
            let algbw = (elements * 4) as f64 / seconds / 1e9;
            writeln!(
                table,
                "{:<15} {:>4} MiB {:>12.3} {:>13.2} {:>13.2}",
                collective.name(),
                mib,
                seconds * 1e3,
                algbw,
                algbw * collective.bus_factor(n)
            )?;
        }
    }
    write_report(group.as_ref(), report, &table)
}

/// Seconds of each of `iters` runs of `collective` on a buffer of `elements` f32, after one
/// warm-up; the ranks meet at a barrier before each so they start together.
fn time(
    group: &dyn ProcessGroup,
    collective: Collective,
    elements: usize,
    iters: usize,
) -> Result<Vec<f64>> {
    let mut buffer = vec![1f32; elements];
    let mut share = vec![0f32; elements / group.world_size()];
    let mut seconds = Vec::with_capacity(iters);
    for i in 0..=iters {
        group.barrier()?;
        let start = Instant::now();
        match collective {
            Collective::AllReduce => group.all_reduce_sum(&mut buffer)?,
            Collective::ReduceScatter => group.reduce_scatter_sum(&buffer, &mut share)?,
        }
        if i > 0 {
            seconds.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_factors_are_nccl_tests() {
        assert_eq!(Collective::AllReduce.bus_factor(2), 1.0);
        assert_eq!(Collective::ReduceScatter.bus_factor(2), 0.5);
        assert_eq!(Collective::AllReduce.bus_factor(4), 1.5);
        assert_eq!(Collective::ReduceScatter.bus_factor(4), 0.75);
    }
}
