//! FSDP through the real binary: workers started as `launch` starts them (torchrun variables
//! plus the FSDP settings in FERROFACTORY_FSDP_CONFIG), compared with one process training the
//! same global batch.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use ff_config::{AutoWrapPolicy, BackwardPrefetch, FsdpConfig, ShardingStrategy, StateDictType};
use serde_json::Value;
use support::{
    assert_success, fixture_config, fsdp_reports, largest_difference, logged_losses, Finished, Job,
};

const DEADLINE: Duration = Duration::from_secs(240);

/// Runs `ferrofactory train config overrides` in one process and returns it finished.
fn single(job: &Job, config: &Path, overrides: &[&str]) -> Finished {
    let finished = job
        .train("single", config, overrides, &[])
        .wait_until(Instant::now() + DEADLINE);
    assert_success(&finished);
    finished
}

/// Runs the same as two local workers with `fsdp` settings.
fn two_workers(
    job: &Job,
    name: &str,
    config: &Path,
    overrides: &[&str],
    fsdp: &FsdpConfig,
) -> Finished {
    let settings = fsdp.to_env_value();
    let env = [
        ("FORCE_TORCHRUN", "1"),
        ("NPROC_PER_NODE", "2"),
        (ff_config::FSDP_ENV_VAR, settings.as_str()),
    ];
    let finished = job
        .train(name, config, overrides, &env)
        .wait_until(Instant::now() + DEADLINE);
    assert_success(&finished);
    finished
}

fn assert_same_losses(one: &[f64], two: &[f64], what: &str) {
    assert_eq!(one.len(), two.len(), "{what}: {one:?} vs {two:?}");
    for (step, (a, b)) in one.iter().zip(two).enumerate() {
        assert!(
            (a - b).abs() / a.abs() <= 1e-4,
            "{what} record {}: {a} vs {b}",
            step + 1
        );
    }
}

fn eval_losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["eval_loss"].as_f64())
        .collect()
}

fn fsdp(strategy: ShardingStrategy) -> FsdpConfig {
    FsdpConfig {
        sharding_strategy: strategy,
        ..FsdpConfig::default()
    }
}

/// The strategies and options of the issue, each on 2 processes with batch 1 against 1
/// process with batch 2: same losses (training and evaluation) and the same adapter.
#[test]
fn lora_under_every_strategy_trains_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(
        dir.path(),
        "eval_dataset: fixture_batch\neval_strategy: steps\neval_steps: 2\nper_device_eval_batch_size: 2\n",
    );
    single(&job, &config, &["output_dir=one"]);
    let one = dir.path().join("one");
    let variants = [
        (
            "full_shard_prefetch",
            FsdpConfig {
                forward_prefetch: true,
                ..fsdp(ShardingStrategy::FullShard)
            },
        ),
        (
            "full_shard_offload_no_prefetch",
            FsdpConfig {
                backward_prefetch: BackwardPrefetch::NoPrefetch,
                offload_params: true,
                ..fsdp(ShardingStrategy::FullShard)
            },
        ),
        (
            "shard_grad_op_post",
            FsdpConfig {
                backward_prefetch: BackwardPrefetch::BackwardPost,
                ..fsdp(ShardingStrategy::ShardGradOp)
            },
        ),
        ("no_shard", fsdp(ShardingStrategy::NoShard)),
        (
            "size_based",
            FsdpConfig {
                auto_wrap_policy: AutoWrapPolicy::SizeBased,
                min_num_params: 1000,
                cpu_ram_efficient_loading: false,
                ..fsdp(ShardingStrategy::FullShard)
            },
        ),
        (
            "no_wrap",
            FsdpConfig {
                auto_wrap_policy: AutoWrapPolicy::NoWrap,
                ..fsdp(ShardingStrategy::FullShard)
            },
        ),
    ];
    for (name, settings) in variants {
        let output = format!("output_dir={name}");
        let finished = two_workers(
            &job,
            name,
            &config,
            &[&output, "per_device_train_batch_size=1"],
            &settings,
        );
        let two = dir.path().join(name);
        assert_same_losses(&logged_losses(&one), &logged_losses(&two), name);
        assert_same_losses(&eval_losses(&one), &eval_losses(&two), name);
        assert_eq!(
            eval_losses(&two).len(),
            2,
            "{name}: evaluation at steps 2 and 4"
        );
        let final_eval = |dir: &Path| -> f64 {
            let text = std::fs::read_to_string(dir.join("eval_results.json")).unwrap();
            serde_json::from_str::<Value>(&text).unwrap()["eval_loss"]
                .as_f64()
                .unwrap()
        };
        assert_same_losses(&[final_eval(&one)], &[final_eval(&two)], name);
        let diff = largest_difference(
            &one.join("adapter_model.safetensors"),
            &two.join("adapter_model.safetensors"),
        );
        assert!(diff < 1e-4, "{name}: adapters differ by {diff}");
        let diff = largest_difference(
            &one.join("checkpoint-5/optimizer.safetensors"),
            &two.join("checkpoint-5/optimizer.safetensors"),
        );
        assert!(diff < 1e-4, "{name}: optimizer states differ by {diff}");
        let sharded = settings.sharding_strategy != ShardingStrategy::NoShard;
        assert_eq!(
            finished.stderr.contains("fsdp rank 1:"),
            sharded,
            "{name}: a sharded run reports each rank's memory:\n{}",
            finished.stderr
        );
    }
}

