//! Benchmark: one LoRA or QLoRA training step of a SmolLM2-135M-shaped model with random weights,
//! tokens per second and peak resident memory. Run each kind in its own process (peak memory is
//! the process's high-water mark), release build:
//!
//! ```text
//! cargo run --release -p ferrofactory --example qlora_step -- lora
//! cargo run --release -p ferrofactory --example qlora_step -- nf4
//! cargo run --release -p ferrofactory --example qlora_step -- nf4-double
//! cargo run --release -p ferrofactory --example qlora_step -- int8
//! ```
//!
//! Optional further arguments: batch, sequence length, timed steps (defaults 4 256 3), and
//! `full-graph` to keep the whole graph instead of recomputing each layer in backward.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use ff_fsio::{peak_rss_bytes, PeakOf};
use ff_model::finetune::{apply_lora, LoraSpec};
use ff_model::load::{from_tensors_quantized, RandomInit};
use ff_model::quant::{FourBitType, QuantFormat};
use ff_model::{ModelConfig, Param};
use ff_train::{train_step, AdamW, AdamWConfig, Batch, Engine, StepOptions, Trainables};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kind = args.first().map(String::as_str).unwrap_or("lora");
    let number = |i: usize, default: usize| -> Result<usize> {
        args.get(i)
            .map(|s| {
                s.parse()
                    .with_context(|| format!("argument {i} `{s}` is not a number"))
            })
            .unwrap_or(Ok(default))
    };
    let (batch, seq, steps) = (number(1, 4)?, number(2, 256)?, number(3, 3)?);
    let quant = match kind {
        "lora" => None,
        "nf4" | "nf4-double" => Some(QuantFormat::FourBit {
            kind: FourBitType::Nf4,
            double_quant: kind == "nf4-double",
        }),
        "int8" => Some(QuantFormat::Int8Rowwise),
        other => bail!("unknown kind `{other}`; use lora, nf4, nf4-double or int8"),
    };

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/smollm2-135m-config");
    let config = ModelConfig::from_dir(&dir)?;
    let vocab = config.vocab_size as u64;
    let mut model = from_tensors_quantized(config, &RandomInit, DType::F32, &Device::Cpu, quant)?;
    let frozen_linear_bytes: usize = model
        .params_mut()
        .into_iter()
        .filter(|(name, _)| name.starts_with("model.layers.") && name.contains("_proj."))
        .map(|(_, p)| match p {
            Param::Quantized(q) => q.byte_len(),
            other => other.elem_count() * 4,
        })
        .sum();
    // One pass of dequantization over every frozen Linear: a step makes three (forward, its
    // recomputation under checkpointing, backward).
    let start = Instant::now();
    for (_, p) in model.params_mut() {
        if let Param::Quantized(q) = p {
            q.dequantize(DType::F32, &Device::Cpu)?;
        }
    }
    let dequantize_seconds = start.elapsed().as_secs_f64();
    let spec = LoraSpec {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: LoraSpec::parse_targets("all")?,
        use_rslora: false,
    };
    apply_lora(&mut model, &spec, 0)?;
    let mut engine = Engine::Replicated(Trainables::of(&mut model));
    let mut optimizer = AdamW::new(AdamWConfig::default(), engine.names());

    let mut state = 0x5EED_u64;
    let rows: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..seq)
                .map(|_| {
                    state = ff_model::dropout::derive_seed(state, 1);
                    (state % vocab) as u32
                })
                .collect()
        })
        .collect();
    let data = Batch {
        labels: rows
            .iter()
            .map(|r| r.iter().map(|&t| t as i64).collect())
            .collect(),
        attention_mask: rows.iter().map(|r| vec![1; r.len()]).collect(),
        input_ids: rows,
    };
    let options = StepOptions {
        max_grad_norm: Some(1.0),
        gradient_checkpointing: args.get(4).map(String::as_str) != Some("full-graph"),
    };
    let mut times = Vec::new();
    for i in 0..=steps {
        let start = Instant::now();
        let stats = train_step(
            &mut model,
            &mut engine,
            &mut optimizer,
            std::slice::from_ref(&data),
            1e-4,
            options,
            i as u64,
            &ff_dist::SingleProcessGroup,
        )?;
        let seconds = start.elapsed().as_secs_f64();
        eprintln!("step {i}: {seconds:.2} s, loss {:.4}", stats.loss);
        if i > 0 {
            times.push(seconds);
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{kind:<11} checkpointing {:<5} frozen decoder Linears {:>7.1} MB   dequantize all {:.3} s   tokens/s {:>7.1}   peak RSS {:>7.1} MB",
        options.gradient_checkpointing,
        frozen_linear_bytes as f64 / 1e6,
        dequantize_seconds,
        (batch * seq) as f64 / median,
        peak_rss_bytes(PeakOf::ThisProcess).context("no VmHWM in /proc/self/status")? as f64 / 1e6
    );
    Ok(())
}
