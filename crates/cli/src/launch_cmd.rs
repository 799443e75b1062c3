//! `ferrofactory launch [--config_file F] [accelerate's flags] TRAIN.yaml [key=value …]`: the
//! launch file (or the default one `config` wrote) says how many processes on how many
//! machines and, for FSDP, how to shard; flags override it. The job then starts the way `train`
//! starts one under FORCE_TORCHRUN, with the FSDP settings handed to every worker.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use ff_config::launch::DEFAULT_MAIN_PROCESS_PORT;
use ff_config::{LaunchConfig, MixedPrecision, TrainArgs, FSDP_ENV_VAR};

use crate::config_cmd;

#[derive(Args)]
pub struct LaunchArgs {
    /// The launch file (accelerate's format) [default: the file `ferrofactory config` wrote, if
    /// there is one; else one process, or --num_processes processes data-parallel].
    #[arg(long = "config_file")]
    config_file: Option<PathBuf>,
    /// Processes of all machines together.
    #[arg(long = "num_processes")]
    num_processes: Option<String>,
    /// Machines (nodes) of the job.
    #[arg(long = "num_machines")]
    num_machines: Option<String>,
    /// This machine's rank, 0 to num_machines - 1.
    #[arg(long = "machine_rank")]
    machine_rank: Option<String>,
    /// Machine 0's address.
    #[arg(long = "main_process_ip")]
    main_process_ip: Option<String>,
    /// The rendezvous port, the same on every machine [default: a free port on one machine, 29500 on several].
    #[arg(long = "main_process_port")]
    main_process_port: Option<String>,
    /// no, fp16 or bf16.
    #[arg(long = "mixed_precision")]
    mixed_precision: Option<String>,
    /// static or c10d: either way machine 0 hosts the rendezvous.
    #[arg(long = "rdzv_backend")]
    rdzv_backend: Option<String>,
    /// true or false; no effect (the rendezvous is always at main_process_ip:main_process_port).
    #[arg(long = "same_network")]
    same_network: Option<String>,
    /// Train with FSDP (distributed_type FSDP), set up by the file's fsdp_config and the
    /// --fsdp_* flags.
    #[arg(long = "use_fsdp")]
    use_fsdp: bool,
    /// 1 or 2.
    #[arg(long = "fsdp_version")]
    fsdp_version: Option<String>,
    /// FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD (or 1 to 4).
    #[arg(long = "fsdp_sharding_strategy")]
    fsdp_sharding_strategy: Option<String>,
    /// true (FULL_SHARD) or false (SHARD_GRAD_OP); with FSDP1 also a strategy name.
    #[arg(long = "fsdp_reshard_after_forward")]
    fsdp_reshard_after_forward: Option<String>,
    /// true or false: keep parameter shards and optimizer state in host memory between uses.
    #[arg(long = "fsdp_offload_params")]
    fsdp_offload_params: Option<String>,
    /// TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP.
    #[arg(long = "fsdp_auto_wrap_policy")]
    fsdp_auto_wrap_policy: Option<String>,
    /// Comma-separated layer class names to wrap [default: the model's decoder layer].
    #[arg(long = "fsdp_transformer_layer_cls_to_wrap")]
    fsdp_transformer_layer_cls_to_wrap: Option<String>,
    /// The parameter count of a unit under SIZE_BASED_WRAP.
    #[arg(long = "fsdp_min_num_params")]
    fsdp_min_num_params: Option<String>,
    /// BACKWARD_PRE, BACKWARD_POST or NO_PREFETCH.
    #[arg(long = "fsdp_backward_prefetch")]
    fsdp_backward_prefetch: Option<String>,
    /// true or false: gather the next unit while the current one computes forward.
    #[arg(long = "fsdp_forward_prefetch")]
    fsdp_forward_prefetch: Option<String>,
    /// FULL_STATE_DICT or SHARDED_STATE_DICT.
    #[arg(long = "fsdp_state_dict_type")]
    fsdp_state_dict_type: Option<String>,
    /// true or false.
    #[arg(long = "fsdp_use_orig_params")]
    fsdp_use_orig_params: Option<String>,
    /// true or false: only rank 0 reads the weight files.
    #[arg(long = "fsdp_cpu_ram_efficient_loading")]
    fsdp_cpu_ram_efficient_loading: Option<String>,
    /// true or false: broadcast rank 0's parameters at the start.
    #[arg(long = "fsdp_sync_module_states")]
    fsdp_sync_module_states: Option<String>,
    /// true or false: recompute each unit's forward during backward.
    #[arg(long = "fsdp_activation_checkpointing")]
    fsdp_activation_checkpointing: Option<String>,
    /// A LLaMA-Factory training YAML file.
    config: PathBuf,
    /// `key=value` pairs that override the training file.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    overrides: Vec<String>,
}

