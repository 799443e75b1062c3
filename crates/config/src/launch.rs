//! Launch files: accelerate's config files (`accelerate config` writes them, `accelerate launch
//! --config_file` reads them), with accelerate's keys, values and defaults, typed and checked
//! before any work starts. `ferrofactory config` writes them and `ferrofactory launch` reads them.

mod fsdp_keys;
mod scalar;
mod yaml_out;

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use crate::error::closest;
use crate::value::render;
use crate::{ConfigError, FsdpConfig, ShardingStrategy};

use scalar::{read_bool, read_count, read_text};

/// The port accelerate's launcher uses when a job of several machines names none.
pub const DEFAULT_MAIN_PROCESS_PORT: u16 = 29500;

/// How the processes of a job work together (accelerate's `distributed_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DistributedType {
    /// One process.
    No,
    /// Data parallelism over processes on CPUs.
    MultiCpu,
    /// Data parallelism over accelerators; this build runs it on CPUs like MULTI_CPU.
    MultiGpu,
    /// Fully sharded data parallelism, set up by the file's `fsdp_config`.
    Fsdp,
}

impl DistributedType {
    pub fn name(self) -> &'static str {
        match self {
            DistributedType::No => "NO",
            DistributedType::MultiCpu => "MULTI_CPU",
            DistributedType::MultiGpu => "MULTI_GPU",
            DistributedType::Fsdp => "FSDP",
        }
    }

    fn parse(value: &Value) -> Result<Self, ConfigError> {
        let name = read_text("distributed_type", value)?.to_ascii_uppercase();
        match name.as_str() {
            "NO" => Ok(DistributedType::No),
            "MULTI_CPU" => Ok(DistributedType::MultiCpu),
            "MULTI_GPU" => Ok(DistributedType::MultiGpu),
            "FSDP" => Ok(DistributedType::Fsdp),
            "DEEPSPEED" | "MEGATRON_LM" | "XLA" | "TP" | "MULTI_XPU" | "MULTI_HPU" | "MULTI_NPU"
            | "MULTI_MLU" | "MULTI_SDAA" | "MULTI_MUSA" | "MULTI_NEURON" => {
                Err(ConfigError::Invalid(format!(
                    "distributed_type {name} is not supported by ferrofactory; use NO, MULTI_CPU, MULTI_GPU or FSDP"
                )))
            }
            _ => Err(ConfigError::BadValue {
                key: "distributed_type".into(),
                expected: "NO, MULTI_CPU, MULTI_GPU or FSDP",
                got: render(value),
            }),
        }
    }
}

/// accelerate's `mixed_precision`: the compute precision the training run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

impl MixedPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    pub fn parse(key: &str, value: &Value) -> Result<Self, ConfigError> {
        if value.is_null() {
            return Ok(MixedPrecision::No);
        }
        let name = read_text(key, value)?.to_ascii_lowercase();
        match name.as_str() {
            "no" | "false" => Ok(MixedPrecision::No),
            "fp16" => Ok(MixedPrecision::Fp16),
            "bf16" => Ok(MixedPrecision::Bf16),
            "fp8" => Err(ConfigError::Invalid(format!(
                "{key} fp8 is not supported by ferrofactory; use no, fp16 or bf16"
            ))),
            _ => Err(ConfigError::BadValue {
                key: key.into(),
                expected: "no, fp16 or bf16",
                got: render(value),
            }),
        }
    }
}

/// What a launch file (plus `launch`'s flags) says about the job.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchConfig {
    pub distributed_type: DistributedType,
    pub mixed_precision: MixedPrecision,
    /// Machines (nodes) of the job.
    pub num_machines: usize,
    /// Processes of all machines together, as accelerate counts them.
    pub num_processes: usize,
    /// This machine's rank, 0 to num_machines - 1.
    pub machine_rank: usize,
    /// The address of machine 0, where the rendezvous store runs.
    pub main_process_ip: Option<String>,
    /// The rendezvous port; `None` (or 0 on one machine) picks a free one on one machine.
    pub main_process_port: Option<u16>,
    /// `static` or `c10d`: either way machine 0 hosts the rendezvous at the main process address.
    pub rdzv_backend: String,
    pub same_network: bool,
    pub use_cpu: bool,
    /// The settings of `fsdp_config`, present exactly when `distributed_type` is FSDP.
    pub fsdp: Option<FsdpConfig>,
}

