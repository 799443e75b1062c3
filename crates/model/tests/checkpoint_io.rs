//! Loading and saving: model directories, sharded checkpoints, PEFT adapters, and the errors a
//! user sees when one of them is wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ff_model::finetune::{apply_lora, LoraSpec};
use ff_model::load::load_model_dir;
use ff_model::peft::{load_adapter, save_adapter};
use ff_model::safetensors_io::{save_atomic, SafetensorsFiles};
use ff_model::{CausalLm, ForwardCtx};
use serde_json::Value;

fn tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama")
}

fn tiny() -> CausalLm {
    load_model_dir(&tiny_dir(), DType::F32, &Device::Cpu).unwrap()
}

fn spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: LoraSpec::parse_targets("all").unwrap(),
        use_rslora: false,
    }
}

fn logits(model: &CausalLm) -> Vec<f32> {
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::new(&model.config, &[vec![1; 5]], model.dtype, 0, &Device::Cpu).unwrap();
    model
        .forward_logits(&ids, &ctx)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Copies the tiny model's config and weights into `dir`, the weights re-saved by `write`.
fn copy_model(dir: &Path, write: impl FnOnce(&[(String, Tensor)], &Path)) {
    std::fs::copy(tiny_dir().join("config.json"), dir.join("config.json")).unwrap();
    let files = SafetensorsFiles::open(&[tiny_dir().join("model.safetensors")]).unwrap();
    let mut names: Vec<String> = files.names().map(str::to_string).collect();
    names.sort();
    let tensors: Vec<(String, Tensor)> = names
        .into_iter()
        .map(|n| {
            let t = files.load(&n, None, DType::F32, &Device::Cpu).unwrap();
            (n, t)
        })
        .collect();
    write(&tensors, dir);
}

fn write_sharded(tensors: &[(String, Tensor)], dir: &Path) {
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", first),
        ("model-00002-of-00002.safetensors", second),
    ] {
        save_atomic(part, None, &dir.join(file)).unwrap();
        for (name, _) in part {
            weight_map.insert(name.clone(), Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
}

fn one_line_error(dir: &Path) -> String {
    let message = load_model_dir(dir, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(!message.contains('\n'), "{message}");
    message
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path(), write_sharded);
    let sharded = load_model_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&sharded), logits(&tiny()));
}

#[test]
fn half_precision_checkpoints_load() {
    for dtype in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir().unwrap();
        copy_model(dir.path(), |tensors, dir| {
            let half: Vec<(String, Tensor)> = tensors
                .iter()
                .map(|(n, t)| (n.clone(), t.to_dtype(dtype).unwrap()))
                .collect();
            save_atomic(&half, None, &dir.join("model.safetensors")).unwrap();
        });
        let model = load_model_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let worst = logits(&model)
            .iter()
            .zip(logits(&tiny()))
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 0.05, "{dtype:?}: logits differ by {worst}");
    }
}

#[test]
fn missing_shard_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path(), write_sharded);
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let message = one_line_error(dir.path());
    assert!(
        message.contains("model-00002-of-00002.safetensors"),
        "{message}"
    );
    assert!(message.contains("does not exist"), "{message}");
}

#[test]
fn unknown_model_type_and_missing_hidden_size_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path(), |t, d| {
        save_atomic(t, None, &d.join("model.safetensors")).unwrap()
    });
    let config_path = dir.path().join("config.json");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();

    let mut unknown = config.clone();
    unknown["model_type"] = "gpt_neox".into();
    std::fs::write(&config_path, unknown.to_string()).unwrap();
    let message = one_line_error(dir.path());
    assert!(
        message.contains("model_type `gpt_neox` is not supported"),
        "{message}"
    );

    let mut no_hidden = config.clone();
    no_hidden.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(&config_path, no_hidden.to_string()).unwrap();
    let message = one_line_error(dir.path());
    assert!(
        message.contains("config.json: has no `hidden_size`"),
        "{message}"
    );
}

#[test]
fn missing_weights_and_wrong_shapes_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    copy_model(dir.path(), |tensors, d| {
        let kept: Vec<(String, Tensor)> = tensors
            .iter()
            .filter(|(n, _)| n != "model.layers.1.mlp.up_proj.weight")
            .cloned()
            .collect();
        save_atomic(&kept, None, &d.join("model.safetensors")).unwrap();
    });
    let message = one_line_error(dir.path());
    assert!(
        message.contains("`model.layers.1.mlp.up_proj.weight`: is missing"),
        "{message}"
    );

    let config_path = dir.path().join("config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["intermediate_size"] = 100.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let message = one_line_error(dir.path());
    assert!(
        message.contains("has shape [176, 64] but the model needs [100, 64]"),
        "{message}"
    );
}

fn trained_adapter(dir: &Path) -> CausalLm {
    let mut model = tiny();
    apply_lora(&mut model, &spec(), 7).unwrap();
    // Give B non-zero values so the round trip is not trivially zeros.
    for (i, (_, var)) in model.trainable_params().into_iter().enumerate() {
        let noise = Tensor::randn(0f32, 1.0, var.shape(), &Device::Cpu).unwrap();
        var.set(&(noise * (i as f64 + 1.0)).unwrap()).unwrap();
    }
    save_adapter(&mut model, &spec(), "tiny-llama", dir).unwrap();
    model
}