impl LaunchArgs {
    /// The flags given, named as the launch file's keys.
    fn flags(&self) -> Vec<(String, String)> {
        let given = [
            ("num_processes", &self.num_processes),
            ("num_machines", &self.num_machines),
            ("machine_rank", &self.machine_rank),
            ("main_process_ip", &self.main_process_ip),
            ("main_process_port", &self.main_process_port),
            ("mixed_precision", &self.mixed_precision),
            ("rdzv_backend", &self.rdzv_backend),
            ("same_network", &self.same_network),
            ("fsdp_version", &self.fsdp_version),
            ("fsdp_sharding_strategy", &self.fsdp_sharding_strategy),
            (
                "fsdp_reshard_after_forward",
                &self.fsdp_reshard_after_forward,
            ),
            ("fsdp_offload_params", &self.fsdp_offload_params),
            ("fsdp_auto_wrap_policy", &self.fsdp_auto_wrap_policy),
            (
                "fsdp_transformer_layer_cls_to_wrap",
                &self.fsdp_transformer_layer_cls_to_wrap,
            ),
            ("fsdp_min_num_params", &self.fsdp_min_num_params),
            ("fsdp_backward_prefetch", &self.fsdp_backward_prefetch),
            ("fsdp_forward_prefetch", &self.fsdp_forward_prefetch),
            ("fsdp_state_dict_type", &self.fsdp_state_dict_type),
            ("fsdp_use_orig_params", &self.fsdp_use_orig_params),
            (
                "fsdp_cpu_ram_efficient_loading",
                &self.fsdp_cpu_ram_efficient_loading,
            ),
            ("fsdp_sync_module_states", &self.fsdp_sync_module_states),
            (
                "fsdp_activation_checkpointing",
                &self.fsdp_activation_checkpointing,
            ),
        ];
        let mut flags: Vec<(String, String)> = given
            .into_iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| (key.to_string(), v.clone())))
            .collect();
        if self.use_fsdp {
            flags.push(("use_fsdp".into(), "true".into()));
        }
        flags
    }
}

pub fn run(args: LaunchArgs) -> Result<ExitCode> {
    let launch = read_launch_config(&args)?;
    let train_args = TrainArgs::load(&args.config, &args.overrides)?;
    train_args.require_for_training()?;
    ff_train::trainer::check_offload(&train_args)?;
    let mut overrides = args.overrides.clone();
    overrides.extend(precision_override(launch.mixed_precision, &train_args)?);

    let own_env: HashMap<String, String> = std::env::vars().collect();
    if own_env.contains_key(FSDP_ENV_VAR) {
        // Workers inherit this process's environment, and settings left over in the shell must
        // not turn a data-parallel launch into FSDP; launch alone decides them. Nothing else
        // runs yet, so changing the environment is safe.
        std::env::remove_var(FSDP_ENV_VAR);
    }
    crate::train::launch_workers(
        &args.config,
        &overrides,
        &launcher_env(&launch, own_env),
        worker_env(&launch),
    )
}

/// The named file, else the default file if `config` wrote one, else the flags alone.
fn read_launch_config(args: &LaunchArgs) -> Result<LaunchConfig> {
    let flags = args.flags();
    let file = match &args.config_file {
        Some(path) => Some(path.clone()),
        None => Some(config_cmd::default_file()?).filter(|path| path.is_file()),
    };
    match file {
        Some(path) => LaunchConfig::load(&path, &flags)
            .with_context(|| format!("launch file {}", path.display())),
        None => Ok(LaunchConfig::without_file(&flags)?),
    }
}

/// The launch file's mixed_precision becomes the training run's bf16/fp16, as accelerate's
/// ACCELERATE_MIXED_PRECISION does under HF Trainer: a training file that names a precision
/// keeps it, and one that names the other precision is refused. `no` leaves the training file's
/// choice alone.
pub(crate) fn precision_override(
    launch: MixedPrecision,
    train: &TrainArgs,
) -> Result<Option<String>> {
    let (wanted, key, other_set, other) = match launch {
        MixedPrecision::No => return Ok(None),
        MixedPrecision::Bf16 => (train.bf16, "bf16", train.fp16, "fp16"),
        MixedPrecision::Fp16 => (train.fp16, "fp16", train.bf16, "bf16"),
    };
    if other_set {
        bail!(
            "the launch file says mixed_precision {key} but the training config sets {other}: true; make them agree (or set mixed_precision no in the launch file)"
        );
    }
    Ok((!wanted).then(|| format!("{key}=true")))
}

