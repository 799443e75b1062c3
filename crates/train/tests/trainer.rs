//! The run loop on the tiny model: output files, logging, and exact resume after an interrupt.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Device};
use ff_config::TrainArgs;
use ff_model::finetune::make_all_trainable;
use ff_model::load::load_model_dir;
use ff_model::peft::load_adapter;
use ff_model::CausalLm;
use ff_train::checkpoint::SavedWeights;
use ff_train::trainer::{train, Observer, Run};
use ff_train::{Example, TrainError};
use serde_json::{Map, Value};

mod common;
use common::{batch, reference, testdata};

/// Six short examples made from the fixture batch's token ids.
fn examples() -> Vec<Example> {
    let ids = batch(&reference()).input_ids;
    (0..6)
        .map(|i| {
            let source = &ids[i % 2];
            let len = 5 + i;
            let input_ids: Vec<u32> = source.iter().cycle().skip(i).take(len).copied().collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < 2 { -100 } else { id as i64 })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}

fn args(output_dir: &Path, extra: &[&str]) -> TrainArgs {
    let mut overrides: Vec<String> = [
        "per_device_train_batch_size=2",
        "num_train_epochs=2",
        "learning_rate=1e-2",
        "lr_scheduler_type=cosine",
        "warmup_steps=1",
        "logging_steps=1",
        "save_steps=2",
        "plot_loss=true",
        "seed=7",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    overrides.push(format!("output_dir={}", output_dir.display()));
    overrides.extend(extra.iter().map(|s| s.to_string()));
    TrainArgs::from_mapping(Default::default(), &overrides).unwrap()
}

fn lora_model() -> (CausalLm, SavedWeights) {
    let mut model =
        load_model_dir(&testdata().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    let spec = load_adapter(&mut model, &testdata().join("tiny-llama-lora-init")).unwrap();
    (model, SavedWeights::Lora(spec))
}

/// Records losses and raises the stop flag after a given step, as Ctrl-C would.
struct Recorder<'a> {
    stop_after: Option<u64>,
    stop: &'a AtomicBool,
}

impl Observer for Recorder<'_> {
    fn on_start(&mut self, _total: u64, _first: u64) {}
    fn on_step(&mut self, step: u64, _loss: f64, _lr: f64) {
        if Some(step) == self.stop_after {
            self.stop.store(true, Ordering::SeqCst);
        }
    }
    fn on_log(&mut self, _record: &Map<String, Value>) {}
    fn on_message(&mut self, _message: &str) {}
    fn on_finish(&mut self) {}
}

/// The tiny model with every tensor trained and the LM head tied to the embedding, so that
/// the embedding's gradient comes from two places.
fn tied_full_model() -> (CausalLm, SavedWeights) {
    let mut model =
        load_model_dir(&testdata().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap();
    model.config.tie_word_embeddings = true;
    model.lm_head = None;
    make_all_trainable(&mut model).unwrap();
    (model, SavedWeights::Full)
}

fn run(
    output_dir: &Path,
    extra: &[&str],
    stop_after: Option<u64>,
) -> Result<ff_train::trainer::Summary, TrainError> {
    run_model(lora_model(), output_dir, extra, stop_after)
}

fn run_model(
    (mut model, weights): (CausalLm, SavedWeights),
    output_dir: &Path,
    extra: &[&str],
    stop_after: Option<u64>,
) -> Result<ff_train::trainer::Summary, TrainError> {
    let args = args(output_dir, extra);
    let stop = AtomicBool::new(false);
    let mut recorder = Recorder {
        stop_after,
        stop: &stop,
    };
    let train_set = examples();
    train(
        &mut model,
        Run {
            args: &args,
            output_dir: output_dir.to_path_buf(),
            weights,
            base_model: "tiny-llama".into(),
            train: &train_set,
            eval: &train_set[..2],
            pad_token_id: 2,
            stop: &stop,
            group: &ff_dist::SingleProcessGroup,
            fsdp: None,
            tokenizer_files: Vec::new(),
            observer: &mut recorder,
        },
    )
}

fn logged_losses(output_dir: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(output_dir.join("trainer_log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["current_steps"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_run_leaves_llama_factory_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let summary = run(
        &out,
        &["eval_strategy=steps", "eval_steps=3", "save_total_limit=2"],
        None,
    )
    .unwrap();
    assert_eq!(summary.global_step, 6);
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_log.jsonl",
        "trainer_state.json",
        "train_results.json",
        "all_results.json",
        "eval_results.json",
        "training_loss.png",
        "training_eval_loss.png",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let checkpoints: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    let mut sorted = checkpoints.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        ["checkpoint-4", "checkpoint-6"],
        "save_total_limit keeps the newest two"
    );

    let first: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("trainer_log.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    for key in [
        "current_steps",
        "total_steps",
        "loss",
        "lr",
        "epoch",
        "percentage",
        "elapsed_time",
        "remaining_time",
    ] {
        assert!(
            first.get(key).is_some(),
            "trainer_log line lacks {key}: {first}"
        );
    }
    assert_eq!(first["total_steps"], 6);
    let results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap())
            .unwrap();
    for key in [
        "epoch",
        "train_loss",
        "train_runtime",
        "train_samples_per_second",
        "train_steps_per_second",
        "eval_loss",
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
    ] {
        assert!(results.get(key).is_some(), "all_results lacks {key}");
    }
    // Hugging Face's evaluation metrics, in eval_results.json and in every evaluation record.
    let eval_results: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("eval_results.json")).unwrap())
            .unwrap();
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    let eval_records: Vec<&Value> = state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect();
    // The epoch as Hugging Face logs it, unrounded: three steps make an epoch.
    assert_eq!(state["log_history"][0]["epoch"].as_f64(), Some(1.0 / 3.0));
    assert_eq!(eval_records.len(), 2, "evaluations at steps 3 and 6");
    for record in eval_records.into_iter().chain([&eval_results]) {
        let mut keys: Vec<&str> = record
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        keys.retain(|k| *k != "step");
        assert_eq!(
            keys,
            [
                "epoch",
                "eval_loss",
                "eval_runtime",
                "eval_samples_per_second",
                "eval_steps_per_second"
            ],
            "{record}"
        );
        assert!(record["eval_samples_per_second"].as_f64().unwrap() > 0.0);
    }
    let losses = logged_losses(&out);
    assert_eq!(losses.len(), 6);
    assert!(losses[5].1 < losses[0].1, "{losses:?}");
}

