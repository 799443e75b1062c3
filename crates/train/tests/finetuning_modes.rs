//! Compute dtypes and fine-tuning modes beyond the PyTorch reference runs.

use candle_core::{DType, Device};
use ff_model::finetune::{apply_freeze, make_all_trainable};
use ff_model::load::load_model_dir;
use ff_model::peft::load_adapter;
use ff_model::CausalLm;
use ff_train::loss::HeadMemory;
use ff_train::{
    forward_backward, train_step, AdamW, AdamWConfig, Batch, Checkpointing, Engine, Keeping,
    StepOptions, Trainables,
};

mod common;
use common::{reference, testdata};

fn batch() -> Batch {
    common::batch(&reference())
}

fn model(dtype: DType) -> CausalLm {
    load_model_dir(&testdata().join("tiny-llama"), dtype, &Device::Cpu).unwrap()
}

fn steps(model: &mut CausalLm, engine: &mut Engine, n: usize, lr: f64) -> Vec<f64> {
    let mut optimizer = AdamW::new(AdamWConfig::default(), engine.names());
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: true,
    };
    (0..n)
        .map(|_| {
            train_step(
                model,
                engine,
                &mut optimizer,
                &[batch()],
                lr,
                options,
                0,
                &ff_dist::SingleProcessGroup,
            )
            .unwrap()
            .loss
        })
        .collect()
}

#[test]
fn half_precision_compute_trains_float32_adapters_close_to_float32() {
    let expected: Vec<f64> = reference()["lora_adamw"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["loss"].as_f64().unwrap())
        .collect();
    for dtype in [DType::BF16, DType::F16] {
        let mut m = model(dtype);
        load_adapter(&mut m, &testdata().join("tiny-llama-lora-init")).unwrap();
        let mut engine = Engine::Replicated(Trainables::of(&mut m));
        assert!(engine.vars().iter().all(|v| v.dtype() == DType::F32));
        let losses = steps(&mut m, &mut engine, 5, 1e-2);
        for (i, (a, e)) in losses.iter().zip(&expected).enumerate() {
            let rel = (a - e).abs() / e;
            assert!(rel < 2e-2, "{dtype:?} step {}: {a} vs {e}", i + 1);
        }
        assert!(engine.vars().iter().all(|v| v.dtype() == DType::F32));
    }
}

#[test]
fn freeze_tuning_trains_only_the_chosen_layers() {
    let mut m = model(DType::F32);
    apply_freeze(&mut m, 1, &["mlp".to_string()], &[]).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut m));
    let mut names = engine.names().to_vec();
    names.sort();
    assert_eq!(
        names,
        [
            "model.layers.1.mlp.down_proj.weight",
            "model.layers.1.mlp.gate_proj.weight",
            "model.layers.1.mlp.up_proj.weight"
        ]
    );
    let frozen_before: Vec<f32> = m.layers[0]
        .mlp
        .up_proj
        .weight
        .tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let trained_before: Vec<f32> = engine.vars()[0].flatten_all().unwrap().to_vec1().unwrap();
    let losses = steps(&mut m, &mut engine, 3, 1e-3);
    assert!(losses[2] < losses[0], "{losses:?}");
    let frozen_after: Vec<f32> = m.layers[0]
        .mlp
        .up_proj
        .weight
        .tensor()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let trained_after: Vec<f32> = engine.vars()[0].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(frozen_before, frozen_after);
    assert_ne!(trained_before, trained_after);

    let mut negative = model(DType::F32);
    apply_freeze(
        &mut negative,
        -1,
        &["all".to_string()],
        &["embed_tokens".to_string()],
    )
    .unwrap();
    let names = Trainables::of(&mut negative).names;
    assert!(names
        .iter()
        .all(|n| n.starts_with("model.layers.0.") || n == "model.embed_tokens.weight"));
    assert!(names.contains(&"model.embed_tokens.weight".to_string()));
    assert!(names.contains(&"model.layers.0.input_layernorm.weight".to_string()));

    let message = apply_freeze(&mut model(DType::F32), 1, &["attention".to_string()], &[])
        .unwrap_err()
        .to_string();
    assert!(message.contains("`attention`"), "{message}");
}

#[test]
fn tied_embeddings_train_as_one_tensor() {
    let mut m = model(DType::F32);
    m.config.tie_word_embeddings = true;
    m.lm_head = None;
    make_all_trainable(&mut m).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut m));
    assert!(!engine.names().iter().any(|n| n == "lm_head.weight"));
    let losses = steps(&mut m, &mut engine, 3, 1e-3);
    assert!(losses[2] < losses[0], "{losses:?}");
}

/// The checkpointed walk, below the head's memory peak, adds the embedding's rows into the tied
/// head's gradient and hands the table on once; the whole graph's backward (checkpointing off)
/// has autograd add them apart.
#[test]
fn a_tied_table_gets_the_same_gradient_with_checkpointing_and_without() {
    let table_grad = |checkpointing: Checkpointing| -> Vec<f32> {
        let mut m = model(DType::F32);
        m.config.tie_word_embeddings = true;
        m.lm_head = None;
        make_all_trainable(&mut m).unwrap();
        let mut trainables = Trainables::of(&mut m);
        forward_backward(
            &mut m,
            &mut trainables,
            &batch(),
            10.0,
            checkpointing,
            HeadMemory::BelowPeak,
            0,
        )
        .unwrap();
        let i = trainables
            .names
            .iter()
            .position(|n| n == "model.embed_tokens.weight")
            .unwrap();
        let grad = trainables.grads[i].as_ref().unwrap();
        grad.flatten_all().unwrap().to_vec1().unwrap()
    };
    let walked = table_grad(Checkpointing::Layers(Keeping::default()));
    let whole = table_grad(Checkpointing::Off);
    let scale = whole.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = walked
        .iter()
        .zip(&whole)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        scale > 0.0 && worst <= 1e-5 * scale,
        "{worst} at scale {scale}"
    );
}

#[test]
fn checkpointing_gives_the_same_gradients_with_dropout() {
    let mut losses = Vec::new();
    for checkpointing in [true, false] {
        let mut m = model(DType::F32);
        load_adapter(&mut m, &testdata().join("tiny-llama-lora-init")).unwrap();
        for layer in &mut m.layers {
            for (_, linear) in layer.linears_mut() {
                linear.lora.as_mut().unwrap().dropout = 0.3;
            }
        }
        let mut engine = Engine::Replicated(Trainables::of(&mut m));
        let mut optimizer = AdamW::new(AdamWConfig::default(), engine.names());
        let options = StepOptions {
            max_grad_norm: None,
            gradient_checkpointing: checkpointing,
        };
        let s = train_step(
            &mut m,
            &mut engine,
            &mut optimizer,
            &[batch()],
            1e-2,
            options,
            11,
            &ff_dist::SingleProcessGroup,
        )
        .unwrap();
        losses.push((s.loss, s.grad_norm));
    }
    let (a, b) = (losses[0], losses[1]);
    let without_dropout = reference()["lora_adamw"]["steps"][0]["loss"]
        .as_f64()
        .unwrap();
    assert!(
        (a.0 - without_dropout).abs() > 1e-4,
        "dropout had no effect: {a:?}"
    );
    assert!(
        (a.0 - b.0).abs() < 1e-6 && (a.1 - b.1).abs() / b.1 < 1e-5,
        "{a:?} vs {b:?}"
    );
}
