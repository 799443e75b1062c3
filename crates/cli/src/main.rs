//! The `ferrofactory` command line.

mod bench;
mod config_cmd;
mod cpu_threads;
mod data;
mod env_cmd;
mod export;
mod heap;
mod launch_cmd;
mod model_source;
mod peak_rss;
mod preprocess;
mod progress;
mod train;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ferrofactory",
    version,
    about = "Fine-tune LLaMA-family models in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune as `llamafactory-cli train` does (stage sft).
    Train {
        /// A LLaMA-Factory training YAML file.
        config: PathBuf,
        /// `key=value` pairs that override the file.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Write a launch file by answering accelerate's questions, as `accelerate config` does.
    Config(config_cmd::ConfigArgs),
    /// Start a training job from a launch file and accelerate's flags, as `accelerate launch`.
    Launch(Box<launch_cmd::LaunchArgs>),
    /// Write the tokenized training examples, one JSON line each, without training.
    Preprocess {
        config: PathBuf,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
        /// Write to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Merge a LoRA adapter into its base and write a Hugging Face model directory, as
    /// `llamafactory-cli export` does.
    Export {
        /// A LLaMA-Factory export YAML file.
        config: PathBuf,
        /// `key=value` pairs that override the file.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        overrides: Vec<String>,
    },
    /// Measure speed and memory (benchmarks, not tests).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Print versions, backends, devices and launcher variables, as `llamafactory-cli env`.
    Env,
    /// Print the version.
    Version,
}

fn main() -> ExitCode {
    heap::keep_freed_memory_for_reuse();
    cpu_threads::keep_elementwise_on_caller();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Train { config, overrides } => train::run(&config, &overrides),
        Command::Config(args) => config_cmd::run(args).map(|()| ExitCode::SUCCESS),
        Command::Launch(args) => launch_cmd::run(*args),
        Command::Preprocess {
            config,
            overrides,
            output,
        } => preprocess::run(&config, &overrides, output.as_ref()).map(|()| ExitCode::SUCCESS),
        Command::Export { config, overrides } => {
            export::run(&config, &overrides).map(|()| ExitCode::SUCCESS)
        }
        Command::Bench(b) => bench::run(b).map(|()| ExitCode::SUCCESS),
        Command::Env => env_cmd::run().map(|()| ExitCode::SUCCESS),
        Command::Version => {
            println!("ferrofactory {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
