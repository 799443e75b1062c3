//! Launch files as accelerate and LLaMA-Factory write them. The files in tests/accelerate are
//! LLaMA-Factory's examples/accelerate, copied unchanged.

use std::path::{Path, PathBuf};

use ff_config::{
    AutoWrapPolicy, BackwardPrefetch, ConfigError, DistributedType, FsdpConfig, LaunchConfig,
    MixedPrecision, ShardingStrategy, StateDictType,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/accelerate")
        .join(name)
}

fn parse(yaml: &str) -> Result<LaunchConfig, ConfigError> {
    parse_with(yaml, &[])
}

fn parse_with(yaml: &str, flags: &[(&str, &str)]) -> Result<LaunchConfig, ConfigError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("launch.yaml");
    std::fs::write(&path, yaml).unwrap();
    let flags: Vec<(String, String)> = flags
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    LaunchConfig::load(&path, &flags)
}

fn error(yaml: &str) -> String {
    parse(yaml).unwrap_err().to_string()
}

/// What LLaMA-Factory's fsdp_config.yaml asks for.
fn llama_factory_fsdp1() -> FsdpConfig {
    FsdpConfig {
        version: 1,
        sharding_strategy: ShardingStrategy::FullShard,
        auto_wrap_policy: AutoWrapPolicy::TransformerBased,
        transformer_layer_cls_to_wrap: Vec::new(),
        min_num_params: 100_000_000,
        backward_prefetch: BackwardPrefetch::BackwardPre,
        forward_prefetch: false,
        offload_params: false,
        cpu_ram_efficient_loading: true,
        sync_module_states: true,
        state_dict_type: StateDictType::FullStateDict,
        use_orig_params: true,
        activation_checkpointing: false,
    }
}

#[test]
fn llama_factory_fsdp_config_reads_as_written() {
    let config = LaunchConfig::load(&fixture("fsdp_config.yaml"), &[]).unwrap();
    assert_eq!(config.distributed_type, DistributedType::Fsdp);
    assert_eq!(config.mixed_precision, MixedPrecision::Bf16);
    assert_eq!((config.num_machines, config.num_processes), (1, 2));
    assert_eq!(config.machine_rank, 0);
    assert_eq!(config.main_process_ip, None);
    assert_eq!(config.fsdp, Some(llama_factory_fsdp1()));
}

#[test]
fn llama_factory_offload_config_offloads() {
    let config = LaunchConfig::load(&fixture("fsdp_config_offload.yaml"), &[]).unwrap();
    let expected = FsdpConfig {
        offload_params: true,
        ..llama_factory_fsdp1()
    };
    assert_eq!(config.fsdp, Some(expected));
    assert_eq!(config.num_processes, 2);
}

#[test]
fn llama_factory_multiple_nodes_config_spans_two_machines() {
    let config = LaunchConfig::load(&fixture("fsdp_config_multiple_nodes.yaml"), &[]).unwrap();
    assert_eq!((config.num_machines, config.num_processes), (2, 16));
    assert_eq!(config.processes_per_machine(), 8);
    assert_eq!(config.main_process_ip.as_deref(), Some("192.168.0.1"));
    assert_eq!(config.main_process_port, Some(29500));
    assert!(config.same_network);
    assert_eq!(config.fsdp, Some(llama_factory_fsdp1()));

    let second = LaunchConfig::load(
        &fixture("fsdp_config_multiple_nodes.yaml"),
        &[("machine_rank".into(), "1".into())],
    )
    .unwrap();
    assert_eq!(second.machine_rank, 1);
}

#[test]
fn llama_factory_fsdp2_config_takes_fsdp2_defaults() {
    let config = LaunchConfig::load(&fixture("fsdp2_config.yaml"), &[]).unwrap();
    let expected = FsdpConfig {
        version: 2,
        // reshard_after_forward: true
        sharding_strategy: ShardingStrategy::FullShard,
        // FSDP2 always prefetches the next unit in backward and uses the original parameters.
        backward_prefetch: BackwardPrefetch::BackwardPre,
        use_orig_params: true,
        ..llama_factory_fsdp1()
    };
    assert_eq!(config.fsdp, Some(expected));
    assert_eq!(config.num_processes, 2);
}

#[test]
fn shipped_examples_say_what_llama_factory_files_say() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/accelerate");
    for name in [
        "fsdp_config.yaml",
        "fsdp_config_offload.yaml",
        "fsdp_config_multiple_nodes.yaml",
        "fsdp2_config.yaml",
    ] {
        let ours = LaunchConfig::load(&examples.join(name), &[]).unwrap();
        let theirs = LaunchConfig::load(&fixture(name), &[]).unwrap();
        assert_eq!(ours, theirs, "{name}");
    }
}