/// The torchrun-style variables `train`'s launcher reads, from the launch file (they replace
/// any the shell has).
pub(crate) fn launcher_env(
    launch: &LaunchConfig,
    mut env: HashMap<String, String>,
) -> HashMap<String, String> {
    let mut set = |key: &str, value: String| env.insert(key.to_string(), value);
    set("NNODES", launch.num_machines.to_string());
    set("NODE_RANK", launch.machine_rank.to_string());
    set("NPROC_PER_NODE", launch.processes_per_machine().to_string());
    set(
        "MASTER_ADDR",
        launch
            .main_process_ip
            .clone()
            .unwrap_or_else(|| ff_dist::DEFAULT_MASTER_ADDR.to_string()),
    );
    // One machine without a port (or port 0) takes a free one; several default to accelerate's.
    let port = match launch.main_process_port {
        Some(0) | None if launch.num_machines == 1 => None,
        None => Some(DEFAULT_MAIN_PROCESS_PORT),
        port => port,
    };
    match port {
        Some(port) => {
            env.insert("MASTER_PORT".into(), port.to_string());
        }
        None => {
            env.remove("MASTER_PORT");
        }
    }
    env
}

/// What every worker gets besides torchrun's variables: the FSDP settings of an FSDP job.
pub(crate) fn worker_env(launch: &LaunchConfig) -> Vec<(String, String)> {
    match &launch.fsdp {
        Some(fsdp) => vec![(FSDP_ENV_VAR.to_string(), fsdp.to_env_value())],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ff_config::{FsdpConfig, ShardingStrategy};

    fn load(yaml: &str, flags: &[(&str, &str)]) -> LaunchConfig {
        let (_dir, path) = tempfile_path(yaml);
        let flags: Vec<(String, String)> = flags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchConfig::load(&path, &flags).unwrap()
    }

    fn tempfile_path(yaml: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("launch.yaml");
        std::fs::write(&path, yaml).unwrap();
        (dir, path)
    }

    #[test]
    fn two_machines_become_torchrun_variables() {
        let launch = load(
            "distributed_type: FSDP\nnum_machines: 2\nnum_processes: 8\nmain_process_ip: 10.0.0.1\nfsdp_config:\n  fsdp_sharding_strategy: HYBRID_SHARD\n",
            &[("machine_rank", "1")],
        );
        let shell = HashMap::from([
            ("NNODES".to_string(), "5".to_string()),
            ("MASTER_PORT".to_string(), "1234".to_string()),
            ("PATH".to_string(), "/bin".to_string()),
        ]);
        let env = launcher_env(&launch, shell);
        assert_eq!(env["NNODES"], "2");
        assert_eq!(env["NODE_RANK"], "1");
        assert_eq!(env["NPROC_PER_NODE"], "4");
        assert_eq!(env["MASTER_ADDR"], "10.0.0.1");
        assert_eq!(env["MASTER_PORT"], "29500");
        assert_eq!(env["PATH"], "/bin");

        let workers = worker_env(&launch);
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].0, FSDP_ENV_VAR);
        let sent: FsdpConfig = serde_json::from_str(&workers[0].1).unwrap();
        assert_eq!(sent.sharding_strategy, ShardingStrategy::HybridShard);
        assert_eq!(Some(sent), launch.fsdp);
    }

    #[test]
    fn one_machine_without_a_port_takes_a_free_one_and_no_fsdp_sends_nothing() {
        let launch = load("distributed_type: MULTI_CPU\nnum_processes: 2\n", &[]);
        let shell = HashMap::from([("MASTER_PORT".to_string(), "1234".to_string())]);
        let env = launcher_env(&launch, shell);
        assert_eq!(env["NPROC_PER_NODE"], "2");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert!(!env.contains_key("MASTER_PORT"));
        assert!(worker_env(&launch).is_empty());
        let with_port = load(
            "distributed_type: MULTI_CPU\nnum_processes: 2\nmain_process_port: 29600\n",
            &[],
        );
        assert_eq!(
            launcher_env(&with_port, HashMap::new())["MASTER_PORT"],
            "29600"
        );
    }

    #[test]
    fn launch_precision_reaches_the_training_run_unless_it_conflicts() {
        let train = |extra: &str| {
            let (_dir, path) = tempfile_path(&format!(
                "model_name_or_path: m\nstage: sft\nfinetuning_type: lora\n{extra}"
            ));
            TrainArgs::load(&path, &[]).unwrap()
        };
        let plain = train("");
        assert_eq!(
            precision_override(MixedPrecision::Bf16, &plain).unwrap(),
            Some("bf16=true".into())
        );
        assert_eq!(
            precision_override(MixedPrecision::No, &plain).unwrap(),
            None
        );
        assert_eq!(
            precision_override(MixedPrecision::Bf16, &train("bf16: true\n")).unwrap(),
            None
        );
        let err = precision_override(MixedPrecision::Fp16, &train("bf16: true\n")).unwrap_err();
        assert!(err.to_string().starts_with(
            "the launch file says mixed_precision fp16 but the training config sets bf16: true"
        ));
    }
}
