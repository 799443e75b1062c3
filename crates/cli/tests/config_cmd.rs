//! `ferrofactory config` answered through a pipe, and `ferrofactory launch` reading what it
//! wrote.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ff_config::{
    AutoWrapPolicy, BackwardPrefetch, DistributedType, FsdpConfig, LaunchConfig, MixedPrecision,
    ShardingStrategy, StateDictType,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs the binary in `dir` with `answers` on standard input and the cache inside `dir`.
fn ferrofactory(args: &[&str], dir: &Path, answers: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args(args)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", dir.join("cache"))
        .env_remove("MASTER_PORT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(answers.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The last line of standard error: the one-sentence error.
fn failure(output: &Output) -> String {
    assert!(!output.status.success(), "expected a failure");
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr.lines().last().unwrap_or_default().to_string()
}

fn answers(lines: &[&str]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

/// FSDP1 on one machine with every FSDP question answered away from its default.
const FSDP1_ANSWERS: &[&str] = &[
    "0",                 // this machine
    "multi-CPU",         // machine type, by name
    "",                  // one machine
    "yes",               // FSDP
    "0",                 // version 1
    "1",                 // SHARD_GRAD_OP
    "yes",               // offload
    "0",                 // TRANSFORMER_BASED_WRAP
    "no",                // not the model's own layer class
    "LlamaDecoderLayer", // the class
    "BACKWARD_POST",     // backward prefetch, by name
    "1",                 // SHARDED_STATE_DICT
    "yes",               // forward prefetch
    "",                  // use_orig_params: default yes
    "no",                // no CPU RAM efficient loading
    "no",                // no sync_module_states
    "yes",               // activation checkpointing
    "4",                 // processes
    "2",                 // bf16
];

#[test]
fn piped_answers_write_a_file_that_reads_back_to_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fsdp.yaml");
    let output = ferrofactory(
        &["config", "--config_file", file.to_str().unwrap()],
        dir.path(),
        &answers(FSDP1_ANSWERS),
    );
    succeeded(&output);
    assert!(String::from_utf8_lossy(&output.stdout).contains("configuration saved at"));
    let config = LaunchConfig::load(&file, &[]).unwrap();
    let expected_fsdp = FsdpConfig {
        version: 1,
        sharding_strategy: ShardingStrategy::ShardGradOp,
        auto_wrap_policy: AutoWrapPolicy::TransformerBased,
        transformer_layer_cls_to_wrap: vec!["LlamaDecoderLayer".into()],
        min_num_params: 100_000_000,
        backward_prefetch: BackwardPrefetch::BackwardPost,
        forward_prefetch: true,
        offload_params: true,
        cpu_ram_efficient_loading: false,
        sync_module_states: false,
        state_dict_type: StateDictType::ShardedStateDict,
        use_orig_params: true,
        activation_checkpointing: true,
    };
    assert_eq!(config.distributed_type, DistributedType::Fsdp);
    assert_eq!(config.mixed_precision, MixedPrecision::Bf16);
    assert_eq!((config.num_machines, config.num_processes), (1, 4));
    assert!(config.use_cpu);
    assert_eq!(config.fsdp, Some(expected_fsdp));
}

#[test]
fn two_machine_fsdp2_answers_give_the_world_and_resharding() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nodes.yaml");
    let output = ferrofactory(
        &["config", "--config_file", file.to_str().unwrap()],
        dir.path(),
        &answers(&[
            "0", "2", // multi-GPU
            "2", "1", // two machines, this is rank 1
            "10.0.0.7", "29511", "no", "c10d", "yes", // FSDP
            "",    // version 2
            "no",  // no resharding after forward: SHARD_GRAD_OP
            "",    // no offload
            "1",   // SIZE_BASED_WRAP
            "1e6", // min params
            "",    // SHARDED_STATE_DICT
            "",    // CPU RAM efficient loading
            "",    // no activation checkpointing
            "",    // processes: default is one per machine
            "",    // no mixed precision
        ]),
    );
    succeeded(&output);
    let config = LaunchConfig::load(&file, &[]).unwrap();
    assert_eq!(
        (
            config.num_machines,
            config.machine_rank,
            config.num_processes
        ),
        (2, 1, 2)
    );
    assert_eq!(config.main_process_ip.as_deref(), Some("10.0.0.7"));
    assert_eq!(config.main_process_port, Some(29511));
    assert_eq!(config.rdzv_backend, "c10d");
    assert!(!config.same_network && !config.use_cpu);
    assert_eq!(config.mixed_precision, MixedPrecision::No);
    let fsdp = config.fsdp.unwrap();
    assert_eq!(fsdp.version, 2);
    assert_eq!(fsdp.sharding_strategy, ShardingStrategy::ShardGradOp);
    assert_eq!(fsdp.auto_wrap_policy, AutoWrapPolicy::SizeBased);
    assert_eq!(fsdp.min_num_params, 1_000_000);
    assert_eq!(fsdp.state_dict_type, StateDictType::ShardedStateDict);
    assert_eq!(fsdp.backward_prefetch, BackwardPrefetch::BackwardPre);
}

#[test]
fn wrong_or_missing_piped_answers_are_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.yaml");
    let config = |input: &str| {
        ferrofactory(
            &["config", "--config_file", file.to_str().unwrap()],
            dir.path(),
            input,
        )
    };
    let cases = [
        (answers(&["0", "7"]), "answer `7` to \"Which type of machine are you using?\" is not one of 0 to 2 or an option's name"),
        (answers(&["1"]), "answer `AWS (Amazon SageMaker)` to \"In which compute environment are you running?\": Amazon SageMaker is not supported by ferrofactory; choose This machine"),
        (answers(&["0", "1", "two"]), "is not valid: Please enter a whole number of at least 1."),
        (answers(&["0", "1", "", "yes", "0", "HYBRID_SHARD"]), "HYBRID_SHARD replicates across machines and needs at least 2"),
        (answers(&["0", "1", "", "yes", "0", "NO_SHARD", "yes"]), "NO_SHARD keeps no shards to offload"),
        (answers(&["0", "1", "2", "0", "h", "29500", "", "no", "3"]), "enter a multiple of 2"),
        (answers(&["0", "1", ""]), "the answers ended before \"Do you want to use FullyShardedDataParallel? [yes/NO]:\" was answered; nothing was written"),
    ];
    for (input, expected) in cases {
        let output = config(&input);
        let err = failure(&output);
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
        assert!(!file.exists(), "no file after: {err}");
    }
}

