//! The `ferrofactory` binary, run as a user runs it.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use support::{fixture_config, free_port, largest_difference, logged_losses, root};

/// Asserts that a command succeeded, showing its standard error otherwise.
fn assert_succeeded(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn ferrofactory(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

#[test]
fn tiny_fixture_through_the_cli_logs_the_reference_losses() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let output = ferrofactory(&["train", config.to_str().unwrap()], dir.path());
    assert_succeeded(&output);
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("testdata/tiny-llama-reference.json")).unwrap(),
    )
    .unwrap();
    let expected: Vec<f64> = reference["lora_adamw"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    let out = dir.path().join("out");
    let losses = logged_losses(&out);
    assert_eq!(losses.len(), 5);
    for (step, (a, e)) in losses.iter().zip(&expected).enumerate() {
        assert!((a - e).abs() / e <= 1e-4, "step {}: {a} vs {e}", step + 1);
    }
    for file in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "all_results.json",
        "checkpoint-5/trainer_state.json",
        // Hugging Face's Trainer saves the tokenizer into every checkpoint too.
        "checkpoint-5/tokenizer.json",
        "checkpoint-5/tokenizer_config.json",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let first_line = std::fs::read_to_string(out.join("trainer_log.jsonl")).unwrap();
    assert!(
        first_line.starts_with("{\"current_steps\":1,\"total_steps\":5,\"loss\":"),
        "{first_line}"
    );
}

#[test]
fn override_changes_the_run_and_bad_keys_fail_in_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let output = ferrofactory(
        &[
            "train",
            config.to_str().unwrap(),
            "max_steps=2",
            "logging_steps=2",
        ],
        dir.path(),
    );
    assert_succeeded(&output);
    assert_eq!(logged_losses(&dir.path().join("out")).len(), 1);

    let config = config.to_str().unwrap();
    let error = failure(&["train", config, "lerning_rate=1"], dir.path());
    assert_eq!(
        error,
        "error: unknown key `lerning_rate`; did you mean `learning_rate`?"
    );
    let error = failure(&["train", config, "dataset=nope"], dir.path());
    assert!(
        error.contains("dataset `nope`") && error.contains("fixture_batch"),
        "{error}"
    );
    let error = failure(&["train", config, "template=nope"], dir.path());
    assert!(
        error.contains("smollm2") && error.contains("llama3"),
        "lists the templates: {error}"
    );
    let error = failure(&["train", "missing.yaml"], dir.path());
    assert!(error.contains("cannot read missing.yaml"), "{error}");
    assert_eq!(
        error.matches("os error 2").count(),
        1,
        "the cause once: {error}"
    );
}

#[test]
fn preprocess_writes_the_reference_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "model_name_or_path: {}\ndataset: identity,alpaca_en_demo\ndataset_dir: {}\ntemplate: smollm2\ncutoff_len: 256\nmax_samples: 40\n",
        root().join("testdata/smollm2-135m-config").display(),
        root().join("data").display()
    );
    let config = dir.path().join("pre.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = dir.path().join("tokens.jsonl");
    let output = ferrofactory(
        &[
            "preprocess",
            config.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_succeeded(&output);
    let reference = std::fs::read_to_string(
        root().join("testdata/token_refs/smollm2__identity+alpaca_en_demo__256__40.jsonl"),
    )
    .unwrap();
    let expected: Vec<Value> = reference
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let actual: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(actual, expected);
}

#[test]
fn preprocess_output_replaces_no_other_file_and_bad_paths_fail_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let config = config.to_str().unwrap();
    let pp = dir.path().join("pp");
    std::fs::create_dir(&pp).unwrap();
    std::fs::write(pp.join("x.tmp"), "precious").unwrap();
    let output = ferrofactory(
        &["preprocess", config, "--output", "pp/x.jsonl"],
        dir.path(),
    );
    assert_succeeded(&output);
    assert_eq!(
        std::fs::read_to_string(pp.join("x.tmp")).unwrap(),
        "precious"
    );
    assert_eq!(
        file_names(&pp),
        ["x.jsonl", "x.tmp"],
        "no temporary file is left"
    );

    // --output after the overrides, as the usage line writes it.
    let output = ferrofactory(
        &[
            "preprocess",
            config,
            "cutoff_len=32",
            "--output",
            "pp/y.jsonl",
        ],
        dir.path(),
    );
    assert_succeeded(&output);
    assert!(pp.join("y.jsonl").is_file());
    std::fs::remove_file(pp.join("y.jsonl")).unwrap();
    let error = failure(
        &[
            "preprocess",
            config,
            "mask_history=true",
            "train_on_prompt=true",
        ],
        dir.path(),
    );
    assert!(
        error.contains("cannot be combined with `train_on_prompt`"),
        "{error}"
    );

    let error = failure(&["preprocess", config, "--output", "pp"], dir.path());
    assert_eq!(
        error,
        "error: --output pp is a directory; give the path of the file to write"
    );
    let error = failure(
        &["preprocess", config, "--output", "missing/x.jsonl"],
        dir.path(),
    );
    assert_eq!(
        error,
        "error: --output missing/x.jsonl cannot be written: missing is not an existing directory"
    );
    assert_eq!(
        file_names(dir.path()),
        ["pp", "train.yaml"],
        "nothing written beside them"
    );
}

/// The names in `dir`, sorted.
fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_model_file_that_is_not_gguf_is_named_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    std::fs::write(dir.path().join("garb.gguf"), [0x5a_u8; 1000]).unwrap();
    let error = failure(
        &[
            "train",
            config.to_str().unwrap(),
            "model_name_or_path=garb.gguf",
        ],
        dir.path(),
    );
    assert!(
        error.starts_with(
            "error: garb.gguf: is not a GGUF file (it does not start with the bytes `GGUF`)"
        ),
        "{error}"
    );
}