/// A file as `accelerate config` writes it for FSDP1 with every question answered, including
/// the keys it writes for other hardware.
const ACCELERATE_WRITTEN: &str = "\
compute_environment: LOCAL_MACHINE
debug: true
distributed_type: FSDP
downcast_bf16: 'no'
dynamo_config:
  dynamo_backend: INDUCTOR
enable_cpu_affinity: false
fsdp_config:
  fsdp_activation_checkpointing: true
  fsdp_auto_wrap_policy: SIZE_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_POST
  fsdp_cpu_ram_efficient_loading: false
  fsdp_forward_prefetch: true
  fsdp_min_num_params: 2000000
  fsdp_offload_params: true
  fsdp_reshard_after_forward: SHARD_GRAD_OP
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: false
  fsdp_use_orig_params: false
  fsdp_version: 1
gpu_ids: 0,1
machine_rank: 1
main_process_ip: 10.1.2.3
main_process_port: 29501
main_training_function: main
mixed_precision: fp16
num_machines: 2
num_processes: 4
rdzv_backend: c10d
same_network: false
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
";

#[test]
fn a_file_accelerate_wrote_with_every_key_parses() {
    let config = parse(ACCELERATE_WRITTEN).unwrap();
    assert_eq!(config.mixed_precision, MixedPrecision::Fp16);
    assert_eq!(
        (
            config.num_machines,
            config.num_processes,
            config.machine_rank
        ),
        (2, 4, 1)
    );
    assert_eq!(config.main_process_ip.as_deref(), Some("10.1.2.3"));
    assert_eq!(config.main_process_port, Some(29501));
    assert_eq!(config.rdzv_backend, "c10d");
    assert!(!config.same_network);
    let expected = FsdpConfig {
        version: 1,
        sharding_strategy: ShardingStrategy::ShardGradOp,
        auto_wrap_policy: AutoWrapPolicy::SizeBased,
        transformer_layer_cls_to_wrap: Vec::new(),
        min_num_params: 2_000_000,
        backward_prefetch: BackwardPrefetch::BackwardPost,
        forward_prefetch: true,
        offload_params: true,
        cpu_ram_efficient_loading: false,
        sync_module_states: false,
        state_dict_type: StateDictType::ShardedStateDict,
        use_orig_params: false,
        activation_checkpointing: true,
    };
    assert_eq!(config.fsdp, Some(expected));
}

#[test]
fn absent_fsdp_keys_take_accelerates_defaults() {
    let config = parse("distributed_type: FSDP\nnum_processes: 2\n").unwrap();
    let fsdp = config.fsdp.unwrap();
    assert_eq!(fsdp.version, 1);
    assert_eq!(fsdp.sharding_strategy, ShardingStrategy::FullShard);
    assert_eq!(fsdp.auto_wrap_policy, AutoWrapPolicy::NoWrap);
    assert_eq!(fsdp.backward_prefetch, BackwardPrefetch::NoPrefetch);
    assert_eq!(fsdp.state_dict_type, StateDictType::FullStateDict);
    assert_eq!(fsdp.min_num_params, 100_000_000);
    assert!(fsdp.use_orig_params && fsdp.sync_module_states && fsdp.cpu_ram_efficient_loading);
    assert!(!fsdp.offload_params && !fsdp.forward_prefetch && !fsdp.activation_checkpointing);
    assert_eq!(config.mixed_precision, MixedPrecision::No);

    let v2 = parse("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n")
        .unwrap()
        .fsdp
        .unwrap();
    assert_eq!(v2.state_dict_type, StateDictType::ShardedStateDict);

    let single = parse("distributed_type: NO\n").unwrap();
    assert_eq!((single.num_processes, single.num_machines), (1, 1));
    assert_eq!(single.fsdp, None);
}

