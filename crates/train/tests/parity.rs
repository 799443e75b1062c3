//! Reproduces testdata/tiny-llama-reference.json, made with PyTorch, transformers and PEFT.

use candle_core::{DType, Device, Tensor, D};
use ff_model::finetune::make_all_trainable;
use ff_model::layers::Keep;
use ff_model::load::load_model_dir;
use ff_model::peft::load_adapter;
use ff_model::safetensors_io::SafetensorsFiles;
use ff_model::{CausalLm, ForwardCtx};
use ff_train::loss::HeadMemory;
use ff_train::{
    row_group_threads, train_step, AdamW, AdamWConfig, Batch, Checkpointing, Engine, Keeping,
    MicroBatchPlan, PlanInputs, StepOptions, Trainables,
};
use serde_json::Value;

mod common;
use common::{batch, reference, testdata};

fn tiny_model() -> CausalLm {
    load_model_dir(&testdata().join("tiny-llama"), DType::F32, &Device::Cpu).unwrap()
}

fn assert_rel(actual: f64, expected: f64, rel: f64, what: &str) {
    let err = (actual - expected).abs() / expected.abs().max(1e-12);
    assert!(
        err <= rel,
        "{what}: {actual} vs {expected} (relative error {err:e})"
    );
}

fn run_steps(
    model: &mut CausalLm,
    engine: &mut Engine,
    micro_batches: &[Batch],
    spec: &Value,
    checkpointing: bool,
) -> Vec<(f64, f64)> {
    let betas = spec["betas"].as_array().unwrap();
    let config = AdamWConfig {
        beta1: betas[0].as_f64().unwrap(),
        beta2: betas[1].as_f64().unwrap(),
        eps: spec["eps"].as_f64().unwrap(),
        weight_decay: spec["weight_decay"].as_f64().unwrap(),
    };
    let mut optimizer = AdamW::new(config, engine.names());
    let options = StepOptions {
        max_grad_norm: spec["max_grad_norm"].as_f64(),
        gradient_checkpointing: checkpointing,
    };
    let lr = spec["lr"].as_f64().unwrap();
    spec["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|_| {
            let s = train_step(
                model,
                engine,
                &mut optimizer,
                micro_batches,
                lr,
                options,
                0,
                &ff_dist::SingleProcessGroup,
            )
            .unwrap();
            (s.loss, s.grad_norm)
        })
        .collect()
}

fn check_steps(actual: &[(f64, f64)], spec: &Value, loss_rel: f64, norm_rel: f64) {
    for (i, ((loss, norm), expected)) in actual
        .iter()
        .zip(spec["steps"].as_array().unwrap())
        .enumerate()
    {
        assert_rel(
            *loss,
            expected["loss"].as_f64().unwrap(),
            loss_rel,
            &format!("loss of step {}", i + 1),
        );
        assert_rel(
            *norm,
            expected["grad_norm"].as_f64().unwrap(),
            norm_rel,
            &format!("grad norm of step {}", i + 1),
        );
    }
}

/// Largest absolute difference of logits[..., :8] and per-position logsumexp from a reference.
fn logits_difference(model: &CausalLm, batch: &Batch, reference: &Value) -> f32 {
    let ctx = ForwardCtx::new(
        &model.config,
        &batch.attention_mask,
        DType::F32,
        0,
        &Device::Cpu,
    )
    .unwrap();
    let logits = model
        .forward_logits(&batch.input_ids_tensor(&Device::Cpu).unwrap(), &ctx)
        .unwrap();
    let first8: Vec<Vec<Vec<f32>>> = logits.narrow(D::Minus1, 0, 8).unwrap().to_vec3().unwrap();
    let max = logits.max_keepdim(D::Minus1).unwrap();
    let sum = logits
        .broadcast_sub(&max)
        .unwrap()
        .exp()
        .unwrap()
        .sum_keepdim(D::Minus1)
        .unwrap();
    let lse: Vec<Vec<f32>> = (sum.log().unwrap() + max)
        .unwrap()
        .squeeze(D::Minus1)
        .unwrap()
        .to_vec2()
        .unwrap();
    let expected_first8: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(reference["logits_first8"].clone()).unwrap();
    let expected_lse: Vec<Vec<f32>> =
        serde_json::from_value(reference["logsumexp"].clone()).unwrap();
    assert_eq!(first8.len(), expected_first8.len());
    assert_eq!(lse.len(), expected_lse.len());
    let mut worst = 0f32;
    for (a, e) in first8
        .iter()
        .flatten()
        .flatten()
        .zip(expected_first8.iter().flatten().flatten())
    {
        worst = worst.max((a - e).abs());
    }
    for (a, e) in lse.iter().flatten().zip(expected_lse.iter().flatten()) {
        worst = worst.max((a - e).abs());
    }
    worst
}

