//! Peak memory of FULL_SHARD on a model large enough to matter: SmolLM2-135M's shape with
//! random weights (548 MB in float32). With cpu_ram_efficient_loading, rank 1 never holds the
//! whole model: it keeps half the parameters, and its peak is one process's less that half, plus
//! the largest unit held twice while it is gathered. At this size the largest unit is the root's
//! 113 MB embedding table, so the peak saving is small; it grows with the layers' share.
//!
//! A test binary of its own: the single-process peak is read with getrusage(RUSAGE_CHILDREN),
//! which would also count any other test's children.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ff_config::{FsdpConfig, ShardingStrategy};
use ff_fsio::{peak_rss_bytes, PeakOf};
use support::{assert_success, Job};

const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const HEAD_DIM: usize = 64;
const VOCAB: usize = 49152;

/// Writes a SmolLM2-135M-shaped llama with random weights and the tiny fixture's tokenizer.
fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
    for i in 0..LAYERS {
        let p = format!("model.layers.{i}");
        let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        shapes.extend([
            (format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, HIDDEN]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, HIDDEN]),
            (format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, q]),
            (
                format!("{p}.mlp.gate_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            (
                format!("{p}.mlp.up_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
            ),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
            ),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let mut bytes = Vec::with_capacity(n * 4);
            for _ in 0..n {
                let v = if name.contains("norm") {
                    1.0f32
                } else {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
                };
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            (name, shape, bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(
            support::root().join("testdata/tiny-llama").join(file),
            dir.join(file),
        )
        .unwrap();
    }
}

#[test]
fn full_shard_rank_1_peaks_at_one_process_less_its_unheld_half() {
    let dir = tempfile::tempdir().unwrap();
    let job = Job::new(dir.path());
    let model = dir.path().join("smollm2-shaped");
    write_model(&model);
    let config = support::fixture_config(dir.path(), "");
    let text: String = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("adapter_name_or_path") && !l.starts_with("model_name_or_path"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &config,
        format!("model_name_or_path: {}\n{text}", model.display()),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);

    let single = job
        .train("single", &config, &["output_dir=one", "max_steps=1"], &[])
        .wait_until(deadline);
    assert_success(&single);
    let single_peak = peak_rss_bytes(PeakOf::WaitedChildren).unwrap();

    let settings = FsdpConfig {
        sharding_strategy: ShardingStrategy::FullShard,
        cpu_ram_efficient_loading: true,
        ..FsdpConfig::default()
    }
    .to_env_value();
    let two = job
        .train(
            "two",
            &config,
            &[
                "output_dir=two",
                "max_steps=1",
                "per_device_train_batch_size=1",
            ],
            &[
                ("FORCE_TORCHRUN", "1"),
                ("NPROC_PER_NODE", "2"),
                (ff_config::FSDP_ENV_VAR, settings.as_str()),
            ],
        )
        .wait_until(deadline);
    assert_success(&two);
    let reports: HashMap<u64, (u64, u64, u64, u64)> = support::fsdp_reports(&two.stderr)
        .into_iter()
        .map(|n| (n[0], (n[1], n[2], n[4], n[6])))
        .collect();
    // rank -> (parameter bytes held, model bytes, largest unit, peak RSS)
    let (held, model_bytes, largest_unit, rank1_peak) = reports[&1];
    assert!(
        model_bytes > 500_000_000,
        "the model is SmolLM2-sized: {model_bytes}"
    );
    assert!(
        held <= model_bytes / 2 + 40_000_000,
        "rank 1 holds {held} of {model_bytes}"
    );
    println!(
        "peak RSS: one process {single_peak} bytes, FULL_SHARD rank 1 {rank1_peak} bytes (model {model_bytes})"
    );
    // One process less the half of the parameters rank 1 does not hold, plus a unit held twice
    // while it is gathered (as received, then as tensors), plus room for the head's logits of a
    // chunk. (Half of one process's peak was the bound while loading held the checkpoint twice
    // and so doubled that peak; one process now peaks at the model plus its working memory.)
    let bound = single_peak - model_bytes / 2 + 2 * largest_unit + 100_000_000;
    assert!(
        rank1_peak <= bound,
        "rank 1 peaked at {rank1_peak} bytes, over {bound} (one process: {single_peak})"
    );
}
