//! `ferrofactory bench`: timings of the training step on a model of real shape with random
//! weights. Figures are only comparable within one run on one machine.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand, ValueEnum};
use ff_model::finetune::{apply_lora, make_all_trainable, LoraSpec};
use ff_model::load::{from_tensors, RandomInit};
use ff_model::ModelConfig;
use ff_train::{train_step, AdamW, AdamWConfig, Batch, StepOptions, Trainables};

#[derive(Subcommand)]
pub enum Bench {
    /// One optimizer step of fine-tuning: tokens per second and peak resident memory.
    Step(StepArgs),
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Precision {
    Float32,
    Bf16,
    Fp16,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Finetuning {
    Lora,
    Full,
}

#[derive(Args)]
pub struct StepArgs {
    /// A model directory whose config.json gives the shape (weights are random).
    #[arg(long, default_value = "testdata/smollm2-135m-config")]
    model_config: PathBuf,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps; the median is reported. One untimed warm-up step runs first.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, value_enum, default_value = "float32")]
    precision: Precision,
    #[arg(long, value_enum, default_value = "lora")]
    finetuning: Finetuning,
    #[arg(long, default_value_t = 8)]
    lora_rank: usize,
    /// Keep the whole graph instead of recomputing each layer in backward.
    #[arg(long)]
    no_gradient_checkpointing: bool,
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Step(args) => step(args),
    }
}

fn step(args: StepArgs) -> Result<()> {
    if args.steps == 0 || args.batch == 0 || args.seq < 2 {
        bail!("--steps and --batch must be positive and --seq at least 2");
    }
    let device = Device::Cpu;
    let dtype = match args.precision {
        Precision::Float32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    };
    let config = ModelConfig::from_dir(&args.model_config)
        .with_context(|| format!("reading the shape from {}", args.model_config.display()))?;
    let vocab = config.vocab_size as u64;
    let mut model = from_tensors(config, &RandomInit, dtype, &device)?;
    match args.finetuning {
        Finetuning::Lora => {
            let spec = LoraSpec {
                rank: args.lora_rank,
                alpha: 2.0 * args.lora_rank as f64,
                dropout: 0.0,
                targets: LoraSpec::parse_targets("all")?,
                use_rslora: false,
            };
            apply_lora(&mut model, &spec, 0)?;
        }
        Finetuning::Full => make_all_trainable(&mut model)?,
    }
    let (total, trainable) = model.num_params();
    let mut trainables = Trainables::of(&mut model);
    let mut optimizer = AdamW::new(AdamWConfig::default(), &trainables.names);

    // Deterministic pseudo-random tokens; every position is a label, as in plain LM training.
    let mut state = 0x5EED_u64;
    let mut next_token = || {
        state = ff_model::dropout::derive_seed(state, 1);
        (state % vocab) as u32
    };
    let input_ids: Vec<Vec<u32>> = (0..args.batch)
        .map(|_| (0..args.seq).map(|_| next_token()).collect())
        .collect();
    let batch = Batch {
        labels: input_ids
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect(),
        attention_mask: vec![vec![1; args.seq]; args.batch],
        input_ids,
    };
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: !args.no_gradient_checkpointing,
    };

    let mut times = Vec::with_capacity(args.steps);
    for i in 0..=args.steps {
        let start = Instant::now();
        let stats = train_step(
            &model,
            &mut trainables,
            &mut optimizer,
            std::slice::from_ref(&batch),
            1e-4,
            options,
            i as u64,
            &ff_dist::SingleProcessGroup,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        if i > 0 {
            times.push(seconds);
        }
        eprintln!(
            "step {i}{}: {seconds:.3} s, loss {:.4}",
            if i == 0 { " (warm-up)" } else { "" },
            stats.loss
        );
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens = (args.batch * args.seq) as f64;
    println!("model           {}", args.model_config.display());
    println!(
        "parameters      {:.1} M total, {:.2} M trained",
        total as f64 / 1e6,
        trainable as f64 / 1e6
    );
    println!(
        "step            {} x {} tokens, {:?}, {}, gradient checkpointing {}",
        args.batch,
        args.seq,
        dtype,
        if args.finetuning == Finetuning::Lora {
            format!("LoRA r={}", args.lora_rank)
        } else {
            "full".to_string()
        },
        if options.gradient_checkpointing {
            "on"
        } else {
            "off"
        }
    );
    println!("threads         {}", candle_core::utils::get_num_threads());
    println!("median step     {median:.3} s over {} steps", times.len());
    println!("tokens/s        {:.1}", tokens / median);
    println!("peak RSS        {}", peak_rss()?);
    Ok(())
}

/// Peak resident set size of this process, from the kernel's high-water mark.
fn peak_rss() -> Result<String> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/self/status")?;
    Ok(format!("{:.2} GB", kib * 1024.0 / 1e9))
}
