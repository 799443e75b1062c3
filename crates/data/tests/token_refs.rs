//! Preprocessing equals LLaMA-Factory 0.9.5's own output (testdata/token_refs), id for id.

use std::path::{Path, PathBuf};

use ff_data::{prepare, to_json_lines, DataArgs};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn args_from(config: &Value) -> DataArgs {
    let list = |key: &str| -> Vec<String> {
        config[key]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    DataArgs {
        dataset: list("dataset"),
        eval_dataset: Vec::new(),
        dataset_dir: root().join("data"),
        template: config["template"].as_str().unwrap().to_string(),
        cutoff_len: config["cutoff_len"].as_u64().unwrap() as usize,
        max_samples: config["max_samples"].as_u64().map(|n| n as usize),
        train_on_prompt: config["train_on_prompt"].as_bool().unwrap_or(false),
        mask_history: false,
        val_size: 0.0,
        seed: 42,
        default_system: None,
        enable_thinking: true,
    }
}

fn check(reference: &str) {
    let text = std::fs::read_to_string(root().join("testdata/token_refs").join(reference)).unwrap();
    let mut lines = text.lines();
    let config: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    let args = args_from(&config["config"]);
    let prepared = prepare(&args, &root().join("testdata/smollm2-135m-config")).unwrap();
    let ours = to_json_lines(&prepared.train);
    let expected: Vec<Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    let actual: Vec<Value> = ours
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        actual.len(),
        expected.len(),
        "{reference}: number of examples"
    );
    for (i, (a, e)) in actual.iter().zip(&expected).enumerate() {
        assert_eq!(
            a["input_ids"], e["input_ids"],
            "{reference}: input_ids of example {i}"
        );
        assert_eq!(
            a["labels"], e["labels"],
            "{reference}: labels of example {i}"
        );
    }
}

#[test]
fn alpaca_template_on_alpaca_en_demo() {
    check("alpaca__alpaca_en_demo__1024__20.jsonl");
}

#[test]
fn smollm2_template_on_identity_and_alpaca() {
    check("smollm2__identity+alpaca_en_demo__256__40.jsonl");
}
