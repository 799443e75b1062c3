//! `ferrofactory bench dp`: tokens per second of data-parallel training (N processes of one
//! thread, the batch split between them, gradients all-reduced with Gloo) against one process
//! with N threads on the same total batch, on a model of real shape with random weights.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::DType;
use clap::Args;
use ff_train::StepOptions;

use super::workers::{run_as_workers, slowest_rank, write_report, WORKER_TIMEOUT};
use super::{median, Finetuning, SplitBatch, Workload};

const LORA_RANK: usize = 8;

#[derive(Args)]
pub struct DpArgs {
    #[command(flatten)]
    split: SplitBatch,
    #[arg(long, hide = true)]
    report_to: Option<PathBuf>,
}

pub fn run(args: DpArgs) -> Result<()> {
    args.split.check()?;
    if let Some(report) = &args.report_to {
        return worker(&args, report);
    }
    let n = args.split.nproc;
    eprintln!("1 process with {n} threads:");
    let single = Measured::parse(&run_as_workers(1, n, "dp-single")?)?;
    eprintln!("{n} processes with 1 thread each:");
    let parallel = Measured::parse(&run_as_workers(n, 1, "dp-parallel")?)?;
    let tokens = (args.split.batch * args.split.seq) as f64;
    println!(
        "model           {} (random weights), LoRA r={LORA_RANK} on all linears, f32, gradient checkpointing on",
        args.split.model_config.display()
    );
    println!(
        "step            {} x {} tokens in total, median of {} steps after 1 warm-up",
        args.split.batch, args.split.seq, args.split.steps
    );
    for (layout, measured) in [
        (format!("1 process x {n} threads"), &single),
        (format!("{n} processes x 1 thread"), &parallel),
    ] {
        println!(
            "{layout:<24} {:>7.3} s/step {:>9.1} tokens/s   last loss {:.6}",
            measured.step_seconds,
            tokens / measured.step_seconds,
            measured.last_loss
        );
    }
    println!(
        "ratio                    {:.2} (data-parallel tokens/s over single-process tokens/s)",
        single.step_seconds / parallel.step_seconds
    );
    Ok(())
}

/// What a run's workers report: the median step time and the last step's loss (the same in
/// both runs up to rounding, as they train the same model on the same batch).
struct Measured {
    step_seconds: f64,
    last_loss: f64,
}

impl Measured {
    fn parse(report: &str) -> Result<Self> {
        let mut fields = report.split_whitespace().map(str::parse::<f64>);
        match (fields.next(), fields.next()) {
            (Some(Ok(step_seconds)), Some(Ok(last_loss))) => Ok(Self {
                step_seconds,
                last_loss,
            }),
            _ => bail!(
                "the benchmark workers reported '{}', not a time and a loss",
                report.trim()
            ),
        }
    }
}

fn worker(args: &DpArgs, report: &Path) -> Result<()> {
    let group = ff_dist::init_from_env(WORKER_TIMEOUT)?;
    let (rank, world) = (group.rank(), group.world_size());
    let mut workload = Workload::new(
        &args.split.model_config,
        DType::F32,
        Finetuning::Lora,
        LORA_RANK,
    )?;
    let batch = args.split.rank_batch(rank, world, workload.vocab);
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: true,
    };
    let timings = workload.timed_steps(&batch, args.split.steps, options, group.as_ref())?;
    let seconds = median(slowest_rank(group.as_ref(), &timings.seconds)?);
    let mut text = String::new();
    writeln!(text, "{seconds} {}", timings.last_loss)?;
    write_report(group.as_ref(), report, &text)
}