#[test]
fn accelerates_other_spellings_are_read() {
    let config = parse(
        "distributed_type: fsdp\nnum_processes: 4\nnum_machines: 2\nmain_process_ip: h\nfsdp_config:\n  \
         sharding_strategy: 4\n  backward_prefetch_policy: 1\n  state_dict_type: 3\n  \
         transformer_layer_cls_to_wrap: [LlamaDecoderLayer, Qwen2DecoderLayer]\n  auto_wrap_policy: transformer_based_wrap\n  \
         offload_params: 'yes'\n  min_num_params: 1e8\n",
    )
    .unwrap();
    let fsdp = config.fsdp.unwrap();
    assert_eq!(fsdp.sharding_strategy, ShardingStrategy::HybridShard);
    assert_eq!(fsdp.backward_prefetch, BackwardPrefetch::BackwardPre);
    assert_eq!(fsdp.state_dict_type, StateDictType::ShardedStateDict);
    assert_eq!(fsdp.auto_wrap_policy, AutoWrapPolicy::TransformerBased);
    assert_eq!(
        fsdp.transformer_layer_cls_to_wrap,
        ["LlamaDecoderLayer", "Qwen2DecoderLayer"]
    );
    assert!(fsdp.offload_params);
    assert_eq!(fsdp.min_num_params, 100_000_000);

    // FSDP2's reshard_after_forward: false is SHARD_GRAD_OP.
    let v2 = parse_with(
        "distributed_type: FSDP\nnum_processes: 2\n",
        &[
            ("fsdp_version", "2"),
            ("fsdp_reshard_after_forward", "false"),
        ],
    )
    .unwrap();
    assert_eq!(
        v2.fsdp.unwrap().sharding_strategy,
        ShardingStrategy::ShardGradOp
    );
    // Older files said fp16: true.
    let old = parse("distributed_type: NO\nfp16: true\n").unwrap();
    assert_eq!(old.mixed_precision, MixedPrecision::Fp16);
}

#[test]
fn unknown_keys_are_named_with_the_closest_known_key() {
    let err = error("distributed_type: NO\nnum_proceses: 2\n");
    assert_eq!(
        err,
        "unknown key `num_proceses`; did you mean `num_processes`?"
    );
    let err = error(
        "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_ofload_params: true\n",
    );
    assert_eq!(
        err,
        "unknown key `fsdp_config.fsdp_ofload_params`; did you mean `fsdp_offload_params`?"
    );
}

#[test]
fn bad_values_are_named() {
    let cases = [
        ("distributed_type: MULTI_TPU\n", "`distributed_type` must be NO, MULTI_CPU, MULTI_GPU or FSDP, got 'MULTI_TPU'"),
        ("distributed_type: NO\nmixed_precision: fp32\n", "`mixed_precision` must be no, fp16 or bf16, got 'fp32'"),
        ("distributed_type: MULTI_CPU\nnum_processes: two\n", "`num_processes` must be a non-negative integer, got 'two'"),
        ("distributed_type: MULTI_CPU\nnum_processes: 2\nsame_network: maybe\n", "`same_network` must be true or false, got 'maybe'"),
        ("distributed_type: MULTI_CPU\nnum_processes: 2\nmain_process_port: 70000\n", "`main_process_port` is 70000 but must be a TCP port between 1 and 65535"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: HALF_SHARD\n", "`fsdp_sharding_strategy` must be FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 3\n", "`fsdp_version` must be 1 or 2, got 3"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_auto_wrap_policy: LAYER_WRAP\n", "`fsdp_auto_wrap_policy` must be TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_backward_prefetch: EARLY\n", "`fsdp_backward_prefetch` must be BACKWARD_PRE, BACKWARD_POST or NO_PREFETCH"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_offload_params: sometimes\n", "`fsdp_offload_params` must be true or false, got 'sometimes'"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: FULL_SHARD\n", "`fsdp_reshard_after_forward` must be true or false with fsdp_version 2"),
        ("distributed_type: FSDP\nnum_processes: 2\nfsdp_config: yes please\n", "`fsdp_config` must be a mapping of fsdp_* keys"),
    ];
    for (yaml, expected) in cases {
        let err = error(yaml);
        assert!(err.starts_with(expected), "{yaml}: {err}");
    }
}

