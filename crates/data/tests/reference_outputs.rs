//! Preprocessing equals LLaMA-Factory 0.9.5's own output, id for id: the two reference files in
//! testdata/token_refs and the per-template references in tests/refs (made by
//! tests/refs/make_refs.py from LLaMA-Factory itself). A config without `template` uses the
//! tokenizer's chat template, as LLaMA-Factory does.

use std::path::{Path, PathBuf};

use ff_data::{load_template, prepare_with, to_json_lines, DataArgs, Example};
use serde_json::Value;

/// The date make_refs.py pins for the llama3 tool prompt.
const TOOL_DATE: &str = "15 Jan 2026";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_root() -> PathBuf {
    crate_dir().join("../..")
}

fn list(config: &Value, key: &str) -> Vec<String> {
    config[key]
        .as_str()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// DataArgs for a reference file's config line (LLaMA-Factory's key names).
fn args_from(config: &Value) -> DataArgs {
    let dataset_dir = match config["dataset_dir"].as_str() {
        Some("tests") => crate_dir().join("tests/data"),
        _ => repo_root().join("data"),
    };
    let defaults = DataArgs::default();
    DataArgs {
        dataset: list(config, "dataset"),
        eval_dataset: list(config, "eval_dataset"),
        dataset_dir,
        template: config["template"].as_str().unwrap_or_default().to_string(),
        cutoff_len: config["cutoff_len"].as_u64().unwrap() as usize,
        max_samples: config["max_samples"].as_u64().map(|n| n as usize),
        train_on_prompt: config["train_on_prompt"].as_bool().unwrap_or(false),
        mask_history: config["mask_history"].as_bool().unwrap_or(false),
        val_size: config["val_size"].as_f64().unwrap_or(0.0),
        seed: config["seed"].as_u64().unwrap_or(defaults.seed),
        default_system: config["default_system"].as_str().map(str::to_string),
        enable_thinking: config["enable_thinking"].as_bool().unwrap_or(true),
        preserve_thinking: config["preserve_thinking"].as_bool().unwrap_or(false),
        tool_format: config["tool_format"].as_str().map(str::to_string),
    }
}

fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_same(name: &str, split: &str, ours: &[Example], expected: &[Value]) {
    let ours = parse_lines(&to_json_lines(ours));
    assert_eq!(
        ours.len(),
        expected.len(),
        "{name}: number of {split} examples"
    );
    for (i, (a, e)) in ours.iter().zip(expected).enumerate() {
        assert_eq!(
            a["input_ids"], e["input_ids"],
            "{name}: input_ids of {split} example {i}"
        );
        assert_eq!(
            a["labels"], e["labels"],
            "{name}: labels of {split} example {i}"
        );
    }
}

fn check(path: &Path) {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let text = std::fs::read_to_string(path).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let config: Value = serde_json::from_str(first).unwrap();
    let args = args_from(&config["config"]);
    let smollm2 = repo_root().join("testdata/smollm2-135m-config");
    // A case may swap in another chat template (tests/data/chat_templates) for SmolLM2's.
    let swapped = tempfile::tempdir().unwrap();
    let tokenizer_dir = match config["config"]["chat_template"].as_str() {
        Some(file) => {
            for name in ["tokenizer.json", "tokenizer_config.json"] {
                std::fs::copy(smollm2.join(name), swapped.path().join(name)).unwrap();
            }
            let source = crate_dir().join("tests/data/chat_templates").join(file);
            std::fs::copy(source, swapped.path().join("chat_template.jinja")).unwrap();
            swapped.path().to_path_buf()
        }
        None => smollm2,
    };
    let (mut template, tokenizer) = load_template(&args, &tokenizer_dir).unwrap();
    template.tool_date = TOOL_DATE.to_string();
    let prepared = prepare_with(&args, &template, &tokenizer).unwrap();
    assert_same(&name, "training", &prepared.train, &parse_lines(rest));
    let eval_path = path.with_extension("eval.jsonl");
    let expected_eval = match std::fs::read_to_string(&eval_path) {
        Ok(text) => parse_lines(&text),
        Err(_) => Vec::new(),
    };
    assert_same(&name, "evaluation", &prepared.eval, &expected_eval);
}

#[test]
fn alpaca_template_on_alpaca_en_demo() {
    check(&repo_root().join("testdata/token_refs/alpaca__alpaca_en_demo__1024__20.jsonl"));
}

#[test]
fn smollm2_template_on_identity_and_alpaca() {
    check(&repo_root().join("testdata/token_refs/smollm2__identity+alpaca_en_demo__256__40.jsonl"));
}

/// One test per reference file in tests/refs.
macro_rules! references {
    ($($case:ident),* $(,)?) => {
        $(
            // Named after the file, template and case separated by `__`.
            #[allow(non_snake_case)]
            #[test]
            fn $case() {
                check(&crate_dir().join(concat!("tests/refs/", stringify!($case), ".jsonl")));
            }
        )*

        #[test]
        fn every_reference_file_has_a_test() {
            let listed = [$(stringify!($case)),*];
            for entry in std::fs::read_dir(crate_dir().join("tests/refs")).unwrap() {
                let file = entry.unwrap().file_name().to_string_lossy().into_owned();
                if let Some(case) = file.strip_suffix(".jsonl").filter(|c| !c.ends_with(".eval")) {
                    assert!(listed.contains(&case), "tests/refs/{file} has no test");
                }
            }
        }
    };
}

references!(
    alpaca__chat,
    alpaca__tools,
    alpaca__eval_dataset,
    bailing__chat,
    bailing__tools,
    breeze__chat,
    breeze__tools,
    breeze__mask_history_cutoff,
    chatml__chat,
    chatml__tools,
    chatml__tool_format_qwen,
    chatml__val_with_broken_rows,
    deepseek__chat,
    deepseek__tools,
    default__chat,
    default__tools,
    default__glaive,
    empty__chat,
    empty__tools,
    gemma__chat,
    gemma__tools,
    gemma__tool_format_mistral,
    llama2__chat,
    llama2__tools,
    llama2__alpaca_zh,
    llama3__chat,
    llama3__tools,
    llama3__cutoff_100,
    llama3__glaive,
    mistral__chat,
    mistral__tools,
    mistral__glaive,
    phi__chat,
    phi__tools,
    phi__mask_history_cutoff,
    qwen__chat,
    qwen__tools,
    qwen__glaive,
    qwen__mask_history_cutoff,
    qwen3__chat,
    qwen3__tools,
    qwen3__thinking,
    qwen3__thinking_off,
    qwen3__thinking_mask_history,
    qwen3__thinking_mask_history_preserve,
    qwen3__thinking_off_mask_history,
    qwen3_nothink__chat,
    qwen3_nothink__tools,
    qwen3_nothink__thinking,
    smollm2__chat,
    smollm2__tools,
    smollm2__train_on_prompt,
    smollm2__val_fraction,
    smollm2__val_count,
    smollm2__num_samples,
    smollm2__num_samples_split,
    tokenizer_template__chat,
    tokenizer_template__tools,
    tokenizer_template_think__thinking,
    vicuna__chat,
    vicuna__tools,
    yi__chat,
    yi__tools,
    zephyr__chat,
    zephyr__tools,
    zephyr__default_system,
);