/// Top-level keys that shape the job.
const KEYS: &[&str] = &[
    "compute_environment",
    "distributed_type",
    "mixed_precision",
    "num_machines",
    "num_processes",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "rdzv_backend",
    "same_network",
    "use_cpu",
    "fsdp_config",
];

/// Keys accelerate writes that tune what this build does not have (TPUs, torch.compile, GPU
/// selection, debug checks, other engines' sections); they are read and have no effect.
pub const LAUNCH_KEYS_WITHOUT_EFFECT: &[&str] = &[
    "debug",
    "downcast_bf16",
    "gpu_ids",
    "main_training_function",
    "enable_cpu_affinity",
    "dynamo_config",
    "dynamo_backend",
    "deepspeed_config",
    "megatron_lm_config",
    "fp8_config",
    "tpu_name",
    "tpu_zone",
    "tpu_use_cluster",
    "tpu_use_sudo",
    "tpu_vm",
    "tpu_env",
    "command_file",
    "commands",
];

/// Sections that would change how accelerate starts the job; accepted only when empty.
const EMPTY_SECTIONS: &[(&str, &str)] = &[
    (
        "parallelism_config",
        "ferrofactory shards with fsdp_config alone; use fsdp_sharding_strategy HYBRID_SHARD to replicate across machines",
    ),
    (
        "mpirun_config",
        "ferrofactory does not start jobs through mpirun; run `ferrofactory launch` on each machine with its machine_rank",
    ),
];

/// The file's mapping, with the flags applied, before it is typed.
struct Keys {
    mapping: Mapping,
}

impl LaunchConfig {
    /// Reads a launch file and applies `launch`'s flags (`(key, value)` pairs named as the
    /// file's keys; `fsdp_*` keys go into `fsdp_config`, `use_fsdp` selects FSDP).
    pub fn load(path: &Path, flags: &[(String, String)]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let value: Value = serde_yaml::from_str(&text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        match value {
            Value::Mapping(mapping) => Self::from_mapping(mapping, flags),
            _ => Err(ConfigError::NotAMapping {
                path: path.to_path_buf(),
            }),
        }
    }

    /// The job without a launch file: one process, or `--num_processes` processes
    /// data-parallel on CPUs, as the flags say.
    pub fn without_file(flags: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut mapping = Mapping::new();
        mapping.insert("distributed_type".into(), "MULTI_CPU".into());
        mapping.insert("num_processes".into(), 1.into());
        mapping.insert("use_cpu".into(), true.into());
        Self::from_mapping(mapping, flags)
    }

    /// What `ferrofactory config default` writes: one process on this machine.
    pub fn single_process(mixed_precision: MixedPrecision) -> Self {
        LaunchConfig {
            distributed_type: DistributedType::No,
            mixed_precision,
            num_machines: 1,
            num_processes: 1,
            machine_rank: 0,
            main_process_ip: None,
            main_process_port: None,
            rdzv_backend: "static".into(),
            same_network: false,
            use_cpu: true,
            fsdp: None,
        }
    }

    pub fn from_mapping(mapping: Mapping, flags: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut keys = Keys { mapping };
        for (key, raw) in flags {
            keys.apply_flag(key, raw)?;
        }
        keys.into_config()
    }

    /// Processes on each machine.
    pub fn processes_per_machine(&self) -> usize {
        self.num_processes / self.num_machines
    }

    /// The launch file's text, with accelerate's key names, sorted as accelerate writes them.
    pub fn to_yaml(&self) -> String {
        yaml_out::write(self)
    }

    /// Refuses combinations that cannot work, saying why, before any work starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |text: String| Err(ConfigError::Invalid(text));
        if self.num_machines == 0 {
            return invalid("num_machines must be at least 1".into());
        }
        if self.num_processes == 0 {
            return invalid("num_processes must be at least 1".into());
        }
        if self.machine_rank >= self.num_machines {
            return invalid(format!(
                "machine_rank {} is not below num_machines {}; number the machines 0 to {}",
                self.machine_rank,
                self.num_machines,
                self.num_machines - 1
            ));
        }
        if !self.num_processes.is_multiple_of(self.num_machines) {
            return invalid(format!(
                "num_processes {} is not divisible by num_machines {}; num_processes counts the processes of all machines together, so give each machine the same number",
                self.num_processes, self.num_machines
            ));
        }
        if self.distributed_type == DistributedType::No
            && (self.num_processes > 1 || self.num_machines > 1)
        {
            return invalid(format!(
                "distributed_type NO runs one process, but num_processes is {} and num_machines {}; set distributed_type to MULTI_CPU or FSDP (or pass --use_fsdp)",
                self.num_processes, self.num_machines
            ));
        }
        if self.num_machines > 1 {
            if self.main_process_ip.is_none() {
                return invalid(format!(
                    "num_machines is {} but main_process_ip is not set; set it to machine 0's address on every machine",
                    self.num_machines
                ));
            }
            if self.main_process_port == Some(0) {
                return invalid("main_process_port 0 picks a free port, which only works on one machine; set the same free port on every machine, e.g. 29500".into());
            }
        }
        if !matches!(self.rdzv_backend.as_str(), "static" | "c10d") {
            return invalid(format!(
                "rdzv_backend `{}` is not supported; use static or c10d (machine 0 hosts the rendezvous at main_process_ip:main_process_port)",
                self.rdzv_backend
            ));
        }
        if let Some(fsdp) = &self.fsdp {
            validate_fsdp(fsdp, self.num_machines)?;
        }
        Ok(())
    }
}