#[test]
fn total_flos_is_hugging_faces_estimate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    // One micro-batch of all six examples (5 to 10 tokens, so 16 slots each) per step.
    run(
        &out,
        &["per_device_train_batch_size=6", "save_steps=1"],
        None,
    )
    .unwrap();
    // transformers 5.24's Trainer.floating_point_ops for this PEFT model and a 6 × 16 batch.
    let per_step = 1_870_589_952.0;
    let read = |file: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(file)).unwrap()).unwrap()
    };
    assert_eq!(
        read("checkpoint-1/trainer_state.json")["total_flos"].as_f64(),
        Some(per_step)
    );
    for file in [
        "trainer_state.json",
        "train_results.json",
        "all_results.json",
    ] {
        assert_eq!(
            read(file)["total_flos"].as_f64(),
            Some(2.0 * per_step),
            "{file}"
        );
    }
}

#[test]
fn interrupted_and_resumed_run_logs_the_same_losses() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let resumed = dir.path().join("resumed");
    run(&straight, &[], None).unwrap();

    match run(&resumed, &[], Some(3)) {
        Err(TrainError::Interrupted {
            step: 3,
            checkpoint,
        }) => {
            assert!(checkpoint.ends_with("checkpoint-3"));
        }
        other => panic!("expected an interrupt after step 3, got {other:?}"),
    }
    assert!(
        !resumed.join("train_results.json").exists(),
        "an interrupted run must not look finished"
    );
    // Rerunning into the same folder resumes from its newest checkpoint, as LLaMA-Factory does.
    run(&resumed, &[], None).unwrap();
    assert_eq!(logged_losses(&resumed), logged_losses(&straight));
    let total_flos = |out: &Path| {
        let state: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
                .unwrap();
        state["total_flos"].as_f64().unwrap()
    };
    assert_eq!(total_flos(&resumed), total_flos(&straight));
}

#[test]
fn a_used_output_dir_without_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
    let message = run(dir.path(), &[], None).unwrap_err().to_string();
    assert!(
        message.contains("already exists and is not empty; set overwrite_output_dir"),
        "{message}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "mine"
    );
    run(dir.path(), &["overwrite_output_dir=true"], None).unwrap();
}

