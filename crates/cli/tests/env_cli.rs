//! `ferrofactory env`, run as a user runs it.

use std::process::Command;

#[test]
fn env_reports_versions_backends_devices_and_launcher_variables() {
    let output = Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .arg("env")
        .env("NNODES", "2")
        .env("MASTER_ADDR", "10.1.2.3")
        .env_remove("MASTER_PORT")
        .env_remove("FORCE_TORCHRUN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |name: &str| -> String {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("- {name}: ")))
            .unwrap_or_else(|| panic!("no `{name}` line in\n{stdout}"))
            .to_string()
    };
    assert_eq!(line("ferrofactory version"), env!("CARGO_PKG_VERSION"));
    assert!(line("rustc version").starts_with("rustc 1."), "{stdout}");
    assert!(line("candle version").starts_with("0."), "{stdout}");
    assert_eq!(line("Backends"), "gloo (CPU): yes; nccl: no; cuda: no");
    assert!(line("CPU").ends_with("logical CPUs"), "{stdout}");
    let parallelism: usize = line("Available parallelism").parse().unwrap();
    assert_eq!(
        parallelism,
        std::thread::available_parallelism().unwrap().get()
    );
    for flag in ["AVX-512 (avx512f)", "AVX512_BF16"] {
        assert!(["yes", "no"].contains(&line(flag).as_str()), "{stdout}");
    }
    assert!(line("Memory").contains("GiB total"), "{stdout}");
    assert!(line("GPUs").starts_with("none"), "{stdout}");
    assert!(stdout.contains("- Launcher variables:\n"), "{stdout}");
    for expected in [
        "  - NNODES: 2\n",
        "  - MASTER_ADDR: 10.1.2.3\n",
        "  - MASTER_PORT: unset\n",
        "  - FORCE_TORCHRUN: unset\n",
    ] {
        assert!(stdout.contains(expected), "{expected:?} in\n{stdout}");
    }
    for var in [
        "NODE_RANK",
        "RANK",
        "NPROC_PER_NODE",
        "LOCAL_RANK",
        "WORLD_SIZE",
    ] {
        assert!(
            stdout.contains(&format!("  - {var}: ")),
            "{var} in\n{stdout}"
        );
    }
}