#[test]
fn combinations_that_cannot_work_are_refused_with_the_reason() {
    let fsdp = |section: &str, world: &str| {
        error(&format!(
            "distributed_type: FSDP\n{world}fsdp_config:\n{section}"
        ))
    };
    let one_machine = "num_processes: 2\n";
    let cases = [
        (fsdp("  fsdp_sharding_strategy: HYBRID_SHARD\n", one_machine), "HYBRID_SHARD shards inside each machine and replicates across machines, so it needs num_machines of at least 2"),
        (fsdp("  fsdp_sharding_strategy: NO_SHARD\n  fsdp_offload_params: true\n", one_machine), "NO_SHARD keeps no shards"),
        (fsdp("  fsdp_state_dict_type: LOCAL_STATE_DICT\n", one_machine), "fsdp_state_dict_type LOCAL_STATE_DICT is not supported"),
        (fsdp("  fsdp_cpu_ram_efficient_loading: true\n  fsdp_sync_module_states: false\n", one_machine), "fsdp_cpu_ram_efficient_loading needs fsdp_sync_module_states: true"),
        (fsdp("  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_reshard_after_forward: SHARD_GRAD_OP\n", one_machine), "fsdp_sharding_strategy FULL_SHARD and fsdp_reshard_after_forward 'SHARD_GRAD_OP' disagree"),
        (fsdp("  fsdp_sharding_strategy: HYBRID_SHARD_ZERO2\n", one_machine), "fsdp_sharding_strategy HYBRID_SHARD_ZERO2 is not supported"),
        (fsdp("  {}\n", "num_processes: 3\nnum_machines: 2\nmain_process_ip: h\n"), "num_processes 3 is not divisible by num_machines 2"),
        (error("distributed_type: MULTI_CPU\nnum_processes: 4\nnum_machines: 2\n"), "num_machines is 2 but main_process_ip is not set"),
        (error("distributed_type: MULTI_CPU\nnum_processes: 4\nnum_machines: 2\nmachine_rank: 2\nmain_process_ip: h\n"), "machine_rank 2 is not below num_machines 2"),
        (error("distributed_type: NO\nnum_processes: 2\n"), "distributed_type NO runs one process"),
        (error("distributed_type: MULTI_CPU\n"), "num_processes is not set"),
        (error("distributed_type: MULTI_CPU\nnum_processes: -1\n"), "num_processes is not set"),
        (error("num_processes: 2\n"), "the launch file does not say distributed_type"),
        (error("distributed_type: DEEPSPEED\nnum_processes: 2\n"), "distributed_type DEEPSPEED is not supported by ferrofactory"),
        (error("distributed_type: NO\nmixed_precision: fp8\n"), "mixed_precision fp8 is not supported"),
        (error("compute_environment: AMAZON_SAGEMAKER\ndistributed_type: NO\n"), "compute_environment AMAZON_SAGEMAKER is not supported"),
        (error("distributed_type: MULTI_CPU\nnum_processes: 2\nrdzv_backend: etcd\n"), "rdzv_backend `etcd` is not supported"),
        (error("distributed_type: MULTI_CPU\nnum_processes: 2\nmpirun_config:\n  mpirun_hostfile: h\n"), "mpirun_config is not supported"),
        (error("distributed_type: MULTI_CPU\nnum_processes: 4\nnum_machines: 2\nmain_process_ip: h\nmain_process_port: 0\n"), "main_process_port 0 picks a free port, which only works on one machine"),
    ];
    for (err, expected) in cases {
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }
    // Two machines make HYBRID_SHARD work.
    let hybrid = parse(
        "distributed_type: FSDP\nnum_processes: 4\nnum_machines: 2\nmain_process_ip: h\nfsdp_config:\n  fsdp_sharding_strategy: HYBRID_SHARD\n",
    )
    .unwrap();
    assert_eq!(
        hybrid.fsdp.unwrap().sharding_strategy,
        ShardingStrategy::HybridShard
    );
}

#[test]
fn a_flag_replaces_the_files_other_name_for_the_same_setting() {
    let config = parse_with(
        "distributed_type: FSDP\nnum_processes: 2\nfsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n  fsdp_backward_prefetch_policy: BACKWARD_PRE\n",
        &[("fsdp_reshard_after_forward", "SHARD_GRAD_OP"), ("fsdp_backward_prefetch", "NO_PREFETCH")],
    )
    .unwrap();
    let fsdp = config.fsdp.unwrap();
    assert_eq!(fsdp.sharding_strategy, ShardingStrategy::ShardGradOp);
    assert_eq!(fsdp.backward_prefetch, BackwardPrefetch::NoPrefetch);
}

#[test]
fn without_a_file_the_flags_give_the_world() {
    let single = LaunchConfig::without_file(&[]).unwrap();
    assert_eq!(single.num_processes, 1);
    assert_eq!(single.fsdp, None);
    let flags = [
        ("num_processes".to_string(), "2".to_string()),
        ("use_fsdp".into(), "true".into()),
    ];
    let fsdp = LaunchConfig::without_file(&flags).unwrap();
    assert_eq!(fsdp.distributed_type, DistributedType::Fsdp);
    assert_eq!(fsdp.num_processes, 2);
}
