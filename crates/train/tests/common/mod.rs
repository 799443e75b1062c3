//! Fixture access shared by the integration tests.

use std::path::{Path, PathBuf};

use ff_train::Batch;
use serde_json::Value;

pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

/// testdata/tiny-llama-reference.json (PyTorch + transformers + PEFT).
pub fn reference() -> Value {
    let text = std::fs::read_to_string(testdata().join("tiny-llama-reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The `batch` of a reference file.
pub fn batch(reference: &Value) -> Batch {
    let b = &reference["batch"];
    let rows = |key: &str| -> Vec<Vec<i64>> { serde_json::from_value(b[key].clone()).unwrap() };
    Batch {
        input_ids: rows("input_ids")
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u32).collect())
            .collect(),
        attention_mask: rows("attention_mask")
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as u8).collect())
            .collect(),
        labels: rows("labels"),
    }
}
