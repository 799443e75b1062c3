//! Reproduces the QLoRA runs of the LoRA run of tiny-llama-reference.json with every decoder
//! Linear quantized to NF4 by bitsandbytes (compute float32), without and with double
//! quantization.
//!
//! testdata/tiny-llama-qlora-reference.json was made with bitsandbytes 0.50.2 on CPU, whose
//! dequantize_4bit kernel finds a value's absmax per row (block `row * (cols / 64) + col / 64`)
//! while its quantizer blocks the flattened weight (block `(row * cols + col) / 64`). The two
//! agree when in_features is a multiple of 64, as in real models, but not for the fixture's
//! down_proj (in_features 176). Our dequantization follows the quantizer, as bitsandbytes' own
//! generic kernel does: testdata/tiny-llama-qlora-reference-generic-dequant.json is the same run
//! with that kernel (testdata/make_qlora_reference.py). The original fixture is reproduced too, by
//! giving down_proj the row-indexed dequantization, which shows that kernel is the whole
//! difference.

use candle_core::{DType, Device, Tensor};
use ff_model::load::load_model_dir_quantized;
use ff_model::peft::load_adapter;
use ff_model::quant::{FourBitType, QuantFormat, QuantizedWeight, BLOCKSIZE};
use ff_model::Param;
use ff_train::{train_step, AdamW, AdamWConfig, Engine, StepOptions, Trainables};
use serde_json::Value;

mod common;
use common::{batch, reference, testdata};

fn qlora_reference(file: &str) -> Value {
    let text = std::fs::read_to_string(testdata().join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Which reference a run is compared with.
enum Dequantization {
    /// Blocks of the flattened weight, as bitsandbytes quantizes and its generic kernel
    /// dequantizes (and as ferrofactory does).
    Flattened,
    /// bitsandbytes 0.50.2's CPU kernel: absmax found per row.
    BitsandbytesCpuRows,
}

/// The dense weight bitsandbytes' CPU kernel makes of `q`: each value's code times the absmax
/// of block `row * (cols / 64) + col / 64`.
fn row_indexed_dequantization(q: &QuantizedWeight) -> Tensor {
    let [rows, cols] = q.dims();
    let four = q.four_bit().expect("a 4-bit weight");
    let code = four.kind.code();
    let packed: Vec<u8> = q.codes().to_vec1().unwrap();
    let values: Vec<f32> = (0..rows * cols)
        .map(|k| {
            let (row, col) = (k / cols, k % cols);
            let byte = packed[k / 2];
            let nibble = if k % 2 == 0 { byte >> 4 } else { byte & 15 };
            code[nibble as usize] * four.block_absmax(row * (cols / BLOCKSIZE) + col / BLOCKSIZE)
        })
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
}

fn check(variant: &str, double_quant: bool, dequantization: Dequantization) {
    let qlora = qlora_reference(match dequantization {
        Dequantization::Flattened => "tiny-llama-qlora-reference-generic-dequant.json",
        Dequantization::BitsandbytesCpuRows => "tiny-llama-qlora-reference.json",
    });
    let batch = batch(&reference());
    let format = QuantFormat::FourBit {
        kind: FourBitType::Nf4,
        double_quant,
    };
    let mut model = load_model_dir_quantized(
        &testdata().join("tiny-llama"),
        DType::F32,
        &Device::Cpu,
        Some(format),
    )
    .unwrap();
    // Every decoder Linear is quantized; embeddings, norms and lm_head stay float.
    for (name, p) in model.params_mut() {
        let is_linear = name.starts_with("model.layers.") && name.contains("_proj.");
        assert_eq!(matches!(p, Param::Quantized(_)), is_linear, "{name}");
    }
    if let Dequantization::BitsandbytesCpuRows = dequantization {
        for (_, p) in model.params_mut() {
            let dense = match p.quantized() {
                Some(q) if q.dims()[1] % BLOCKSIZE != 0 => row_indexed_dequantization(q),
                _ => continue,
            };
            *p = Param::Frozen(dense);
        }
    }
    load_adapter(&mut model, &testdata().join("tiny-llama-lora-init")).unwrap();
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    assert_eq!(engine.names().len(), 2 * 7 * 2);

    let opt = &qlora["optimizer"];
    let betas = opt["betas"].as_array().unwrap();
    let mut optimizer = AdamW::new(
        AdamWConfig {
            beta1: betas[0].as_f64().unwrap(),
            beta2: betas[1].as_f64().unwrap(),
            eps: opt["eps"].as_f64().unwrap(),
            weight_decay: opt["weight_decay"].as_f64().unwrap(),
        },
        engine.names(),
    );
    let options = StepOptions {
        max_grad_norm: opt["max_grad_norm"].as_f64(),
        gradient_checkpointing: true,
    };
    let lr = opt["lr"].as_f64().unwrap();
    let steps = qlora["qlora_adamw_steps"][variant].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    for expected in steps {
        let step = train_step(
            &mut model,
            &mut engine,
            &mut optimizer,
            std::slice::from_ref(&batch),
            lr,
            options,
            0,
            &ff_dist::SingleProcessGroup,
        )
        .unwrap();
        for (what, actual) in [("loss", step.loss), ("grad_norm", step.grad_norm)] {
            let want = expected[what].as_f64().unwrap();
            let rel = (actual - want).abs() / want.abs();
            assert!(
                rel <= 1e-3,
                "{variant} step {}: {what} {actual} vs {want} (relative error {rel:e})",
                expected["step"]
            );
        }
    }
}

#[test]
fn qlora_nf4_five_steps() {
    check("single", false, Dequantization::Flattened);
}

#[test]
fn qlora_nf4_double_quantization_five_steps() {
    check("double_quant", true, Dequantization::Flattened);
}

/// Measured within 5e-6 at every step (asserted at 1e-3). (With double quantization bitsandbytes' backward decodes the
/// absmax along another path, whose gradients differ from its forward's by about 1e-5 relative;
/// the generic-kernel trajectories above hold it within 1e-3, this one drifts past that.)
#[test]
fn the_bitsandbytes_cpu_fixture_differs_only_by_its_row_indexed_dequantization() {
    check("single", false, Dequantization::BitsandbytesCpuRows);
}