#[test]
fn saved_adapter_loads_back_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let mut saved = trained_adapter(dir.path());
    // Readable like the adapter_config.json beside it, not private like a temporary file.
    let mode = |name: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("adapter_model.safetensors"),
        mode("adapter_config.json")
    );
    let mut loaded = tiny();
    let loaded_spec = load_adapter(&mut loaded, dir.path()).unwrap();
    assert_eq!(loaded_spec, spec());
    let a = saved.trainable_params();
    let b = loaded.trainable_params();
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let va: Vec<f32> = va.flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = vb.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{na}"
        );
    }
    assert_eq!(logits(&saved), logits(&loaded));

    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    assert_eq!(config["task_type"], "CAUSAL_LM");
}

/// Rewrites the adapter's tensors with `edit`, then returns the error loading it gives.
fn adapter_error(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> String {
    let dir = tempfile::tempdir().unwrap();
    trained_adapter(dir.path());
    let path = dir.path().join("adapter_model.safetensors");
    let files = SafetensorsFiles::open(std::slice::from_ref(&path)).unwrap();
    let mut tensors: HashMap<String, Tensor> = files
        .names()
        .map(|n| {
            (
                n.to_string(),
                files.load(n, None, DType::F32, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    drop(files);
    edit(&mut tensors);
    let mut list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    list.sort_by(|a, b| a.0.cmp(&b.0));
    save_atomic(&list, None, &path).unwrap();
    let mut model = tiny();
    let message = load_adapter(&mut model, dir.path())
        .unwrap_err()
        .to_string();
    assert!(message.contains("adapter_model.safetensors"), "{message}");
    assert!(!message.contains('\n'), "{message}");
    message
}

const Q0_A: &str = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";

#[test]
fn adapter_with_missing_tensor_names_it() {
    let message = adapter_error(|t| {
        t.remove(Q0_A);
    });
    assert!(
        message.contains(&format!("`{Q0_A}`: is missing")),
        "{message}"
    );
}

#[test]
fn adapter_with_unknown_tensor_names_it() {
    let extra = "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight";
    let message = adapter_error(|t| {
        t.insert(
            extra.into(),
            Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        message.contains(&format!("`{extra}`: is not part of")),
        "{message}"
    );
}

#[test]
fn adapter_with_wrong_shape_names_it() {
    let message = adapter_error(|t| {
        t.insert(
            Q0_A.into(),
            Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        message.contains(&format!("`{Q0_A}`: has shape [4, 32]")),
        "{message}"
    );
}

#[test]
fn truncated_adapter_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    trained_adapter(dir.path());
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let mut model = tiny();
    let message = load_adapter(&mut model, dir.path())
        .unwrap_err()
        .to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(
        message.contains("runs past the end of the file"),
        "{message}"
    );
    assert!(message.contains("lora_"), "names a tensor: {message}");
}

#[test]
fn the_direct_embedding_gradient_has_autograds_bits() {
    let mut model = tiny();
    ff_model::finetune::make_all_trainable(&mut model).unwrap();
    let pad = model.config.pad_token_id.unwrap();
    // Repeated tokens, the padding token and the last row of the table.
    let last = model.config.vocab_size as u32 - 1;
    let ids = Tensor::new(&[[1u32, pad, 7, 1, last], [7, 7, pad, 3, 1]], &Device::Cpu).unwrap();
    let hidden = model.config.hidden_size;
    let values: Vec<f32> = (0..10 * hidden).map(|i| (i as f32 * 0.37).sin()).collect();
    let grad = Tensor::from_vec(values, (2, 5, hidden), &Device::Cpu).unwrap();
    assert!(model.embedding_grad_in_rows());
    let mut table = vec![0f32; model.embed_tokens.elem_count()];
    model
        .embedding_row_sums(&ids, &grad)
        .unwrap()
        .add_to(&mut table)
        .unwrap();
    let direct = Tensor::from_vec(table, model.embed_tokens.dims(), &Device::Cpu).unwrap();
    let embedded = model.embed(&ids).unwrap();
    let autograd = (embedded * &grad)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let table = model.embed_tokens.var().unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    assert_eq!(bits(&direct), bits(autograd.get(table).unwrap()));
    assert!(bits(&direct).iter().any(|&b| b != 0));

    let frozen = tiny();
    assert!(!frozen.embedding_grad_in_rows());
}

#[test]
fn lookups_of_the_padding_token_do_not_train_its_row() {
    let grad_rows = |pad_token_id: Option<u32>| -> Vec<f32> {
        let mut model = tiny();
        model.config.pad_token_id = pad_token_id;
        ff_model::finetune::make_all_trainable(&mut model).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3, 2]], &Device::Cpu).unwrap();
        let embedded = model.embed(&ids).unwrap();
        let grads = embedded.sum_all().unwrap().backward().unwrap();
        let table = model.embed_tokens.var().unwrap();
        let grad = grads.get(table).unwrap();
        // The summed gradient of rows 1, 2 and 3: one sum per looked-up row.
        (1..4)
            .map(|row| {
                grad.get(row)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            })
            .collect()
    };
    assert_eq!(
        tiny().config.pad_token_id,
        Some(2),
        "tiny-llama's config.json"
    );
    let hidden = tiny().config.hidden_size as f32;
    // Each lookup adds a gradient of ones to its row; row 2 is looked up twice.
    assert_eq!(grad_rows(None), vec![hidden, 2.0 * hidden, hidden]);
    assert_eq!(grad_rows(Some(2)), vec![hidden, 0.0, hidden]);
}
