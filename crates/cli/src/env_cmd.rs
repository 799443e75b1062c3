//! `ferrofactory env`: what `llamafactory-cli env` prints — versions, the backends built in,
//! this machine's devices and the launcher variables — for bug reports and for checking a
//! node before a multi-node launch.

use std::collections::{BTreeSet, HashMap};

use anyhow::Result;

/// The variables that decide how `train` launches and joins a job, in the order printed.
const LAUNCH_VARS: &[&str] = &[
    "FORCE_TORCHRUN",
    "NNODES",
    "NODE_RANK",
    "RANK",
    "NPROC_PER_NODE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "WORLD_SIZE",
    "GROUP_RANK",
    "GLOO_SOCKET_IFNAME",
    ff_dist::RENDEZVOUS_TIMEOUT_VAR,
    ff_dist::LAUNCHED_MARKER_VAR,
    "OMP_NUM_THREADS",
    "RAYON_NUM_THREADS",
];

pub fn run() -> Result<()> {
    let env: HashMap<String, String> = std::env::vars().collect();
    print!("{}", report(&env));
    Ok(())
}

/// The whole report, one `- name: value` line per fact as llamafactory-cli writes them.
fn report(env: &HashMap<String, String>) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|text| CpuInfo::parse(&text))
        .unwrap_or_default();
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| Memory::parse(&text));
    let yes_no = |present: bool| if present { "yes" } else { "no" };
    let mut text = vec![
        (
            "ferrofactory version",
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("Platform", platform()),
        (
            "rustc version",
            env!("FERROFACTORY_RUSTC_VERSION").to_string(),
        ),
        (
            "candle version",
            env!("FERROFACTORY_CANDLE_VERSION").to_string(),
        ),
        (
            "Backends",
            format!(
                "gloo (CPU): yes; nccl: no; cuda: {}",
                yes_no(candle_core::utils::cuda_is_available())
            ),
        ),
        (
            "CPU",
            format!(
                "{}, {} logical CPUs",
                cpu.model.as_deref().unwrap_or("unknown model"),
                cpu.logical_cpus
            ),
        ),
        (
            "Available parallelism",
            std::thread::available_parallelism().map_or("unknown".into(), |n| n.to_string()),
        ),
        ("AVX-512 (avx512f)", yes_no(cpu.has("avx512f")).to_string()),
        ("AVX512_BF16", yes_no(cpu.has("avx512_bf16")).to_string()),
        (
            "Memory",
            memory.map_or("unknown".into(), |m| {
                format!(
                    "{:.1} GiB total, {:.1} GiB available",
                    gib(m.total_kib),
                    gib(m.available_kib)
                )
            }),
        ),
        ("GPUs", "none (CUDA is not built in)".to_string()),
    ]
    .into_iter()
    .map(|(name, value)| format!("- {name}: {value}\n"))
    .collect::<String>();
    text.push_str("- Launcher variables:\n");
    for var in LAUNCH_VARS {
        let value = env.get(*var).map_or("unset", String::as_str);
        text.push_str(&format!("  - {var}: {value}\n"));
    }
    text
}

fn platform() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| format!(" (kernel {})", release.trim()))
        .unwrap_or_default();
    format!(
        "{} {}{kernel}",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

fn gib(kib: u64) -> f64 {
    kib as f64 / (1024.0 * 1024.0)
}

/// What /proc/cpuinfo says about the processors.
#[derive(Debug, Default)]
struct CpuInfo {
    model: Option<String>,
    /// "processor" entries: the logical CPUs the kernel knows, which may be more than this
    /// process may use (see available parallelism).
    logical_cpus: usize,
    /// The first processor's feature flags (x86 calls them "flags", Arm "Features").
    flags: BTreeSet<String>,
}

impl CpuInfo {
    fn parse(text: &str) -> Self {
        let mut info = CpuInfo::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "processor" => info.logical_cpus += 1,
                "model name" if info.model.is_none() => info.model = Some(value.to_string()),
                "flags" | "Features" if info.flags.is_empty() => {
                    info.flags = value.split_whitespace().map(str::to_string).collect();
                }
                _ => {}
            }
        }
        info
    }

    fn has(&self, flag: &str) -> bool {
        self.flags.contains(flag)
    }
}

#[derive(Debug, PartialEq)]
struct Memory {
    total_kib: u64,
    available_kib: u64,
}

impl Memory {
    fn parse(text: &str) -> Option<Self> {
        let field = |name: &str| -> Option<u64> {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()
        };
        Some(Memory {
            total_kib: field("MemTotal")?,
            available_kib: field("MemAvailable")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_gives_model_count_and_flags() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16\n\n\
                    processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx512f avx512_bf16\n";
        let info = CpuInfo::parse(text);
        assert_eq!(info.model.as_deref(), Some("AMD EPYC 9B14"));
        assert_eq!(info.logical_cpus, 2);
        assert!(info.has("avx512f") && info.has("avx512_bf16"));
        assert!(!info.has("avx512"));
    }

    #[test]
    fn meminfo_gives_total_and_available() {
        let text = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   12288000 kB\n";
        assert_eq!(
            Memory::parse(text),
            Some(Memory {
                total_kib: 24_576_000,
                available_kib: 12_288_000
            })
        );
        assert_eq!(Memory::parse("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn launcher_variables_show_their_values_or_unset() {
        let env = HashMap::from([("NNODES".to_string(), "2".to_string())]);
        let text = report(&env);
        assert!(text.contains("  - NNODES: 2\n"), "{text}");
        assert!(text.contains("  - MASTER_ADDR: unset\n"), "{text}");
    }
}