#[test]
fn ctrl_c_checkpoints_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args(["train", config.to_str().unwrap(), "max_steps=100000"])
        .current_dir(dir.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !out.join("trainer_log.jsonl").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "training never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let checkpoints: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .collect();
    assert_eq!(checkpoints.len(), 1, "one checkpoint written on interrupt");
    assert!(checkpoints[0]
        .path()
        .join("adapter_model.safetensors")
        .exists());
    assert!(
        !out.join("train_results.json").exists(),
        "an interrupted run must not look finished"
    );
}

/// Runs the binary expecting failure; returns the error, which must be a single line at the end
/// of stderr (progress lines may come before it).
fn failure(args: &[&str], dir: &Path) -> String {
    let output = ferrofactory(args, dir);
    assert!(!output.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(stderr.lines().last(), Some(errors[0]), "{stderr}");
    errors[0].to_string()
}

#[test]
fn user_mistakes_are_one_sentence_and_touch_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let config = config.to_str().unwrap();

    let stderr = failure(
        &["train", config, "model_name_or_path=/no/such/model"],
        dir.path(),
    );
    assert!(
        stderr.contains("model_name_or_path /no/such/model does not exist"),
        "{stderr}"
    );

    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("mine.txt"), "keep").unwrap();
    let stderr = failure(&["train", config], dir.path());
    assert!(
        stderr.contains("already exists and is not empty; set overwrite_output_dir"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("mine.txt")).unwrap(),
        "keep"
    );
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        1,
        "nothing written"
    );

    let ckpt = out.join("checkpoint-3");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("trainer_state.json"), "{}").unwrap();
    let stderr = failure(
        &[
            "train",
            config,
            &format!("resume_from_checkpoint={}", ckpt.display()),
        ],
        dir.path(),
    );
    assert!(
        stderr.contains("checkpoint-3 is incomplete: it has no adapter_config.json"),
        "{stderr}"
    );

    let stderr = failure(
        &[
            "train",
            config,
            "resume_from_checkpoint=/no/such/checkpoint-5",
        ],
        dir.path(),
    );
    assert!(
        stderr.ends_with("resume_from_checkpoint /no/such/checkpoint-5 does not exist"),
        "{stderr}"
    );
    let file = dir.path().join("file");
    std::fs::write(&file, "keep").unwrap();
    let stderr = failure(
        &["train", config, &format!("output_dir={}", file.display())],
        dir.path(),
    );
    assert!(stderr.contains("is a file, not a folder"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");

    // An offload folder that cannot be used is refused before the model loads.
    let before = file_names(&out);
    let missing = dir.path().join("no-such-folder");
    let stderr = failure(
        &[
            "train",
            config,
            &format!("offload_optimizer_dir={}", missing.display()),
        ],
        dir.path(),
    );
    assert!(stderr.ends_with("is not an existing folder"), "{stderr}");
    assert_eq!(file_names(&out), before, "nothing written");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "model_name_or_path: x\ndataset: [a,\nlearning_rate: 1\n",
    )
    .unwrap();
    let stderr = failure(&["train", bad.to_str().unwrap()], dir.path());
    assert!(
        stderr.contains("bad.yaml is not valid YAML") && stderr.contains("line"),
        "{stderr}"
    );
}

