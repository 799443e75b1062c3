//! The `ferrofactory` command line.

mod bench;

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
    /// Measure speed and memory (benchmarks, not tests).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Print the version.
    Version,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(b) => bench::run(b),
        Command::Version => {
            println!("ferrofactory {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
