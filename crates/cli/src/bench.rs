//! `ferrofactory bench`: timings of the training step on a model of real shape with random
//! weights, of Gloo's collectives, and of data-parallel training. Figures are only comparable
//! within one run on one machine.

mod collectives;
mod dp;
mod fsdp;
mod profile;
mod seeded_init;
mod workers;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Args, Subcommand, ValueEnum};
use ff_dist::ProcessGroup;
use ff_fsio::{peak_rss_bytes, PeakOf};
use ff_model::finetune::{apply_lora, make_all_trainable, LoraSpec};
use ff_model::load::from_tensors;
use ff_model::{CausalLm, ModelConfig};
use ff_train::{
    row_group_threads, train_step, AdamW, AdamWConfig, Batch, Checkpointing, Engine, Keeping,
    MicroBatchPlan, PlanInputs, StepOptions, StepPhases, Trainables,
};

#[derive(Subcommand)]
pub enum Bench {
    /// One optimizer step of fine-tuning: tokens per second and peak resident memory.
    Step(StepArgs),
    /// all_reduce and reduce_scatter bandwidth between processes on this machine (Gloo).
    Collectives(collectives::CollectivesArgs),
    /// Tokens per second of data-parallel training against one process with as many threads.
    Dp(dp::DpArgs),
    /// Tokens per second of FULL_SHARD (with and without prefetch) against one process with as
    /// many threads, and the share of time ranks wait on communication.
    Fsdp(fsdp::FsdpArgs),
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
    /// Keep gradients and AdamW moments in this folder instead of memory, as the training
    /// key `offload_optimizer_dir` does.
    #[arg(long)]
    offload_optimizer_dir: Option<PathBuf>,
}

/// What the multi-process benchmarks share: a model of real shape, a total batch split evenly
/// over N processes of one thread (against one process of N threads), and the timed steps.
#[derive(Args)]
pub struct SplitBatch {
    /// A model directory whose config.json gives the shape (weights are random).
    #[arg(long, default_value = "testdata/smollm2-135m-config")]
    model_config: PathBuf,
    /// Sequences in one optimizer step, over all processes.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps; the median is reported. One untimed warm-up step runs first.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Processes of one thread each; the single process gets this many threads.
    #[arg(long, default_value_t = 2)]
    nproc: usize,
}

impl SplitBatch {
    /// Rank `rank`'s share of the total batch: every process draws the same rows and keeps its
    /// share, so the total is the same however many processes there are.
    fn rank_batch(&self, rank: usize, world: usize, vocab: u64) -> Batch {
        let rows = random_rows(self.batch, self.seq, vocab);
        let share = self.batch / world;
        batch_of(&rows[rank * share..(rank + 1) * share])
    }

    fn check(&self) -> Result<()> {
        if self.nproc < 2 || self.steps == 0 || self.seq < 2 {
            bail!("--nproc must be at least 2, --steps positive and --seq at least 2");
        }
        if self.batch == 0 || !self.batch.is_multiple_of(self.nproc) {
            bail!(
                "--batch {} does not split evenly over {} processes; give a positive multiple of --nproc",
                self.batch,
                self.nproc
            );
        }
        Ok(())
    }
}

pub fn run(bench: Bench) -> Result<()> {
    match bench {
        Bench::Step(args) => step(args),
        Bench::Collectives(args) => collectives::run(args),
        Bench::Dp(args) => dp::run(args),
        Bench::Fsdp(args) => fsdp::run(args),
    }
}

/// A model of real shape with random weights (the same in every process), prepared for
/// fine-tuning, and its optimizer.
struct Workload {
    model: CausalLm,
    engine: Engine,
    optimizer: AdamW,
    total_params: usize,
    trained_params: usize,
    vocab: u64,
}

impl Workload {
    fn new(
        model_config: &Path,
        dtype: DType,
        finetuning: Finetuning,
        lora_rank: usize,
    ) -> Result<Self> {
        let config = ModelConfig::from_dir(model_config)
            .with_context(|| format!("reading the shape from {}", model_config.display()))?;
        let vocab = config.vocab_size as u64;
        let mut model = from_tensors(config, &seeded_init::SeededInit, dtype, &Device::Cpu)?;
        match finetuning {
            Finetuning::Lora => {
                let spec = LoraSpec {
                    rank: lora_rank,
                    alpha: 2.0 * lora_rank as f64,
                    dropout: 0.0,
                    targets: LoraSpec::parse_targets("all")?,
                    use_rslora: false,
                };
                apply_lora(&mut model, &spec, 0)?;
            }
            Finetuning::Full => make_all_trainable(&mut model)?,
        }
        let (total_params, trained_params) = model.num_params();
        let engine = Engine::Replicated(Trainables::of(&mut model));
        let optimizer = AdamW::new(AdamWConfig::default(), engine.names());
        Ok(Self {
            model,
            engine,
            optimizer,
            total_params,
            trained_params,
            vocab,
        })
    }

    /// Moves gradients and optimizer state into unnamed files in `dir`.
    fn offload(&mut self, dir: &Path) -> Result<()> {
        let Engine::Replicated(trainables) = &mut self.engine else {
            bail!("only a replicated workload offloads");
        };
        self.optimizer = trainables.offload_to(dir, AdamWConfig::default())?;
        Ok(())
    }