/// Trains the fixture config in `dir` as two processes of one example per batch each, with
/// `overrides`, and expects success.
fn two_processes_train(dir: &Path, overrides: &[&str]) {
    let config = fixture_config(dir, "");
    let output = Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args([
            "train",
            config.to_str().unwrap(),
            "per_device_train_batch_size=1",
        ])
        .args(overrides)
        .current_dir(dir)
        .env("FORCE_TORCHRUN", "1")
        .env("NPROC_PER_NODE", "2")
        .env_remove("MASTER_PORT")
        .output()
        .unwrap();
    assert_succeeded(&output);
}

#[test]
fn two_processes_with_half_the_batch_train_like_one() {
    let single = tempfile::tempdir().unwrap();
    let config = fixture_config(single.path(), "");
    let output = ferrofactory(&["train", config.to_str().unwrap()], single.path());
    assert_succeeded(&output);

    let double = tempfile::tempdir().unwrap();
    two_processes_train(double.path(), &[]);

    let one = logged_losses(&single.path().join("out"));
    let two = logged_losses(&double.path().join("out"));
    assert_eq!(one.len(), 5);
    assert_eq!(two.len(), 5);
    for (step, (a, b)) in one.iter().zip(&two).enumerate() {
        assert!((a - b).abs() / a <= 1e-4, "step {}: {a} vs {b}", step + 1);
    }
    let diff = largest_difference(
        &single.path().join("out/adapter_model.safetensors"),
        &double.path().join("out/adapter_model.safetensors"),
    );
    // The tolerance the PyTorch reference adapter is held to: summation order differs across ranks.
    assert!(diff < 1e-4, "adapters differ by {diff}");

    // The same two processes with gradients and moments on disk, summed a chunk at a time.
    let offloaded = tempfile::tempdir().unwrap();
    let offload_dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    two_processes_train(
        offloaded.path(),
        &[&format!(
            "offload_optimizer_dir={}",
            offload_dir.path().display()
        )],
    );
    assert_eq!(logged_losses(&offloaded.path().join("out")), two);
    let adapter = |dir: &Path| std::fs::read(dir.join("out/adapter_model.safetensors")).unwrap();
    assert!(
        adapter(offloaded.path()) == adapter(double.path()),
        "the offloaded adapter differs from the one trained in memory"
    );
}

/// Two launcher invocations on this machine acting as two nodes, with the node rank in
/// `rank_var` (NODE_RANK, or RANK as LLaMA-Factory's documentation writes it).
/// Starts `ferrofactory train` as node `node` of a two-node job on this machine, with the node
/// rank in `rank_var` (NODE_RANK, or RANK as LLaMA-Factory's documentation writes it).
fn start_node(
    dir: &Path,
    args: &[String],
    port: &str,
    rank_var: &str,
    node: usize,
) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args(args)
        .current_dir(dir)
        .env("FORCE_TORCHRUN", "1")
        .env("NNODES", "2")
        .env(rank_var, node.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env_remove(if rank_var == "RANK" {
            "NODE_RANK"
        } else {
            "RANK"
        })
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Losses of the fixture run as two nodes of one process each, batch 1 per process.
fn two_nodes(rank_var: &str) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let args = [
        "train".to_string(),
        config.to_str().unwrap().to_string(),
        "per_device_train_batch_size=1".to_string(),
    ];
    let port = free_port().to_string();
    let nodes: Vec<_> = (0..2)
        .map(|node| start_node(dir.path(), &args, &port, rank_var, node))
        .collect();
    for node in nodes {
        assert_succeeded(&node.wait_with_output().unwrap());
    }
    logged_losses(&dir.path().join("out"))
}

#[test]
fn two_nodes_on_one_machine_train_like_one_process() {
    let single = tempfile::tempdir().unwrap();
    let config = fixture_config(single.path(), "");
    let output = ferrofactory(&["train", config.to_str().unwrap()], single.path());
    assert_succeeded(&output);
    let one = logged_losses(&single.path().join("out"));
    for rank_var in ["NODE_RANK", "RANK"] {
        let two = two_nodes(rank_var);
        assert_eq!(two.len(), one.len(), "{rank_var}");
        for (step, (a, b)) in one.iter().zip(&two).enumerate() {
            assert!(
                (a - b).abs() / a <= 1e-4,
                "{rank_var} step {}: {a} vs {b}",
                step + 1
            );
        }
    }
}