/// FSDP settings that cannot work together or with the job's shape.
fn validate_fsdp(fsdp: &FsdpConfig, num_machines: usize) -> Result<(), ConfigError> {
    if fsdp.sharding_strategy == ShardingStrategy::HybridShard && num_machines < 2 {
        return Err(ConfigError::Invalid(
            "fsdp_sharding_strategy HYBRID_SHARD shards inside each machine and replicates across machines, so it needs num_machines of at least 2; use FULL_SHARD on one machine".into(),
        ));
    }
    if fsdp.offload_params && fsdp.sharding_strategy == ShardingStrategy::NoShard {
        return Err(ConfigError::Invalid(
            "fsdp_offload_params moves parameter shards to host memory, but NO_SHARD keeps no shards; use FULL_SHARD or SHARD_GRAD_OP with offload, or set fsdp_offload_params to false".into(),
        ));
    }
    if fsdp.cpu_ram_efficient_loading && !fsdp.sync_module_states {
        return Err(ConfigError::Invalid(
            "fsdp_cpu_ram_efficient_loading needs fsdp_sync_module_states: true, because ranks other than 0 receive their weights from rank 0; set it to true or turn efficient loading off".into(),
        ));
    }
    Ok(())
}

impl Keys {
    fn apply_flag(&mut self, key: &str, raw: &str) -> Result<(), ConfigError> {
        let value =
            serde_yaml::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.into()));
        if key == "use_fsdp" {
            if read_bool(key, &value)? {
                self.mapping
                    .insert("distributed_type".into(), "FSDP".into());
            }
            return Ok(());
        }
        if key.starts_with("fsdp_") {
            let section = self
                .mapping
                .entry("fsdp_config".into())
                .or_insert_with(|| Value::Mapping(Mapping::new()));
            if section.is_null() {
                *section = Value::Mapping(Mapping::new());
            }
            let Value::Mapping(section) = section else {
                return Err(fsdp_config_not_a_mapping(section));
            };
            // A flag replaces whatever the file said for the same setting under another name.
            for same in fsdp_keys::same_setting(key) {
                section.remove(*same);
                section.remove(same.trim_start_matches("fsdp_"));
            }
            section.insert(key.into(), value);
            return Ok(());
        }
        self.mapping.insert(key.into(), value);
        Ok(())
    }

    fn into_config(self) -> Result<LaunchConfig, ConfigError> {
        let mut config = LaunchConfig::single_process(MixedPrecision::No);
        let mut distributed_type = None;
        let mut num_processes = None;
        let mut mixed_precision = None;
        let mut legacy_fp16 = false;
        let mut fsdp_section = Mapping::new();
        for (key, value) in &self.mapping {
            let Some(key) = key.as_str() else {
                return Err(ConfigError::Invalid(format!(
                    "launch file keys must be strings, found {}",
                    render(key)
                )));
            };
            match key {
                "compute_environment" => check_compute_environment(value)?,
                "distributed_type" => distributed_type = Some(DistributedType::parse(value)?),
                "mixed_precision" => mixed_precision = Some(MixedPrecision::parse(key, value)?),
                "num_machines" => config.num_machines = read_count(key, value)?,
                // accelerate writes -1 for "give it with --num_processes".
                "num_processes" => {
                    num_processes = match value {
                        Value::Number(n) if n.as_i64() == Some(-1) => None,
                        v => Some(read_count(key, v)?),
                    }
                }
                "machine_rank" => config.machine_rank = read_count(key, value)?,
                "main_process_ip" => {
                    config.main_process_ip = match value {
                        Value::Null => None,
                        v => Some(read_text(key, v)?).filter(|ip| !ip.is_empty()),
                    }
                }
                "main_process_port" => config.main_process_port = read_port(key, value)?,
                "rdzv_backend" => {
                    config.rdzv_backend = match value {
                        Value::Null => "static".into(),
                        v => read_text(key, v)?.to_ascii_lowercase(),
                    }
                }
                "same_network" => config.same_network = read_bool(key, value)?,
                "use_cpu" => config.use_cpu = read_bool(key, value)?,
                "fsdp_config" => {
                    fsdp_section = match value {
                        Value::Null => Mapping::new(),
                        Value::Mapping(m) => m.clone(),
                        other => return Err(fsdp_config_not_a_mapping(other)),
                    }
                }
                // accelerate's older files said `fp16: true` instead of mixed_precision.
                "fp16" => legacy_fp16 = read_bool(key, value)?,
                _ if LAUNCH_KEYS_WITHOUT_EFFECT.contains(&key) => {}
                _ => {
                    if let Some((_, reason)) = EMPTY_SECTIONS.iter().find(|(k, _)| *k == key) {
                        if is_empty_section(value) {
                            continue;
                        }
                        return Err(ConfigError::Invalid(format!(
                            "{key} is not supported: {reason}"
                        )));
                    }
                    let known = KEYS
                        .iter()
                        .chain(LAUNCH_KEYS_WITHOUT_EFFECT)
                        .chain(EMPTY_SECTIONS.iter().map(|(k, _)| k))
                        .copied();
                    return Err(ConfigError::UnknownKey {
                        key: key.to_string(),
                        suggestion: closest(key, known),
                    });
                }
            }
        }
        config.distributed_type = distributed_type.ok_or_else(|| {
            ConfigError::Invalid(
                "the launch file does not say distributed_type; set it to NO, MULTI_CPU, MULTI_GPU or FSDP".into(),
            )
        })?;
        config.mixed_precision = match (mixed_precision, legacy_fp16) {
            (Some(mp), _) => mp,
            (None, true) => MixedPrecision::Fp16,
            (None, false) => MixedPrecision::No,
        };
        config.num_processes =
            match (num_processes, config.distributed_type) {
                (Some(n), _) => n,
                (None, DistributedType::No) => 1,
                (None, _) => return Err(ConfigError::Invalid(
                    "num_processes is not set; set it in the launch file or pass --num_processes"
                        .into(),
                )),
            };
        // Every fsdp_config key is checked, but the settings only apply to FSDP jobs (as in
        // accelerate, which ignores the section otherwise).
        let fsdp = fsdp_keys::parse(&fsdp_section)?;
        config.fsdp = (config.distributed_type == DistributedType::Fsdp).then_some(fsdp);
        config.validate()?;
        Ok(config)
    }
}