/// A config that fully fine-tunes the tiny fixture (no adapter).
fn full_config(dir: &Path) -> std::path::PathBuf {
    let config = fixture_config(dir, "");
    let text = std::fs::read_to_string(&config).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("adapter_name_or_path"))
        .map(|l| {
            if l.starts_with("finetuning_type") {
                "finetuning_type: full\nlearning_rate: 1.0e-3".to_string()
            } else if l.starts_with("learning_rate") {
                String::new()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn full_finetuning_under_sharding_trains_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = full_config(dir.path());
    single(&job, &config, &["output_dir=one", "max_steps=3"]);
    let one = dir.path().join("one");
    let variants = [
        ("full_shard", fsdp(ShardingStrategy::FullShard)),
        (
            "shard_grad_op",
            FsdpConfig {
                backward_prefetch: BackwardPrefetch::NoPrefetch,
                ..fsdp(ShardingStrategy::ShardGradOp)
            },
        ),
        ("no_shard", fsdp(ShardingStrategy::NoShard)),
    ];
    for (name, settings) in variants {
        let output = format!("output_dir={name}");
        let finished = two_workers(
            &job,
            name,
            &config,
            &[&output, "max_steps=3", "per_device_train_batch_size=1"],
            &settings,
        );
        let two = dir.path().join(name);
        assert_same_losses(&logged_losses(&one), &logged_losses(&two), name);
        let diff = largest_difference(
            &one.join("model.safetensors"),
            &two.join("model.safetensors"),
        );
        assert!(diff < 1e-5, "{name}: models differ by {diff}");
        if settings.sharding_strategy == ShardingStrategy::FullShard {
            assert_holds_half(&finished.stderr);
        }
    }
}

/// Each rank's parameter and optimizer bytes are at most half the single-process figure plus
/// one unit, by the engine's own accounting.
fn assert_holds_half(stderr: &str) {
    let reports = fsdp_reports(stderr);
    assert_eq!(reports.len(), 2, "{stderr}");
    // rank, parameter bytes held, model bytes, optimizer bytes, largest unit, ...
    let optimizer_total: u64 = reports.iter().map(|r| r[3]).sum();
    for r in &reports {
        let (held, model, optimizer, unit) = (r[1], r[2], r[3], r[4]);
        assert!(optimizer > 0 && held > 0, "{stderr}");
        assert!(
            held + optimizer <= (model + optimizer_total) / 2 + unit,
            "rank {} holds {held} + {optimizer} bytes of {model} + {optimizer_total}",
            r[0]
        );
        assert!(held < model, "{stderr}");
    }
}

#[test]
fn a_sharded_state_dict_checkpoint_resumes_to_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "");
    let settings = FsdpConfig {
        state_dict_type: StateDictType::ShardedStateDict,
        ..fsdp(ShardingStrategy::FullShard)
    };
    let overrides = ["per_device_train_batch_size=1", "save_steps=2"];
    let mut straight = vec!["output_dir=straight"];
    straight.extend(overrides);
    two_workers(&job, "straight", &config, &straight, &settings);
    let checkpoint = dir.path().join("straight/checkpoint-2");
    for file in [
        "fsdp_rank0_of_2.safetensors",
        "fsdp_rank1_of_2.safetensors",
        "fsdp_sharded.json",
        "trainer_state.json",
    ] {
        assert!(checkpoint.join(file).is_file(), "checkpoint-2 has {file}");
    }
    assert!(!checkpoint.join("adapter_model.safetensors").exists());

    let resume = format!("resume_from_checkpoint={}", checkpoint.display());
    let mut resumed = vec!["output_dir=resumed", resume.as_str()];
    resumed.extend(overrides);
    two_workers(&job, "resumed", &config, &resumed, &settings);
    let all = logged_losses(&dir.path().join("straight"));
    let after = logged_losses(&dir.path().join("resumed"));
    assert_eq!(all.len(), 5);
    assert_same_losses(&all[2..], &after, "steps 3 to 5 after resuming at step 2");
    let diff = largest_difference(
        &dir.path().join("straight/adapter_model.safetensors"),
        &dir.path().join("resumed/adapter_model.safetensors"),
    );
    assert!(diff < 1e-6, "adapters differ by {diff}");

    // `export` joins the shards of checkpoint-2 into the adapter a FULL_STATE_DICT run of the
    // same settings saved at step 2, and merges it the same.
    let full_dict = FsdpConfig {
        state_dict_type: StateDictType::FullStateDict,
        ..settings.clone()
    };
    let mut full = vec!["output_dir=full_dict"];
    full.extend(overrides);
    two_workers(&job, "full_dict", &config, &full, &full_dict);
    for (name, adapter) in [
        ("from_shards", checkpoint.clone()),
        ("from_full", dir.path().join("full_dict/checkpoint-2")),
    ] {
        let export_config = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &export_config,
            format!(
                "model_name_or_path: {}\nadapter_name_or_path: {}\nfinetuning_type: lora\ntemplate: empty\nexport_dir: {}\n",
                support::root().join("testdata/tiny-llama").display(),
                adapter.display(),
                dir.path().join(name).display()
            ),
        )
        .unwrap();
        let exported = job
            .spawn(
                name,
                job.command(&["export", export_config.to_str().unwrap()], &[]),
            )
            .wait_until(Instant::now() + DEADLINE);
        assert_success(&exported);
    }
    let diff = largest_difference(
        &dir.path().join("from_shards/model.safetensors"),
        &dir.path().join("from_full/model.safetensors"),
    );
    assert!(diff < 1e-6, "exports differ by {diff}");

    // A FULL_STATE_DICT checkpoint (whole moments) resumes under sharding to the same losses.
    let resume_full = format!(
        "resume_from_checkpoint={}",
        dir.path().join("full_dict/checkpoint-2").display()
    );
    let mut resumed_full = vec!["output_dir=resumed_full", resume_full.as_str()];
    resumed_full.extend(overrides);
    two_workers(&job, "resumed_full", &config, &resumed_full, &full_dict);
    assert_same_losses(
        &logged_losses(&dir.path().join("full_dict"))[2..],
        &logged_losses(&dir.path().join("resumed_full")),
        "steps 3 to 5 after resuming a FULL_STATE_DICT checkpoint",
    );

    // The same checkpoint cannot be resumed by another number of ranks.
    let finished = job
        .train(
            "one_rank",
            &config,
            &[
                "output_dir=one_rank",
                resume.as_str(),
                "per_device_train_batch_size=1",
            ],
            &[(ff_config::FSDP_ENV_VAR, settings.to_env_value().as_str())],
        )
        .wait_until(Instant::now() + DEADLINE);
    assert!(!finished.status.success());
    assert!(
        finished
            .last_error_line()
            .contains("by 2 ranks; resume it with 2 ranks"),
        "{}",
        finished.stderr
    );
}

