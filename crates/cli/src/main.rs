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
        /// `key=value` pairs that override the file; `--output` may come before or after them.
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
        print_error(&e.chain().map(|cause| cause.to_string()).collect::<Vec<_>>());
        ExitCode::FAILURE
    })
}

/// Prints `error: ` and the causes of an error as one line (see [`one_line`]). The line goes
/// out in one write, so that the ranks of a launch failing alike cannot interleave their lines.
fn print_error(causes: &[String]) {
    use std::io::Write;
    // Nothing is left to report a failed write of the report itself to.
    let _ = std::io::stderr().write_all(one_line(causes).as_bytes());
}

/// `error: ` and the causes joined by `: `, skipping a cause whose words the line already holds
/// (library errors name their source in their own message).
fn one_line(causes: &[String]) -> String {
    let mut line = String::from("error:");
    for cause in causes {
        if !line.contains(cause.as_str()) {
            line.push(' ');
            line.push_str(cause);
            line.push(':');
        }
    }
    line.pop();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_cause_is_named_once() {
        let causes = |c: &[&str]| c.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            one_line(&causes(&[
                "cannot read x.yaml: No such file or directory (os error 2)",
                "No such file or directory (os error 2)",
            ])),
            "error: cannot read x.yaml: No such file or directory (os error 2)\n"
        );
        assert_eq!(
            one_line(&causes(&[
                "loading adapter a",
                "a/adapter_config.json is missing"
            ])),
            "error: loading adapter a: a/adapter_config.json is missing\n"
        );
    }
}
