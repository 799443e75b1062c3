//! Records, for `ferrofactory env`, the compiler this binary was built with and the candle
//! version the workspace's Cargo.lock pins.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FERROFACTORY_RUSTC_VERSION={rustc_version}");

    let lock = concat!(env!("CARGO_MANIFEST_DIR"), "/../../Cargo.lock");
    println!("cargo:rerun-if-changed={lock}");
    let candle_version = std::fs::read_to_string(lock)
        .ok()
        .and_then(|text| locked_version(&text, "candle-core"));
    if candle_version.is_none() {
        // Cargo.lock caught mid-rewrite: a watched path that does not exist makes Cargo run
        // this script again on the next build instead of keeping "unknown".
        println!("cargo:rerun-if-changed={lock}.retry");
    }
    println!(
        "cargo:rustc-env=FERROFACTORY_CANDLE_VERSION={}",
        candle_version.as_deref().unwrap_or("unknown")
    );
    println!("cargo:rerun-if-changed=build.rs");
}

/// The version Cargo.lock records for `package`: the `version = "…"` line after its name.
fn locked_version(lock: &str, package: &str) -> Option<String> {
    let name_line = format!("name = \"{package}\"");
    let mut lines = lock.lines();
    lines.find(|line| line.trim() == name_line)?;
    let version = lines.next()?.trim().strip_prefix("version = \"")?;
    Some(version.trim_end_matches('"').to_string())
}