/// A dataset of the fixture's two examples twice, so that 4 ranks each get one.
fn four_example_dataset(dir: &Path) -> std::path::PathBuf {
    let data = dir.join("data4");
    std::fs::create_dir_all(&data).unwrap();
    let source = support::root().join("testdata/cli/fixture_batch.json");
    let examples: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(source).unwrap()).unwrap();
    let doubled: Vec<Value> = examples.iter().chain(&examples).cloned().collect();
    std::fs::write(
        data.join("fixture_batch.json"),
        serde_json::to_string(&doubled).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        support::root().join("testdata/cli/dataset_info.json"),
        data.join("dataset_info.json"),
    )
    .unwrap();
    data
}

/// Two launchers as two nodes of two processes. HYBRID_SHARD shards within a node, whose ranks
/// read each other's frozen shards from shared memory; FULL_SHARD shards over all four ranks,
/// whose frozen shards then travel through Gloo.
#[test]
fn sharding_on_two_nodes_and_accumulation_train_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let data = four_example_dataset(dir.path());
    let config = fixture_config(dir.path(), "");
    let data_dir = format!("dataset_dir={}", data.display());
    single(
        &job,
        &config,
        &[
            "output_dir=one",
            &data_dir,
            "per_device_train_batch_size=4",
            "max_steps=3",
        ],
    );
    for (strategy, out) in [
        (ShardingStrategy::HybridShard, "hybrid"),
        (ShardingStrategy::FullShard, "full_shard_two_nodes"),
    ] {
        let settings = fsdp(strategy).to_env_value();
        let port = support::free_port().to_string();
        let output_dir = format!("output_dir={out}");
        let nodes: Vec<_> = (0..2)
            .map(|node| {
                let rank = node.to_string();
                let env = [
                    ("FORCE_TORCHRUN", "1"),
                    ("NNODES", "2"),
                    ("NODE_RANK", rank.as_str()),
                    ("NPROC_PER_NODE", "2"),
                    ("MASTER_ADDR", "127.0.0.1"),
                    ("MASTER_PORT", port.as_str()),
                    (ff_config::FSDP_ENV_VAR, settings.as_str()),
                ];
                job.train(
                    &format!("{out}-node{node}"),
                    &config,
                    &[
                        &output_dir,
                        &data_dir,
                        "per_device_train_batch_size=1",
                        "max_steps=3",
                    ],
                    &env,
                )
            })
            .collect();
        let deadline = Instant::now() + DEADLINE;
        for node in nodes {
            assert_success(&node.wait_until(deadline));
        }
        assert_same_losses(
            &logged_losses(&dir.path().join("one")),
            &logged_losses(&dir.path().join(out)),
            out,
        );
    }

    // Gradient accumulation under FULL_SHARD: 2 ranks x batch 1 x 2 micro-batches.
    two_workers(
        &job,
        "accumulated",
        &config,
        &[
            "output_dir=accumulated",
            &data_dir,
            "per_device_train_batch_size=1",
            "gradient_accumulation_steps=2",
            "max_steps=3",
        ],
        &fsdp(ShardingStrategy::FullShard),
    );
    assert_same_losses(
        &logged_losses(&dir.path().join("one")),
        &logged_losses(&dir.path().join("accumulated")),
        "FULL_SHARD with gradient accumulation",
    );
}