    /// `1 + steps` optimizer steps on `batch` (the first is an untimed warm-up). Every rank of
    /// `group` calls it with its share of the batch.
    fn timed_steps(
        &mut self,
        batch: &Batch,
        steps: usize,
        options: StepOptions,
        group: &dyn ProcessGroup,
    ) -> Result<Timings> {
        let mut times = Vec::with_capacity(steps);
        let mut phases = Vec::with_capacity(steps);
        let mut last_loss = f64::NAN;
        for i in 0..=steps {
            let start = Instant::now();
            let stats = train_step(
                &mut self.model,
                &mut self.engine,
                &mut self.optimizer,
                std::slice::from_ref(batch),
                1e-4,
                options,
                i as u64,
                group,
            )?;
            let seconds = start.elapsed().as_secs_f64();
            last_loss = stats.loss;
            if i > 0 {
                times.push(seconds);
                phases.push(stats.phases);
            }
            if group.rank() == 0 {
                eprintln!(
                    "step {i}{}: {seconds:.3} s, loss {:.4}",
                    if i == 0 { " (warm-up)" } else { "" },
                    stats.loss
                );
            }
        }
        // An offloaded update may still be running; the run's figures are not complete before it.
        self.optimizer.finish()?;
        Ok(Timings {
            seconds: times,
            phases,
            last_loss,
        })
    }
}

struct Timings {
    /// Of each timed step.
    seconds: Vec<f64>,
    /// The phases of each timed step, as the step measured them.
    phases: Vec<StepPhases>,
    /// The loss of the last step, the same on every rank.
    last_loss: f64,
}

/// `rows` deterministic pseudo-random token rows of `seq` tokens below `vocab`.
fn random_rows(rows: usize, seq: usize, vocab: u64) -> Vec<Vec<u32>> {
    let mut state = 0x5EED_u64;
    let mut next_token = || {
        state = ff_model::dropout::derive_seed(state, 1);
        (state % vocab) as u32
    };
    (0..rows)
        .map(|_| (0..seq).map(|_| next_token()).collect())
        .collect()
}

/// A batch of `rows` in which every position is a label, as in plain LM training.
fn batch_of(rows: &[Vec<u32>]) -> Batch {
    Batch {
        labels: rows
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect(),
        attention_mask: rows.iter().map(|r| vec![1; r.len()]).collect(),
        input_ids: rows.to_vec(),
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn step(args: StepArgs) -> Result<()> {
    if args.steps == 0 || args.batch == 0 || args.seq < 2 {
        bail!("--steps and --batch must be positive and --seq at least 2");
    }
    let dtype = match args.precision {
        Precision::Float32 => DType::F32,
        Precision::Bf16 => DType::BF16,
        Precision::Fp16 => DType::F16,
    };
    let mut workload = Workload::new(&args.model_config, dtype, args.finetuning, args.lora_rank)?;
    if let Some(dir) = &args.offload_optimizer_dir {
        workload.offload(dir)?;
    }
    let batch = batch_of(&random_rows(args.batch, args.seq, workload.vocab));
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: !args.no_gradient_checkpointing,
    };
    let plan = MicroBatchPlan::new(
        &PlanInputs::of(
            &workload.model,
            workload.engine.trained_in_memory(),
            options.gradient_checkpointing,
            row_group_threads(),
        ),
        args.batch,
        args.batch * args.seq,
    );
    let checkpointing = plan.checkpointing;
    let timings =
        workload.timed_steps(&batch, args.steps, options, &ff_dist::SingleProcessGroup)?;
    let measured = timings.seconds.len();
    // The step whose time is the median (as `median` picks it), so its phases add up to it.
    let mut order: Vec<usize> = (0..measured).collect();
    order.sort_by(|&a, &b| timings.seconds[a].total_cmp(&timings.seconds[b]));
    let median_step = order[measured / 2];
    let median = timings.seconds[median_step];
    let tokens = (args.batch * args.seq) as f64;
    println!("model           {}", args.model_config.display());
    println!(
        "parameters      {:.1} M total, {:.2} M trained",
        workload.total_params as f64 / 1e6,
        workload.trained_params as f64 / 1e6
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
        match checkpointing {
            Checkpointing::Off => "off".to_string(),
            Checkpointing::Layers(keeping) if keeping == Keeping::default() => "on".to_string(),
            Checkpointing::Layers(keeping) => {
                let layers = workload.model.layers.len();
                format!(
                    "on, results kept: attention's in {}/{layers} layers, the MLP's in {}/{layers}",
                    keeping.attention_layers, keeping.mlp_layers
                )
            }
        }
    );
    if let Some(dir) = &args.offload_optimizer_dir {
        println!(
            "offload         gradients and AdamW moments in {}",
            dir.display()
        );
    }
    println!("threads         {}", candle_core::utils::get_num_threads());
    println!("median step     {median:.3} s over {measured} steps");
    println!("tokens/s        {:.1}", tokens / median);
    println!("peak RSS        {}", peak_rss()?);
    let shape = profile::StepShape {
        config: &workload.model.config,
        batch: args.batch,
        seq: args.seq,
        dtype,
        finetuning: args.finetuning,
        lora_rank: args.lora_rank,
        checkpointing,
        row_groups: plan.row_groups,
    };
    profile::print(&shape, &timings.phases[median_step], median)
}

/// Peak resident set size of this process, from the kernel's high-water mark.
fn peak_rss() -> Result<String> {
    let bytes = peak_rss_bytes(PeakOf::ThisProcess).context("no VmHWM in /proc/self/status")?;
    Ok(format!("{:.2} GB", bytes as f64 / 1e9))
}