fn check_compute_environment(value: &Value) -> Result<(), ConfigError> {
    if value.is_null() {
        return Ok(());
    }
    match read_text("compute_environment", value)?.as_str() {
        "LOCAL_MACHINE" => Ok(()),
        "AMAZON_SAGEMAKER" => Err(ConfigError::Invalid(
            "compute_environment AMAZON_SAGEMAKER is not supported by ferrofactory; use LOCAL_MACHINE".into(),
        )),
        _ => Err(ConfigError::BadValue {
            key: "compute_environment".into(),
            expected: "LOCAL_MACHINE",
            got: render(value),
        }),
    }
}

fn read_port(key: &str, value: &Value) -> Result<Option<u16>, ConfigError> {
    if value.is_null() {
        return Ok(None);
    }
    let port = read_count(key, value)?;
    u16::try_from(port)
        .map(Some)
        .map_err(|_| ConfigError::OutOfRange {
            key: key.into(),
            got: port.to_string(),
            range: "a TCP port between 1 and 65535 (0 picks a free one on one machine)".into(),
        })
}

fn is_empty_section(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Mapping(m) => m.is_empty(),
        _ => false,
    }
}

fn fsdp_config_not_a_mapping(value: &Value) -> ConfigError {
    ConfigError::BadValue {
        key: "fsdp_config".into(),
        expected: "a mapping of fsdp_* keys",
        got: render(value),
    }
}

