//! `ferrofactory train CONFIG.yaml [key=value …]`: what `llamafactory-cli train` does for
//! stage sft, in one process or as a torchrun-style job of several.

use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use candle_core::DType;
use ff_config::{FinetuningType, TrainArgs};
use ff_model::finetune::{apply_freeze, apply_lora, make_all_trainable, LoraSpec};
use ff_model::peft::load_adapter;
use ff_model::CausalLm;
use ff_train::checkpoint::SavedWeights;
use ff_train::trainer::{train, Run};
use ff_train::TrainError;

use crate::model_source::ModelSource;
use crate::progress::Progress;

mod fsdp;
mod qlora;

/// Exit status of a run stopped by Ctrl-C, as shells report SIGINT.
pub const INTERRUPTED_EXIT: u8 = 130;

/// Tokenizer and template files copied next to the trained weights, as LLaMA-Factory saves them.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
];

pub fn run(config: &Path, overrides: &[String]) -> Result<std::process::ExitCode> {
    let args = TrainArgs::load(config, overrides)?;
    args.require_for_training()?;
    ff_train::trainer::check_offload(&args)?;
    qlora::refuse_prequantized(
        &args,
        Path::new(args.model_name_or_path.as_deref().unwrap_or_default()),
    )?;
    let env: HashMap<String, String> = std::env::vars().collect();
    if needs_launcher(&env) {
        return launch_workers(config, overrides, &env, Vec::new());
    }
    let group = ff_dist::init_from_env(Duration::from_secs(args.ddp_timeout))?;
    let main = group.rank() == 0;
    let local_rank: usize = env
        .get("LOCAL_RANK")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let model_path = PathBuf::from(args.model_name_or_path.as_deref().unwrap_or_default());
    let output_dir = PathBuf::from(args.output_dir.as_deref().unwrap_or_default());
    let dtype = if args.bf16 {
        DType::BF16
    } else if args.fp16 {
        DType::F16
    } else {
        DType::F32
    };

    let source = ModelSource::open(&model_path)?;
    // Local rank 0 preprocesses first; the other ranks then read its cache.
    if local_rank != 0 {
        group.barrier()?;
    }
    let data = crate::data::load_examples(&args, source.files_dir(), main)?;
    if local_rank == 0 {
        group.barrier()?;
    }
    let fsdp = fsdp::settings(&env)?;
    let quant = qlora::quant_format(&args);
    let mut model = if fsdp::loads_placeholder(fsdp.as_ref(), group.rank()) {
        fsdp::load_placeholder(&source, dtype, quant)?
    } else {
        source.load(dtype, quant)?
    };
    let weights = apply_finetuning(&mut model, &args)?;
    let (total, trainable) = model.num_params();
    if main {
        eprintln!(
            "trainable params: {trainable} || all params: {total} || trainable%: {:.4}",
            100.0 * trainable as f64 / total as f64
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    install_interrupt_handler(stop.clone())?;
    let mut progress = Progress::new(main);
    let outcome = train(
        &mut model,
        Run {
            args: &args,
            output_dir: output_dir.clone(),
            weights,
            base_model: model_path.display().to_string(),
            train: &data.train,
            eval: &data.eval,
            pad_token_id: data.pad_token_id,
            stop: &stop,
            group: group.as_ref(),
            fsdp,
            tokenizer_files: tokenizer_files(source.files_dir()),
            observer: &mut progress,
        },
    );
    if let Ok(summary) = &outcome {
        if let Some(memory) = &summary.memory {
            fsdp::report(group.rank(), memory);
        }
    }
    match outcome {
        Ok(_) if !main => Ok(std::process::ExitCode::SUCCESS),
        Ok(summary) => {
            eprintln!(
                "finished {} steps, train_loss {:.4}; outputs in {}",
                summary.global_step,
                summary.train_loss,
                output_dir.display()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Err(e @ TrainError::Interrupted { .. }) => {
            if main {
                eprintln!("{e}");
            }
            Ok(std::process::ExitCode::from(INTERRUPTED_EXIT))
        }
        Err(e) => Err(e.into()),
    }
}

/// torchrun's rule, as LLaMA-Factory applies it: start workers when asked to (FORCE_TORCHRUN) or
/// when the job spans several nodes, unless this process is already one of the workers.
fn needs_launcher(env: &HashMap<String, String>) -> bool {
    let flag = |key: &str| {
        env.get(key)
            .is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
    };
    if flag(ff_dist::LAUNCHED_MARKER_VAR) {
        return false;
    }
    flag("FORCE_TORCHRUN")
        || env
            .get("NNODES")
            .and_then(|n| n.trim().parse::<usize>().ok())
            .unwrap_or(1)
            > 1
}

/// Runs `train config overrides` as NPROC_PER_NODE workers of a torchrun-style job (the
/// launcher variables read from `env`) and waits for them; `extra_env` is set in every worker.
pub(crate) fn launch_workers(
    config: &Path,
    overrides: &[String],
    env: &HashMap<String, String>,
    extra_env: Vec<(String, String)>,
) -> Result<std::process::ExitCode> {
    let program = std::env::current_exe().context("finding the ferrofactory executable")?;
    let mut worker_args: Vec<OsString> = vec!["train".into(), config.as_os_str().to_owned()];
    worker_args.extend(overrides.iter().map(OsString::from));
    let mut spec = ff_dist::LaunchSpec::from_env(env, 0, program, worker_args)?;
    // Nodes must train the same thing: the file's bytes and the overrides are compared.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(config)
        .with_context(|| format!("reading {}", config.display()))?
        .hash(&mut hasher);
    overrides.hash(&mut hasher);
    extra_env.hash(&mut hasher);
    spec.env = extra_env;
    spec.config_hash = format!("{:016x}", hasher.finish());
    match ff_dist::launch(&spec) {
        Ok(()) => Ok(std::process::ExitCode::SUCCESS),
        Err(e) => {
            crate::print_error(&[e.to_string()]);
            Ok(std::process::ExitCode::from(
                e.exit_code().clamp(1, 255) as u8
            ))
        }
    }
}

/// LoRA (fresh, or continued from `adapter_name_or_path`), full, or freeze tuning.
fn apply_finetuning(model: &mut CausalLm, args: &TrainArgs) -> Result<SavedWeights> {
    match args.finetuning_type {
        FinetuningType::Lora => {
            let spec = match &args.adapter_name_or_path {
                Some(dir) if !args.create_new_adapter => load_adapter(model, Path::new(dir))
                    .with_context(|| format!("loading adapter_name_or_path {dir}"))?,
                _ => {
                    let spec = LoraSpec {
                        rank: args.lora_rank as usize,
                        alpha: args.lora_alpha(),
                        dropout: args.lora_dropout as f32,
                        targets: LoraSpec::parse_targets(&args.lora_target.joined())?,
                        use_rslora: args.use_rslora,
                    };
                    apply_lora(model, &spec, args.seed)?;
                    spec
                }
            };
            Ok(SavedWeights::Lora(spec))
        }
        FinetuningType::Full => {
            make_all_trainable(model)?;
            Ok(SavedWeights::Full)
        }
        FinetuningType::Freeze => {
            apply_freeze(
                model,
                args.freeze_trainable_layers,
                &args.freeze_trainable_modules.0,
                &args.freeze_extra_modules.0,
            )?;
            Ok(SavedWeights::Full)
        }
    }
}

/// First Ctrl-C: finish the current step, checkpoint, exit non-zero. Second: exit at once.
fn install_interrupt_handler(stop: Arc<AtomicBool>) -> Result<()> {
    ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond interrupt: stopping now without a checkpoint");
            std::process::exit(i32::from(INTERRUPTED_EXIT));
        }
        eprintln!("\ninterrupt: stopping after the current step and writing a checkpoint (Ctrl-C again to stop now)");
    })
    .context("installing the Ctrl-C handler")
}

/// The tokenizer and template files that `model_dir` has.
pub(crate) fn tokenizer_files(model_dir: &Path) -> Vec<PathBuf> {
    TOKENIZER_FILES
        .iter()
        .map(|name| model_dir.join(name))
        .filter(|path| path.is_file())
        .collect()
}