/// Loss of `batch` through the training path (chunked head, layer-wise backward), and the
/// gradients.
fn training_loss(
    model: &mut CausalLm,
    batch: &Batch,
    checkpointing: Checkpointing,
) -> (f64, Vec<Vec<f32>>) {
    let mut trainables = Trainables::of(model);
    let n = batch.num_label_tokens() as f64;
    // At this vocabulary of 512 either length is one chunk (loss.rs tests several).
    let memory = HeadMemory::BelowPeak;
    let nll =
        ff_train::forward_backward(model, &mut trainables, batch, n, checkpointing, memory, 0)
            .unwrap();
    let grads = trainables
        .grads
        .iter()
        .map(|g| {
            g.as_ref()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .collect();
    (nll / n, grads)
}

#[test]
fn base_logits_and_logsumexp() {
    let reference = reference();
    let worst = logits_difference(&tiny_model(), &batch(&reference), &reference["base"]);
    assert!(worst <= 1e-4, "largest difference {worst:e}");
}

/// Qwen2 (q/k/v biases), Qwen3 (q/k norms, head_dim ≠ hidden/heads, tied head) and Llama with
/// llama3 rope scaling and tied embeddings, against transformers (testdata/arch/make_references.py).
#[test]
fn other_architectures_match_transformers() {
    for name in ["qwen2", "qwen3", "llama3-scaled-tied"] {
        let dir = testdata().join("arch").join(name);
        let reference: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
                .unwrap();
        let batch = batch(&reference);
        let mut model = load_model_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        let worst = logits_difference(&model, &batch, &reference);
        assert!(worst <= 1e-4, "{name}: largest difference {worst:e}");
        make_all_trainable(&mut model).unwrap();
        let (loss, recomputed) = training_loss(&mut model, &batch, RECOMPUTE_WHOLE_LAYERS);
        assert_rel(loss, reference["loss"].as_f64().unwrap(), 1e-5, name);
        // Qwen3's per-head norms keep nothing of attention; the others replay it.
        for keeping in KEEPINGS {
            let (kept_loss, replayed) = training_loss(&mut model, &batch, keeping);
            assert_eq!(
                (kept_loss, &replayed),
                (loss, &recomputed),
                "{name} {keeping:?}"
            );
        }
    }
}

const RECOMPUTE_WHOLE_LAYERS: Checkpointing = Checkpointing::Layers(Keeping {
    attention_layers: 0,
    mlp_layers: 0,
});

/// Every layer keeping everything, attention kept alone, and a mix (the top layer keeping its
/// MLP's results, attention's kept everywhere).
const KEEPINGS: [Checkpointing; 3] = [
    Checkpointing::Layers(Keeping {
        attention_layers: usize::MAX,
        mlp_layers: usize::MAX,
    }),
    Checkpointing::Layers(Keeping {
        attention_layers: usize::MAX,
        mlp_layers: 0,
    }),
    Checkpointing::Layers(Keeping {
        attention_layers: usize::MAX,
        mlp_layers: 1,
    }),
];

#[test]
fn base_loss_through_the_chunked_head() {
    let reference = reference();
    let batch = batch(&reference);
    let mut model = tiny_model();
    make_all_trainable(&mut model).unwrap();
    let expected = reference["base"]["loss"].as_f64().unwrap();
    let (loss, recomputed) = training_loss(&mut model, &batch, RECOMPUTE_WHOLE_LAYERS);
    assert_rel(loss, expected, 1e-5, "base loss");
    // Kept results are the recomputed ones, so every gradient has the same bits.
    for keeping in KEEPINGS {
        let (kept_loss, replayed) = training_loss(&mut model, &batch, keeping);
        assert_eq!((kept_loss, &replayed), (loss, &recomputed), "{keeping:?}");
    }
    let (whole_graph_loss, _) = training_loss(&mut model, &batch, Checkpointing::Off);
    assert_rel(whole_graph_loss, expected, 1e-5, "base loss");
}

#[test]
fn lora_adamw_five_steps_and_adapter() {
    let reference = reference();
    let batch = batch(&reference);
    let mut model = tiny_model();
    load_adapter(&mut model, &testdata().join("tiny-llama-lora-init")).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    assert_eq!(engine.names().len(), 2 * 7 * 2);
    let spec = &reference["lora_adamw"];
    let steps = run_steps(
        &mut model,
        &mut engine,
        std::slice::from_ref(&batch),
        spec,
        true,
    );
    check_steps(&steps, spec, 1e-4, 1e-3);

    let after = SafetensorsFiles::open(&[
        testdata().join("tiny-llama-lora-after5/adapter_model.safetensors")
    ])
    .unwrap();
    let mut worst = 0f32;
    for (name, var) in engine.names().iter().zip(engine.vars()) {
        let expected = after
            .load(
                &format!("base_model.model.{name}"),
                Some(var.dims()),
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
        let diff = (var.as_tensor() - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        worst = worst.max(diff.to_scalar::<f32>().unwrap());
    }
    assert!(worst <= 1e-4, "adapter after 5 steps differs by {worst:e}");
}

/// Runs `spec`'s steps on the model `setup` makes in a pool of 1 and of 2 threads: with two,
/// a batch's rows run as groups side by side, each on one thread, adding to one set of
/// gradients in turn; with one, as one group. The steps agree to float32 rounding.
fn check_row_groups_equal_one_thread(setup: fn(&mut CausalLm), spec: &Value) {
    let reference = reference();
    let batch = batch(&reference);
    assert!(batch.len() > 1, "the fixture batch must have rows to split");
    let steps_on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut model = tiny_model();
            setup(&mut model);
            let mut engine = Engine::Replicated(Trainables::of(&mut model));
            let cores = std::thread::available_parallelism().unwrap().get();
            let inputs = PlanInputs::of(
                &model,
                engine.trained_in_memory(),
                true,
                row_group_threads(),
            );
            let groups = MicroBatchPlan::new(&inputs, batch.len(), batch.num_tokens()).row_groups;
            assert_eq!(groups, threads.min(cores));
            run_steps(
                &mut model,
                &mut engine,
                std::slice::from_ref(&batch),
                spec,
                true,
            )
        })
    };
    let (one, two) = (steps_on(1), steps_on(2));
    for ((loss_1, norm_1), (loss_2, norm_2)) in one.iter().zip(&two) {
        assert_rel(*loss_2, *loss_1, 1e-6, "loss in row groups");
        assert_rel(*norm_2, *norm_1, 1e-5, "gradient norm in row groups");
    }
}

#[test]
fn lora_steps_in_row_groups_equal_one_thread() {
    let setup = |model: &mut CausalLm| {
        load_adapter(model, &testdata().join("tiny-llama-lora-init")).unwrap();
    };
    check_row_groups_equal_one_thread(setup, &reference()["lora_adamw"]);
}

#[test]
fn full_finetuning_steps_in_row_groups_equal_one_thread() {
    let setup = |model: &mut CausalLm| make_all_trainable(model).unwrap();
    check_row_groups_equal_one_thread(setup, &reference()["full_adamw"]);
}

#[test]
fn lora_without_checkpointing_gives_the_same_steps() {
    let reference = reference();
    let batch = batch(&reference);
    let mut model = tiny_model();
    load_adapter(&mut model, &testdata().join("tiny-llama-lora-init")).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    let spec = &reference["lora_adamw"];
    let steps = run_steps(
        &mut model,
        &mut engine,
        std::slice::from_ref(&batch),
        spec,
        false,
    );
    check_steps(&steps, spec, 1e-4, 1e-3);
}

#[test]
fn gradient_accumulation_two_equals_the_single_batch() {
    let reference = reference();
    let batch = batch(&reference);
    let halves = [batch.rows(0, 1), batch.rows(1, 1)];
    let mut model = tiny_model();
    load_adapter(&mut model, &testdata().join("tiny-llama-lora-init")).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    let mut spec = reference["lora_adamw"].clone();
    spec["steps"] = Value::Array(spec["steps"].as_array().unwrap()[..1].to_vec());
    let steps = run_steps(&mut model, &mut engine, &halves, &spec, true);
    assert_rel(
        steps[0].0,
        reference["grad_accumulation_2"]["loss"].as_f64().unwrap(),
        1e-4,
        "accumulated loss",
    );
    check_steps(&steps, &spec, 1e-4, 1e-3);
}

#[test]
fn full_finetuning_three_steps() {
    let reference = reference();
    let batch = batch(&reference);
    let mut model = tiny_model();
    make_all_trainable(&mut model).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    let spec = &reference["full_adamw"];
    let steps = run_steps(
        &mut model,
        &mut engine,
        std::slice::from_ref(&batch),
        spec,
        true,
    );
    check_steps(&steps, spec, 1e-4, 1e-3);
}

#[test]
fn logits_do_not_depend_on_padding_of_other_rows() {
    let reference = reference();
    let batch = batch(&reference);
    let model = tiny_model();
    let device = Device::Cpu;
    let short = batch.rows(1, 1);
    let trimmed = Batch {
        input_ids: vec![short.input_ids[0][..7].to_vec()],
        attention_mask: vec![short.attention_mask[0][..7].to_vec()],
        labels: vec![short.labels[0][..7].to_vec()],
    };
    let logits = |b: &Batch| -> Tensor {
        let ctx =
            ForwardCtx::new(&model.config, &b.attention_mask, DType::F32, 0, &device).unwrap();
        model
            .forward_logits(&b.input_ids_tensor(&device).unwrap(), &ctx)
            .unwrap()
            .narrow(1, 0, 7)
            .unwrap()
    };
    let diff = (logits(&short) - logits(&trimmed))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn full_finetuning_keeps_results_while_they_fit_a_quarter_of_the_state() {
    let mut model = tiny_model();
    make_all_trainable(&mut model).unwrap();
    let engine = Engine::Replicated(Trainables::of(&mut model));
    let Engine::Replicated(trainables) = &engine else {
        unreachable!()
    };
    let budget = 16 * trainables.num_elements() / 4;
    // Bytes a layer keeps per token (the two layers are alike): attention's, the MLP's.
    let bytes = |attention, mlp| 4 * model.layers[0].kept_values_per_token(Keep { attention, mlp });
    let (a, m) = (bytes(true, false), bytes(false, true));
    assert!(a > 0 && m > a, "attention {a}, MLP {m}");
    let policy = |on, tokens| {
        let inputs = PlanInputs::of(&model, engine.trained_in_memory(), on, 1);
        MicroBatchPlan::new(&inputs, 1, tokens).checkpointing
    };
    let keeping = |attention_layers, mlp_layers| {
        Checkpointing::Layers(Keeping {
            attention_layers,
            mlp_layers,
        })
    };
    assert_eq!(policy(true, budget / (2 * a + 2 * m)), keeping(2, 2));
    // Attention's results in both layers and the MLP's in one fit; in two they would not.
    let tokens = budget / (2 * a + m);
    assert!(tokens * (2 * a + 2 * m) > budget);
    assert_eq!(policy(true, tokens), keeping(2, 1));
    // One layer's attention fits, and nothing beside it.
    assert_eq!(policy(true, budget / a), keeping(1, 0));
    assert_eq!(policy(true, budget / a + 1), keeping(0, 0));
    assert_eq!(policy(false, 1), Checkpointing::Off);
    // LoRA trains too few parameters for its state to make room.
    let mut lora = tiny_model();
    load_adapter(&mut lora, &testdata().join("tiny-llama-lora-init")).unwrap();
    let engine = Engine::Replicated(Trainables::of(&mut lora));
    assert_eq!(
        MicroBatchPlan::new(
            &PlanInputs::of(&lora, engine.trained_in_memory(), true, 1),
            1,
            64
        )
        .checkpointing,
        keeping(0, 0)
    );
}