#[test]
fn settings_that_cannot_work_are_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "");
    let cases = [
        (fsdp(ShardingStrategy::HybridShard), "HYBRID_SHARD"),
        (
            FsdpConfig {
                offload_params: true,
                ..fsdp(ShardingStrategy::NoShard)
            },
            "offload",
        ),
        (
            FsdpConfig {
                transformer_layer_cls_to_wrap: vec!["BertLayer".into()],
                ..fsdp(ShardingStrategy::FullShard)
            },
            "LlamaDecoderLayer",
        ),
    ];
    for (i, (settings, expected)) in cases.into_iter().enumerate() {
        let output = format!("output_dir=refused{i}");
        let settings = settings.to_env_value();
        let finished = job
            .train(
                &format!("refused{i}"),
                &config,
                &[&output, "per_device_train_batch_size=1"],
                &[
                    ("FORCE_TORCHRUN", "1"),
                    ("NPROC_PER_NODE", "2"),
                    (ff_config::FSDP_ENV_VAR, settings.as_str()),
                ],
            )
            .wait_until(Instant::now() + DEADLINE);
        assert!(!finished.status.success(), "case {i}");
        assert!(!finished.stderr.contains("panicked"), "{}", finished.stderr);
        assert!(
            finished.stderr.contains(expected),
            "case {i} names {expected}:\n{}",
            finished.stderr
        );
        assert!(
            !dir.path()
                .join(format!("refused{i}/trainer_log.jsonl"))
                .exists(),
            "case {i}: no training ran"
        );
    }
}

