//! Writing a model directory: shards and index as transformers lays them out, read back whole.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ff_model::hf_export::{save_model_dir, INDEX_FILE};
use ff_model::load::load_model_dir;
use ff_model::{CausalLm, ForwardCtx};
use serde_json::Value;

fn logits(model: &CausalLm) -> Vec<f32> {
    let ids = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
    let ctx = ForwardCtx::new(&model.config, &[vec![1; 5]], model.dtype, 0, &Device::Cpu).unwrap();
    model
        .forward_logits(&ids, &ctx)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn shards_past_the_size_limit_with_an_index_and_loads_back_equal() {
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
    let mut model = load_model_dir(&tiny, DType::F32, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The two 12.6 MB vocabulary matrices cannot share a 13 MB shard.
    save_model_dir(&mut model, dir.path(), DType::F32, 13_000_000).unwrap();
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap())
            .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let files: std::collections::BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
    assert_eq!(
        files.into_iter().collect::<Vec<_>>(),
        vec![
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert_eq!(map["lm_head.weight"], "model-00002-of-00002.safetensors");
    let total: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let declared = index["metadata"]["total_size"].as_u64().unwrap();
    assert!(declared < total && total - declared < 100_000);
    let back = load_model_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(logits(&back), logits(&model));
}
