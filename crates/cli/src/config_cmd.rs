//! `ferrofactory config`: writes a launch file the way `accelerate config` does, by asking, or
//! a single-process default without asking (`config default`); `config show` prints the file
//! `launch` would use.

mod prompt;
mod questions;

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ff_config::{LaunchConfig, MixedPrecision};

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    action: Option<ConfigAction>,
    /// The launch file to write or show [default: $XDG_CACHE_HOME/ferrofactory/default_config.yaml,
    /// or ~/.cache/ferrofactory/default_config.yaml].
    #[arg(long = "config_file", global = true)]
    config_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Write a single-process launch file without asking (an existing file is kept).
    Default {
        #[arg(long = "mixed_precision", default_value = "no", value_parser = ["no", "fp16", "bf16"])]
        mixed_precision: String,
    },
    /// Print the launch file `ferrofactory launch` would use.
    Show,
}

pub fn run(args: ConfigArgs) -> Result<()> {
    let path = match args.config_file {
        Some(path) => path,
        None => default_file()?,
    };
    match args.action {
        None => {
            let config = questions::ask(&mut prompt::Asker::for_this_process())?;
            save_launch_file(&path, &config.to_yaml())?;
            println!("ferrofactory configuration saved at {}", path.display());
        }
        Some(ConfigAction::Default { mixed_precision }) => {
            // As `accelerate config default`: a file that exists is the user's, and stays.
            if path.exists() {
                eprintln!(
                    "Configuration already exists at {}, will not override. Run `ferrofactory config` to change it, or pass a different --config_file.",
                    path.display()
                );
                return Ok(());
            }
            let precision = match mixed_precision.as_str() {
                "fp16" => MixedPrecision::Fp16,
                "bf16" => MixedPrecision::Bf16,
                _ => MixedPrecision::No,
            };
            save_launch_file(&path, &LaunchConfig::single_process(precision).to_yaml())?;
            println!("ferrofactory configuration saved at {}", path.display());
        }
        Some(ConfigAction::Show) => {
            if !path.is_file() {
                bail!(
                    "there is no launch file at {}; write one with `ferrofactory config` or `ferrofactory config default`",
                    path.display()
                );
            }
            LaunchConfig::load(&path, &[])
                .with_context(|| format!("launch file {}", path.display()))?;
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            eprintln!("launch file: {}", path.display());
            print!("{text}");
        }
    }
    Ok(())
}

/// The launch file `config` writes and `launch` reads when none is named.
pub(crate) fn default_file() -> Result<PathBuf> {
    let xdg = std::env::var("XDG_CACHE_HOME").ok();
    let home = std::env::var("HOME").ok();
    match ff_config::default_launch_file(xdg.as_deref(), home.as_deref()) {
        Some(path) => Ok(path),
        None => bail!(
            "neither XDG_CACHE_HOME nor HOME is set, so there is no default launch file; pass --config_file"
        ),
    }
}

/// Writes the launch file whole or not at all, creating its folder.
fn save_launch_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(ff_fsio::write_atomically(path, |file| {
        file.write_all(text.as_bytes())
    })?)
}