/// FSDP+QLoRA: the NF4 base is sharded like any frozen weight, so each rank holds about half
/// of the quantized bytes, and training matches one QLoRA process.
#[test]
fn qlora_under_full_shard_trains_like_one_process_with_half_the_quantized_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "quantization_bit: 4\n");
    single(&job, &config, &["output_dir=one"]);
    let finished = two_workers(
        &job,
        "two",
        &config,
        &["output_dir=two", "per_device_train_batch_size=1"],
        &fsdp(ShardingStrategy::FullShard),
    );
    assert_same_losses(
        &logged_losses(&dir.path().join("one")),
        &logged_losses(&dir.path().join("two")),
        "FSDP+QLoRA",
    );
    let quantized: Vec<(u64, u64)> = fsdp_reports(&finished.stderr)
        .iter()
        .map(|numbers| (numbers[7], numbers[8]))
        .collect();
    assert_eq!(quantized.len(), 2, "{}", finished.stderr);
    for (held, total) in quantized {
        assert!(total > 0, "the base is quantized");
        let share = held as f64 / total as f64;
        assert!(
            (0.45..=0.55).contains(&share),
            "holds {held} of {total} quantized bytes"
        );
    }
}

/// `launch` with the shipped FSDP example file, as a user runs it: float32 matches one process
/// exactly; the file's own bf16 matches one bf16 process within bf16's rounding.
#[test]
fn launching_the_example_fsdp_file_trains_like_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let config = fixture_config(dir.path(), "");
    let example = support::root().join("examples/accelerate/fsdp_config.yaml");
    let example = example.to_str().unwrap();
    let config_arg = config.to_str().unwrap();
    for (name, precision, tolerance) in [("f32", "no", 1e-4), ("bf16", "bf16", 1e-2)] {
        let one = format!("output_dir=one_{name}");
        let bf16 = format!("bf16={}", name == "bf16");
        single(&job, &config, &[&one, &bf16]);
        let two = format!("output_dir=two_{name}");
        let launched = job
            .spawn(
                &format!("launch_{name}"),
                job.command(
                    &[
                        "launch",
                        "--config_file",
                        example,
                        "--mixed_precision",
                        precision,
                        config_arg,
                        &two,
                        "per_device_train_batch_size=1",
                    ],
                    &[],
                ),
            )
            .wait_until(Instant::now() + DEADLINE);
        assert_success(&launched);
        assert!(
            launched.stderr.contains("fsdp rank 1:"),
            "{}",
            launched.stderr
        );
        let a = logged_losses(&dir.path().join(format!("one_{name}")));
        let b = logged_losses(&dir.path().join(format!("two_{name}")));
        assert_eq!(a.len(), b.len());
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() / x <= tolerance,
                "{name} step {}: {x} vs {y}",
                step + 1
            );
        }
    }
}