/// A folder for offload files on the disk that holds the build (tmpfs is refused for them).
fn offload_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn offloaded_gradients_and_moments_train_bit_for_bit_like_memory() {
    let dir = tempfile::tempdir().unwrap();
    let offload = offload_dir();
    let offload_key = format!("offload_optimizer_dir={}", offload.path().display());
    // Accumulation adds to gradients already on disk; clipping and decay use every setting
    // the update has.
    let settings = [
        "gradient_accumulation_steps=2",
        "per_device_train_batch_size=1",
        "max_grad_norm=0.05",
        "weight_decay=0.01",
        "save_steps=2",
        // Evaluating right after each step reads weights that an offloaded update, running on
        // its own thread, is still writing: the evaluation must wait for them.
        "eval_strategy=steps",
        "eval_steps=1",
    ];
    let with_offload: Vec<&str> = settings
        .iter()
        .copied()
        .chain([offload_key.as_str()])
        .collect();
    let in_memory = dir.path().join("memory");
    let offloaded = dir.path().join("offloaded");
    let resumed = dir.path().join("resumed");
    run_model(tied_full_model(), &in_memory, &settings, None).unwrap();
    run_model(tied_full_model(), &offloaded, &with_offload, None).unwrap();
    match run_model(tied_full_model(), &resumed, &with_offload, Some(3)) {
        Err(TrainError::Interrupted { step: 3, .. }) => {}
        other => panic!("expected an interrupt after step 3, got {other:?}"),
    }
    run_model(tied_full_model(), &resumed, &with_offload, None).unwrap();

    let state = |out: &Path| -> Value {
        serde_json::from_slice(&read(&out.join("trainer_state.json"))).unwrap()
    };
    // The step records whole, and the evaluations' losses: the closing record and the
    // evaluations' speed figures carry run times.
    let records_with = |out: &Path, key: &str| -> Vec<Value> {
        let state = state(out);
        let records = state["log_history"].as_array().unwrap();
        records
            .iter()
            .filter(|r| r.get(key).is_some())
            .cloned()
            .collect()
    };
    let history = |out: &Path| records_with(out, "loss");
    let eval_losses = |out: &Path| -> Vec<Value> {
        let records = records_with(out, "eval_loss");
        records.iter().map(|r| r["eval_loss"].clone()).collect()
    };
    let last = state(&in_memory)["global_step"].as_u64().unwrap();
    assert!(last >= 4, "{last} steps are too few to cover a resume");
    for out in [&offloaded, &resumed] {
        assert_eq!(history(out), history(&in_memory), "{}", out.display());
        assert_eq!(
            eval_losses(out),
            eval_losses(&in_memory),
            "{}",
            out.display()
        );
        assert_eq!(
            read(&out.join("model.safetensors")),
            read(&in_memory.join("model.safetensors"))
        );
        for step in [2, last] {
            let file = format!("checkpoint-{step}/optimizer.safetensors");
            assert_eq!(
                read(&out.join(&file)),
                read(&in_memory.join(&file)),
                "{file}"
            );
        }
    }
    let grad_norms: Vec<f64> = history(&offloaded)
        .iter()
        .filter_map(|r| r["grad_norm"].as_f64())
        .collect();
    assert!(
        grad_norms.iter().all(|&n| n > 0.05),
        "clipping must be active: {grad_norms:?}"
    );
    assert_eq!(
        std::fs::read_dir(offload.path()).unwrap().count(),
        0,
        "offload files have no names and leave nothing behind"
    );
}

#[test]
fn an_offload_dir_that_cannot_hold_the_state_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-folder");
    let refusal = |offload: &Path| {
        let key = format!("offload_optimizer_dir={}", offload.display());
        let out = dir.path().join("out");
        run_model(tied_full_model(), &out, &[key.as_str()], None)
            .unwrap_err()
            .to_string()
    };
    let message = refusal(&missing);
    assert_eq!(
        message,
        format!(
            "offload_optimizer_dir {} is not an existing folder",
            missing.display()
        )
    );
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let message = refusal(shm);
        assert!(
            message.contains("is on tmpfs, whose files are memory"),
            "{message}"
        );
    }
}
