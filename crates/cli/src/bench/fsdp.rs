//! `ferrofactory bench fsdp`: tokens per second of FULL_SHARD on N processes of one thread,
//! with and without prefetch, against one process with N threads on the same total batch, and
//! the share of each step the sharded ranks spend blocked on communication.

use std::fmt::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use ff_config::{BackwardPrefetch, FsdpConfig, ShardingStrategy};
use ff_fsdp::{Sharded, ShardedSetup};
use ff_train::{AdamW, AdamWConfig, Engine, StepOptions};

use super::workers::{run_as_workers_with_args, slowest_rank, write_report, WORKER_TIMEOUT};
use super::{median, Finetuning, SplitBatch, Workload};

#[derive(Args)]
pub struct FsdpArgs {
    #[command(flatten)]
    split: SplitBatch,
    #[arg(long, value_enum, default_value = "lora")]
    finetuning: Finetuning,
    /// Internal: which layout a worker runs.
    #[arg(long, hide = true, value_enum)]
    layout: Option<Layout>,
    #[arg(long, hide = true)]
    report_to: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Layout {
    Single,
    Prefetch,
    NoPrefetch,
}

const LORA_RANK: usize = 8;

pub fn run(args: FsdpArgs) -> Result<()> {
    args.split.check()?;
    if let (Some(report), Some(layout)) = (&args.report_to, args.layout) {
        return worker(&args, layout, report);
    }
    let n = args.split.nproc;
    let mut results = Vec::new();
    for (layout, processes, threads, name) in [
        (Layout::Single, 1, n, format!("1 process x {n} threads")),
        (
            Layout::Prefetch,
            n,
            1,
            format!("FULL_SHARD {n} x 1, prefetch"),
        ),
        (
            Layout::NoPrefetch,
            n,
            1,
            format!("FULL_SHARD {n} x 1, no prefetch"),
        ),
    ] {
        eprintln!("{name}:");
        let label = format!("fsdp-{}", layout_arg(layout));
        let report = run_as_workers_with_args(
            processes,
            threads,
            &label,
            &["--layout", layout_arg(layout)],
        )?;
        results.push((name, Measured::parse(&report)?));
    }
    let tokens = (args.split.batch * args.split.seq) as f64;
    println!(
        "model           {} (random weights), {}, f32, gradient checkpointing on",
        args.split.model_config.display(),
        match args.finetuning {
            Finetuning::Lora => format!("LoRA r={LORA_RANK} on all linears"),
            Finetuning::Full => "full fine-tuning".into(),
        }
    );
    println!(
        "step            {} x {} tokens in total, median of {} steps after 1 warm-up",
        args.split.batch, args.split.seq, args.split.steps
    );
    let baseline = results[0].1.step_seconds;
    for (name, m) in &results {
        println!(
            "{name:<32} {:>7.3} s/step {:>8.1} tokens/s  ratio {:.2}  waiting on communication {:>5.1}%  last loss {:.6}",
            m.step_seconds,
            tokens / m.step_seconds,
            baseline / m.step_seconds,
            100.0 * m.comm_share,
            m.last_loss
        );
    }
    Ok(())
}

fn layout_arg(layout: Layout) -> &'static str {
    match layout {
        Layout::Single => "single",
        Layout::Prefetch => "prefetch",
        Layout::NoPrefetch => "no-prefetch",
    }
}

/// What a run's workers report: median step time, the largest share of time a rank spent
/// blocked on the engine's collectives, and the last loss.
struct Measured {
    step_seconds: f64,
    comm_share: f64,
    last_loss: f64,
}

impl Measured {
    fn parse(report: &str) -> Result<Self> {
        let fields: Vec<f64> = report
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        match fields[..] {
            [step_seconds, comm_share, last_loss] => Ok(Self {
                step_seconds,
                comm_share,
                last_loss,
            }),
            _ => bail!(
                "the benchmark workers reported '{}', not a time, a share and a loss",
                report.trim()
            ),
        }
    }
}

fn worker(args: &FsdpArgs, layout: Layout, report: &Path) -> Result<()> {
    let group = ff_dist::init_from_env(WORKER_TIMEOUT)?;
    let (rank, world) = (group.rank(), group.world_size());
    let mut workload = Workload::new(
        &args.split.model_config,
        DType::F32,
        args.finetuning,
        LORA_RANK,
    )?;
    if layout != Layout::Single {
        let prefetch = layout == Layout::Prefetch;
        let config = FsdpConfig {
            sharding_strategy: ShardingStrategy::FullShard,
            forward_prefetch: prefetch,
            backward_prefetch: if prefetch {
                BackwardPrefetch::BackwardPre
            } else {
                BackwardPrefetch::NoPrefetch
            },
            ..FsdpConfig::default()
        };
        let sharded = Sharded::wrap(
            &mut workload.model,
            ShardedSetup {
                config: &config,
                group: group.as_ref(),
                local_world_size: world,
            },
        )?;
        workload.engine = Engine::Sharded(Box::new(sharded));
        workload.optimizer = AdamW::new(AdamWConfig::default(), workload.engine.names());
    }
    let batch = args.split.rank_batch(rank, world, workload.vocab);
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: true,
    };
    let started = Instant::now();
    let timings = workload.timed_steps(&batch, args.split.steps, options, group.as_ref())?;
    let total = started.elapsed().as_secs_f64();
    let waited = match &workload.engine {
        Engine::Sharded(s) => s.accounting().comm_wait.as_secs_f64(),
        Engine::Replicated(_) => 0.0,
    };
    let seconds = median(slowest_rank(group.as_ref(), &timings.seconds)?);
    let comm_share = slowest_rank(group.as_ref(), &[waited / total])?[0];
    let mut text = String::new();
    writeln!(text, "{seconds} {comm_share} {}", timings.last_loss)?;
    write_report(group.as_ref(), report, &text)
}