#[test]
fn nodes_with_different_configs_are_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let config = fixture_config(dir.path(), "");
    let port = free_port().to_string();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let mut args = vec!["train".to_string(), config.to_str().unwrap().to_string()];
            if node == 1 {
                args.push("learning_rate=2e-2".into());
            }
            start_node(dir.path(), &args, &port, "NODE_RANK", node)
        })
        .collect();
    for node in nodes {
        let output = node.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains("node 1"),
            "names the differing node: {stderr}"
        );
    }
    assert!(
        !dir.path().join("out").join("trainer_log.jsonl").exists(),
        "no training ran"
    );
}

/// A fresh-LoRA version of the fixture config, saving every step, for resume tests.
fn fresh_lora_config(dir: &Path) -> String {
    let config = fixture_config(dir, "");
    let yaml = std::fs::read_to_string(&config).unwrap();
    let fresh: String = yaml
        .lines()
        .filter(|l| !l.starts_with("adapter_name_or_path"))
        .map(|l| {
            if l.starts_with("save_steps") {
                "save_steps: 1\n".to_string()
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&config, fresh).unwrap();
    config.to_str().unwrap().to_string()
}

#[test]
fn resuming_what_would_train_something_else_or_nothing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = fresh_lora_config(dir.path());
    let out = dir.path().join("out");
    assert_succeeded(&ferrofactory(
        &["train", &config, "max_steps=2"],
        dir.path(),
    ));
    let results = std::fs::read_to_string(out.join("train_results.json")).unwrap();
    // transformers' TrainerState.load_from_json refuses any key its dataclass lacks.
    let hf_fields = [
        "epoch",
        "global_step",
        "max_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
        "num_train_epochs",
        "num_input_tokens_seen",
        "total_flos",
        "log_history",
        "best_metric",
        "best_global_step",
        "best_model_checkpoint",
        "is_local_process_zero",
        "is_world_process_zero",
        "is_hyper_param_search",
        "trial_name",
        "trial_params",
        "stateful_callbacks",
    ];
    for file in ["trainer_state.json", "checkpoint-1/trainer_state.json"] {
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(file)).unwrap()).unwrap();
        for key in state.as_object().unwrap().keys() {
            assert!(hf_fields.contains(&key.as_str()), "{file}: {key}");
        }
    }

    // Run again: the newest checkpoint is the last step, so there is nothing to resume.
    let stderr = failure(&["train", &config, "max_steps=2"], dir.path());
    assert!(
        stderr.contains("checkpoint-2 is at step 2 of 2, so its run is finished"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("train_results.json")).unwrap(),
        results
    );

    std::fs::remove_dir_all(out.join("checkpoint-2")).unwrap();
    let stderr = failure(
        &["train", &config, "max_steps=2", "lora_rank=4"],
        dir.path(),
    );
    assert!(
        stderr.contains(
            "checkpoint-1 was written with lora_rank 8 (this run: 4), lora_alpha 16 (this run: 8);"
        ),
        "{stderr}"
    );
    let stderr = failure(
        &["train", &config, "max_steps=2", "lora_target=q_proj,v_proj"],
        dir.path(),
    );
    assert!(stderr.contains("lora_target q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj (this run: q_proj,v_proj)"), "{stderr}");
    let stderr = failure(
        &["train", &config, "max_steps=2", "finetuning_type=full"],
        dir.path(),
    );
    assert!(stderr.contains("was written by a LoRA run"), "{stderr}");
    let stderr = failure(&["train", &config, "max_steps=3"], dir.path());
    assert!(
        stderr.contains("was written by a run with training steps 2 (this run: 3)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("train_results.json")).unwrap(),
        results
    );
    // The same settings resume and finish the run.
    assert_succeeded(&ferrofactory(
        &["train", &config, "max_steps=2"],
        dir.path(),
    ));
    assert!(out.join("checkpoint-2").is_dir());
}

#[test]
fn a_cutoff_that_leaves_no_label_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = fresh_lora_config(dir.path());
    let stderr = failure(&["train", &config, "cutoff_len=1"], dir.path());
    assert!(
        stderr.contains("no training example keeps a token to learn after cutting to cutoff_len 1"),
        "{stderr}"
    );
    assert!(!dir.path().join("out/adapter_model.safetensors").exists());
}
