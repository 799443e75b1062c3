//! Pre-quantized checkpoints (config.json with a GPTQ or AWQ `quantization_config`) are refused
//! by `train` before any work, each case with its own message, and QLoRA on the float model runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn train(model: &Path, extra: &str, env: &[(&str, &str)], dir: &Path) -> Output {
    let yaml = format!(
        "model_name_or_path: {model}\nstage: sft\ndataset: fixture_batch\n\
         dataset_dir: {data}\ntemplate: empty\ncutoff_len: 64\noutput_dir: {out}\n\
         per_device_train_batch_size: 2\nmax_steps: 2\nlogging_steps: 1\n{extra}",
        model = model.display(),
        data = root().join("testdata/cli").display(),
        out = dir.join("out").display(),
    );
    let config = dir.join("train.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrofactory"));
    cmd.arg("train").arg(&config).current_dir(dir);
    cmd.env_remove("FERROFACTORY_FSDP_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("the binary runs")
}

fn refused(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!output.status.success(), "expected a refusal: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    stderr
}

fn prequantized(method: &str) -> PathBuf {
    root().join(format!("testdata/prequantized/tiny-llama-{method}"))
}

/// The FSDP settings `launch` hands to workers, as ff-config serialises them.
fn fsdp_env() -> String {
    ff_config::FsdpConfig::default().to_env_value()
}

#[test]
fn quantization_bit_on_a_quantized_model_is_refused() {
    for method in ["gptq", "awq"] {
        let dir = tempfile::tempdir().unwrap();
        let out = train(
            &prequantized(method),
            "quantization_bit: 4\n",
            &[],
            dir.path(),
        );
        let err = refused(&out);
        assert!(err.contains("is already quantized"), "{err}");
        assert!(err.contains(method), "{err}");
        assert!(!dir.path().join("out").exists());
    }
}

#[test]
fn a_quantized_model_without_fsdp_is_not_supported() {
    for method in ["gptq", "awq"] {
        let dir = tempfile::tempdir().unwrap();
        let err = refused(&train(&prequantized(method), "", &[], dir.path()));
        assert!(
            err.contains("pre-quantized model") && err.contains("not supported"),
            "{err}"
        );
    }
}

#[test]
fn a_quantized_model_under_fsdp_points_to_the_float_checkpoint() {
    let fsdp = fsdp_env();
    for method in ["gptq", "awq"] {
        let dir = tempfile::tempdir().unwrap();
        let out = train(
            &prequantized(method),
            "",
            &[("FERROFACTORY_FSDP_CONFIG", &fsdp)],
            dir.path(),
        );
        let err = refused(&out);
        assert!(
            err.contains("GPTQ/AWQ models cannot be used with FSDP+QLoRA"),
            "{err}"
        );
        assert!(
            err.contains("float checkpoint with quantization_bit"),
            "{err}"
        );
        assert!(err.contains(&method.to_uppercase()), "{err}");
    }
}

#[test]
fn qlora_on_the_float_model_trains_and_saves_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        &root().join("testdata/tiny-llama"),
        "quantization_bit: 4\nquantization_type: nf4\n",
        &[],
        dir.path(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("out/adapter_model.safetensors").exists());
}

#[test]
fn quantization_bit_with_full_tuning_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(
        &root().join("testdata/tiny-llama"),
        "quantization_bit: 4\nfinetuning_type: full\n",
        &[],
        dir.path(),
    );
    let err = refused(&out);
    assert!(err.contains("finetuning_type lora only"), "{err}");
}