/// Where `ferrofactory config` writes and `launch` looks for the launch file when none is named:
/// `$XDG_CACHE_HOME/ferrofactory/default_config.yaml`, else `~/.cache/ferrofactory/...`.
pub fn default_launch_file(xdg_cache_home: Option<&str>, home: Option<&str>) -> Option<PathBuf> {
    let cache = match xdg_cache_home.filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(home.filter(|d| !d.is_empty())?).join(".cache"),
    };
    Some(cache.join("ferrofactory").join("default_config.yaml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<LaunchConfig, ConfigError> {
        let Value::Mapping(m) = serde_yaml::from_str(yaml).unwrap() else {
            panic!("test yaml is a mapping")
        };
        LaunchConfig::from_mapping(m, &[])
    }

    #[test]
    fn written_files_read_back_the_same() {
        let mut config = LaunchConfig::single_process(MixedPrecision::Bf16);
        config.distributed_type = DistributedType::Fsdp;
        config.num_machines = 2;
        config.num_processes = 4;
        config.machine_rank = 1;
        config.main_process_ip = Some("10.0.0.1".into());
        config.main_process_port = Some(29555);
        config.same_network = true;
        config.use_cpu = false;
        for strategy in [
            ShardingStrategy::FullShard,
            ShardingStrategy::ShardGradOp,
            ShardingStrategy::NoShard,
            ShardingStrategy::HybridShard,
        ] {
            for version in [1, 2] {
                config.fsdp = Some(FsdpConfig {
                    version,
                    sharding_strategy: strategy,
                    transformer_layer_cls_to_wrap: vec!["LlamaDecoderLayer".into()],
                    min_num_params: 1000,
                    ..FsdpConfig::default()
                });
                let yaml = config.to_yaml();
                assert_eq!(parse(&yaml).unwrap(), config, "{yaml}");
            }
        }
        let single = LaunchConfig::single_process(MixedPrecision::No);
        assert_eq!(parse(&single.to_yaml()).unwrap(), single);
    }

    #[test]
    fn flags_override_the_file_and_reach_into_fsdp_config() {
        let yaml = "distributed_type: MULTI_CPU\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n";
        let Value::Mapping(m) = serde_yaml::from_str(yaml).unwrap() else {
            unreachable!()
        };
        let flags: Vec<(String, String)> = [
            ("num_processes", "4"),
            ("use_fsdp", "true"),
            ("fsdp_version", "2"),
            ("fsdp_reshard_after_forward", "false"),
            ("mixed_precision", "bf16"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = LaunchConfig::from_mapping(m, &flags).unwrap();
        assert_eq!(config.distributed_type, DistributedType::Fsdp);
        assert_eq!(config.num_processes, 4);
        assert_eq!(config.mixed_precision, MixedPrecision::Bf16);
        let fsdp = config.fsdp.unwrap();
        assert_eq!(fsdp.version, 2);
        assert_eq!(fsdp.sharding_strategy, ShardingStrategy::ShardGradOp);
    }

    #[test]
    fn default_file_honours_xdg_cache_home() {
        assert_eq!(
            default_launch_file(Some("/x/cache"), Some("/home/u")).unwrap(),
            PathBuf::from("/x/cache/ferrofactory/default_config.yaml")
        );
        assert_eq!(
            default_launch_file(None, Some("/home/u")).unwrap(),
            PathBuf::from("/home/u/.cache/ferrofactory/default_config.yaml")
        );
        assert_eq!(default_launch_file(None, None), None);
    }
}