#[test]
fn config_default_writes_once_and_show_prints_the_file_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let default = dir.path().join("cache/ferrofactory/default_config.yaml");

    let err = failure(&ferrofactory(&["config", "show"], dir.path(), ""));
    assert!(err.contains("there is no launch file at"), "{err}");

    succeeded(&ferrofactory(
        &["config", "default", "--mixed_precision", "bf16"],
        dir.path(),
        "",
    ));
    let config = LaunchConfig::load(&default, &[]).unwrap();
    assert_eq!(config, LaunchConfig::single_process(MixedPrecision::Bf16));

    // As accelerate: an existing default file is kept.
    std::fs::write(&default, "distributed_type: MULTI_CPU\nnum_processes: 3\n").unwrap();
    let again = ferrofactory(&["config", "default"], dir.path(), "");
    succeeded(&again);
    assert!(String::from_utf8_lossy(&again.stderr).contains("will not override"));

    let show = ferrofactory(&["config", "show"], dir.path(), "");
    succeeded(&show);
    assert_eq!(
        String::from_utf8_lossy(&show.stdout),
        "distributed_type: MULTI_CPU\nnum_processes: 3\n"
    );

    std::fs::write(
        &default,
        "distributed_type: MULTI_CPU\nnum_processes: 3\nnum_proceses: 2\n",
    )
    .unwrap();
    let err = failure(&ferrofactory(&["config", "show"], dir.path(), ""));
    assert!(
        err.ends_with("unknown key `num_proceses`; did you mean `num_processes`?"),
        "{err}"
    );
}

