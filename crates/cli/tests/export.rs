//! `ferrofactory export`: the fixture's trained adapter merged into its base, written as a Hugging
//! Face model directory that loads and trains again; and the refusals.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn ferrofactory(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrofactory"))
        .args(args)
        .current_dir(dir)
        .env_remove("FERROFACTORY_FSDP_CONFIG")
        .output()
        .expect("the binary runs")
}

fn export(dir: &Path, extra: &str) -> Output {
    let yaml = format!(
        "model_name_or_path: {model}\nadapter_name_or_path: {adapter}\ntemplate: empty\n\
         finetuning_type: lora\nexport_dir: {out}\nexport_size: 5\nexport_device: cpu\n\
         export_legacy_format: false\n{extra}",
        model = root().join("testdata/tiny-llama").display(),
        adapter = root().join("testdata/tiny-llama-lora-after5").display(),
        out = dir.join("merged").display(),
    );
    let config = dir.join("export.yaml");
    std::fs::write(&config, yaml).unwrap();
    ferrofactory(&["export", config.to_str().unwrap()], dir)
}

/// `name` of a safetensors file as float64 with its shape.
fn tensor(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f64>) {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let view = st.tensor(name).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
    let values = view
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    (view.shape().to_vec(), values)
}

#[test]
fn merged_weights_equal_w_plus_scaled_b_a() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(dir.path(), "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let merged_dir = dir.path().join("merged");
    for file in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(merged_dir.join(file).is_file(), "{file} missing");
    }
    let merged = std::fs::read(merged_dir.join("model.safetensors")).unwrap();
    let base = std::fs::read(root().join("testdata/tiny-llama/model.safetensors")).unwrap();
    let adapter =
        std::fs::read(root().join("testdata/tiny-llama-lora-after5/adapter_model.safetensors"))
            .unwrap();
    let scale = 8.0 / 4.0; // lora_alpha / r of the fixture adapter
    let mut checked = 0;
    for layer in 0..2 {
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            let name = format!("model.layers.{layer}.{module}");
            let (shape, w) = tensor(&base, &format!("{name}.weight"));
            let (_, a) = tensor(&adapter, &format!("base_model.model.{name}.lora_A.weight"));
            let (b_shape, b) = tensor(&adapter, &format!("base_model.model.{name}.lora_B.weight"));
            let (merged_shape, m) = tensor(&merged, &format!("{name}.weight"));
            assert_eq!(merged_shape, shape);
            let (rows, cols, r) = (shape[0], shape[1], b_shape[1]);
            for i in 0..rows {
                for j in 0..cols {
                    let ba: f64 = (0..r).map(|k| b[i * r + k] * a[k * cols + j]).sum();
                    let expected = w[i * cols + j] + scale * ba;
                    let got = m[i * cols + j];
                    assert!(
                        (got - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                        "{name}[{i},{j}]: {got} vs {expected}"
                    );
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
    // Weights without adapters are copied as they are.
    assert_eq!(
        tensor(&merged, "model.norm.weight"),
        tensor(&base, "model.norm.weight")
    );
}

#[test]
fn the_exported_directory_trains_again() {
    let dir = tempfile::tempdir().unwrap();
    let out = export(dir.path(), "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = format!(
        "model_name_or_path: {model}\nstage: sft\nfinetuning_type: lora\ndataset: fixture_batch\n\
         dataset_dir: {data}\ntemplate: empty\ncutoff_len: 64\noutput_dir: {out}\n\
         per_device_train_batch_size: 2\nmax_steps: 2\nlogging_steps: 1\n",
        model = dir.path().join("merged").display(),
        data = root().join("testdata/cli").display(),
        out = dir.path().join("again").display(),
    );
    let config = dir.path().join("train.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = ferrofactory(&["train", config.to_str().unwrap()], dir.path());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("again/adapter_model.safetensors").is_file());
}

fn refusal(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a refusal: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
    stderr
}

#[test]
fn refusals_name_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = refusal(&export(dir.path(), "quantization_bit: 4\n"));
    assert!(
        err.contains("cannot merge adapters into a quantized model"),
        "{err}"
    );
    let err = refusal(&export(dir.path(), "export_legacy_format: true\n"));
    assert!(err.contains("export_legacy_format"), "{err}");
    std::fs::create_dir_all(dir.path().join("merged")).unwrap();
    std::fs::write(dir.path().join("merged/keep.txt"), "mine").unwrap();
    let err = refusal(&export(dir.path(), ""));
    assert!(err.contains("is not empty"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("merged/keep.txt")).unwrap(),
        "mine"
    );
    assert_nothing_half_written(dir.path());
}

#[test]
fn an_export_dir_that_is_a_file_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("merged"), "mine").unwrap();
    let err = refusal(&export(dir.path(), ""));
    assert!(
        err.contains("merged exists and is not a directory"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("merged")).unwrap(),
        "mine"
    );
    assert_nothing_half_written(dir.path());
}

/// No partial export is left beside export_dir.
fn assert_nothing_half_written(dir: &Path) {
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn merging_into_a_prequantized_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "model_name_or_path: {model}\nadapter_name_or_path: {adapter}\nfinetuning_type: lora\nexport_dir: {out}\n",
        model = root().join("testdata/prequantized/tiny-llama-gptq").display(),
        adapter = root().join("testdata/tiny-llama-lora-after5").display(),
        out = dir.path().join("merged").display(),
    );
    let config = dir.path().join("export.yaml");
    std::fs::write(&config, yaml).unwrap();
    let err = refusal(&ferrofactory(
        &["export", config.to_str().unwrap()],
        dir.path(),
    ));
    assert!(
        err.contains("cannot merge adapters into a quantized model"),
        "{err}"
    );
}