/// A config that trains the tiny fixture from its initial adapter (as train_cli's tests do).
fn fixture_config(dir: &Path) -> PathBuf {
    let root = root();
    let yaml = format!(
        "model_name_or_path: {model}\nadapter_name_or_path: {adapter}\nstage: sft\nfinetuning_type: lora\n\
         dataset: fixture_batch\ndataset_dir: {data}\ntemplate: empty\ncutoff_len: 64\n\
         output_dir: {out}\nlogging_steps: 1\nsave_steps: 100\nper_device_train_batch_size: 2\n\
         learning_rate: 1.0e-2\nlr_scheduler_type: constant\nmax_steps: 5\nmax_grad_norm: 1.0\n",
        model = root.join("testdata/tiny-llama").display(),
        adapter = root.join("testdata/tiny-llama-lora-init").display(),
        data = root.join("testdata/cli").display(),
        out = dir.join("out").display(),
    );
    let path = dir.join("train.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn logged_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

#[test]
fn launch_with_a_written_multi_cpu_file_trains_like_one_process() {
    let single = tempfile::tempdir().unwrap();
    let train = fixture_config(single.path());
    succeeded(&ferrofactory(
        &["train", train.to_str().unwrap()],
        single.path(),
        "",
    ));

    let double = tempfile::tempdir().unwrap();
    let file = double.path().join("multi_cpu.yaml");
    succeeded(&ferrofactory(
        &["config", "--config_file", file.to_str().unwrap()],
        double.path(),
        &answers(&["0", "1", "", "no", "2", "0"]),
    ));
    let train = fixture_config(double.path());
    let output = ferrofactory(
        &[
            "launch",
            "--config_file",
            file.to_str().unwrap(),
            train.to_str().unwrap(),
            "per_device_train_batch_size=1",
        ],
        double.path(),
        "",
    );
    succeeded(&output);

    let one = logged_losses(&single.path().join("out"));
    let two = logged_losses(&double.path().join("out"));
    assert_eq!(one.len(), 5);
    assert_eq!(two.len(), 5);
    for (step, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!((a - b).abs() / a <= 1e-4, "step {}: {a} vs {b}", step + 1);
    }
}

#[test]
fn launch_mistakes_are_one_sentence_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let train = fixture_config(dir.path());
    let train = train.to_str().unwrap();
    let launch_file = dir.path().join("launch.yaml");
    let write = |yaml: &str| std::fs::write(&launch_file, yaml).unwrap();
    let file = launch_file.to_str().unwrap();

    write(
        "distributed_type: MULTI_CPU\nnum_processes: 2\nfsdp_config:\n  fsdp_ofload_params: true\n",
    );
    let err = failure(&ferrofactory(
        &["launch", "--config_file", file, train],
        dir.path(),
        "",
    ));
    assert!(
        err.ends_with(
            "unknown key `fsdp_config.fsdp_ofload_params`; did you mean `fsdp_offload_params`?"
        ),
        "{err}"
    );
    assert!(err.contains("launch.yaml"), "names the file: {err}");

    write("distributed_type: FSDP\nnum_processes: 2\n");
    let err = failure(&ferrofactory(
        &[
            "launch",
            "--config_file",
            file,
            "--fsdp_sharding_strategy",
            "HYBRID_SHARD",
            train,
        ],
        dir.path(),
        "",
    ));
    assert!(
        err.contains("HYBRID_SHARD shards inside each machine"),
        "{err}"
    );

    write("distributed_type: MULTI_CPU\nnum_processes: 2\nmixed_precision: fp16\n");
    let err = failure(&ferrofactory(
        &["launch", "--config_file", file, train, "bf16=true"],
        dir.path(),
        "",
    ));
    assert!(
        err.contains("mixed_precision fp16 but the training config sets bf16: true"),
        "{err}"
    );

    // Without --config_file the default file is read.
    succeeded(&ferrofactory(&["config", "default"], dir.path(), ""));
    let err = failure(&ferrofactory(
        &["launch", "--num_processes", "2", train],
        dir.path(),
        "",
    ));
    assert!(
        err.contains("distributed_type NO runs one process"),
        "{err}"
    );

    let err = failure(&ferrofactory(
        &["launch", "--config_file", "missing.yaml", train],
        dir.path(),
        "",
    ));
    assert!(err.contains("cannot read missing.yaml"), "{err}");
    assert!(!dir.path().join("out").exists(), "no training ran");
}

/// Drives `config` on a pseudo-terminal (util-linux `script`): arrow and digit keys move the
/// menus, a refused choice or a wrong answer is shown and asked again.
#[test]
fn on_a_terminal_menus_take_arrow_keys_and_wrong_answers_are_asked_again() {
    const DOWN: &str = "\x1b[B";
    const UP: &str = "\x1b[A";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tty.yaml");
    let command = format!(
        "{} config --config_file {}",
        env!("CARGO_BIN_EXE_ferrofactory"),
        file.display()
    );
    let keys = [
        DOWN, "\r", // AWS: refused, the menu stays
        UP, "\r", // this machine
        "1", "\r",  // multi-CPU by its digit
        "x\r", // not a number: asked again
        "\r",  // one machine
        "yes\r", "\r",    // FSDP, version 2
        "\r",    // reshard after forward
        "yes\r", // offload
        "2", "\r", // NO_WRAP
        "\r", // SHARDED_STATE_DICT
        "\r", "yes\r", // CPU RAM efficient loading, activation checkpointing
        "2\r",   // processes
        DOWN, DOWN, "\r", // bf16
    ]
    .concat();
    let mut child = Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux `script` runs");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(keys.as_bytes()).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("config did not finish on the terminal");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(stdin);
    let output = child.wait_with_output().unwrap();
    let screen = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{screen}");
    assert!(
        screen.contains("Amazon SageMaker is not supported"),
        "{screen}"
    );
    assert!(
        screen.contains("Please enter a whole number of at least 1."),
        "{screen}"
    );

    let config = LaunchConfig::load(&file, &[]).unwrap();
    assert_eq!(config.distributed_type, DistributedType::Fsdp);
    assert_eq!(config.num_processes, 2);
    assert_eq!(config.mixed_precision, MixedPrecision::Bf16);
    let fsdp = config.fsdp.unwrap();
    assert_eq!(fsdp.version, 2);
    assert_eq!(fsdp.sharding_strategy, ShardingStrategy::FullShard);
    assert!(fsdp.offload_params && fsdp.activation_checkpointing);
    assert_eq!(fsdp.auto_wrap_policy, AutoWrapPolicy::NoWrap);
    assert_eq!(fsdp.state_dict_type, StateDictType::ShardedStateDict);
}
