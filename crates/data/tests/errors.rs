//! Mistakes in datasets and arguments are errors that say what is wrong and where.

use std::path::{Path, PathBuf};

use ff_data::{prepare, DataArgs, DataError};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tokenizer_dir() -> PathBuf {
    crate_dir().join("../../testdata/smollm2-135m-config")
}

fn args(dataset: &str, dataset_dir: &Path) -> DataArgs {
    DataArgs {
        dataset: dataset.split(',').map(str::to_string).collect(),
        dataset_dir: dataset_dir.to_path_buf(),
        template: "smollm2".into(),
        cutoff_len: 256,
        ..DataArgs::default()
    }
}

fn error_of(args: &DataArgs) -> (DataError, String) {
    let error = prepare(args, &tokenizer_dir()).unwrap_err();
    let message = error.to_string();
    (error, message)
}

fn test_data() -> PathBuf {
    crate_dir().join("tests/data")
}

#[test]
fn unknown_dataset_lists_the_defined_ones() {
    let (error, message) = error_of(&args("chat_multiturn,no_such_set", &test_data()));
    assert!(
        matches!(error, DataError::UnknownDataset { .. }),
        "{error:?}"
    );
    assert!(
        message.contains("dataset `no_such_set` is not defined"),
        "{message}"
    );
    assert!(message.contains("dataset_info.json"), "{message}");
    for name in ["alpaca_history", "chat_multiturn", "thinking", "tool_calls"] {
        assert!(message.contains(name), "{message} lacks {name}");
    }
}

#[test]
fn unknown_template_lists_the_templates() {
    let mut args = args("chat_multiturn", &test_data());
    args.template = "llama9".into();
    let (error, message) = error_of(&args);
    assert!(
        matches!(error, DataError::UnknownTemplate { .. }),
        "{error:?}"
    );
    assert!(
        message.contains("template `llama9` does not exist"),
        "{message}"
    );
    assert!(
        message.contains("llama3") && message.contains("qwen3_nothink"),
        "{message}"
    );
}

#[test]
fn unknown_tool_format_lists_the_formats() {
    let mut args = args("tool_calls", &test_data());
    args.tool_format = Some("glm9".into());
    let (_, message) = error_of(&args);
    assert!(
        message.contains("tool format `glm9` does not exist"),
        "{message}"
    );
    assert!(
        message.contains("default, llama3, mistral, qwen"),
        "{message}"
    );
}

#[test]
fn hub_dataset_asks_for_a_local_file() {
    let (error, message) = error_of(&args("hub_only", &test_data()));
    assert!(matches!(error, DataError::HubDataset { .. }), "{error:?}");
    assert!(message.contains("dataset `hub_only`"), "{message}");
    assert!(message.contains("hf_hub_url"), "{message}");
    assert!(message.contains("point `file_name`"), "{message}");
}

#[test]
fn missing_column_names_the_column_and_the_dataset() {
    let (error, message) = error_of(&args("missing_column", &test_data()));
    assert!(
        matches!(error, DataError::MissingColumn { .. }),
        "{error:?}"
    );
    assert!(message.contains("dataset `missing_column`"), "{message}");
    assert!(message.contains("`persona`"), "{message}");
    assert!(message.contains("alpaca_history.jsonl"), "{message}");
}

#[test]
fn malformed_json_lines_name_the_file_and_line() {
    let (error, message) = error_of(&args("bad_json", &test_data()));
    assert!(
        matches!(error, DataError::Json { line: 2, .. }),
        "{error:?}"
    );
    assert!(
        message.contains("bad.jsonl line 2 is not valid JSON"),
        "{message}"
    );
}

#[test]
fn malformed_json_array_names_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("dataset_info.json"),
        r#"{"broken": {"file_name": "broken.json"}}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("broken.json"),
        "[\n  {\"instruction\": \"a\", \"input\": \"\", \"output\": \"b\"},\n  {\"instruction\": \"c\",, }\n]\n",
    )
    .unwrap();
    let (error, message) = error_of(&args("broken", dir.path()));
    assert!(
        matches!(error, DataError::Json { line: 3, .. }),
        "{error:?}"
    );
    assert!(message.contains("broken.json line 3"), "{message}");
}

#[test]
fn nothing_left_after_dropping_broken_rows_is_an_error() {
    let (error, message) = error_of(&args("all_broken", &test_data()));
    assert!(matches!(error, DataError::Empty { .. }), "{error:?}");
    assert!(
        message.contains("the training set (all_broken)"),
        "{message}"
    );
    assert!(message.contains("no examples left"), "{message}");
}

#[test]
fn val_size_and_eval_dataset_exclude_each_other() {
    let mut args = args("chat_multiturn", &test_data());
    args.eval_dataset = vec!["alpaca_history".into()];
    args.val_size = 0.2;
    let (_, message) = error_of(&args);
    assert!(
        message.contains("`val_size` and `eval_dataset` cannot both be set"),
        "{message}"
    );
}

#[test]
fn mask_history_and_train_on_prompt_exclude_each_other() {
    let mut args = args("chat_multiturn", &test_data());
    args.mask_history = true;
    args.train_on_prompt = true;
    let (_, message) = error_of(&args);
    assert!(
        message.contains("cannot be combined with `train_on_prompt`"),
        "{message}"
    );
}

#[test]
fn a_val_size_that_takes_every_row_is_an_error() {
    let mut args = args("chat_multiturn", &test_data());
    args.val_size = 9.0;
    let (_, message) = error_of(&args);
    assert!(message.contains("leaves none to train on"), "{message}");
}

#[test]
fn efficient_eos_templates_refuse_train_on_prompt() {
    let mut args = args("chat_multiturn", &test_data());
    args.template = "breeze".into();
    args.train_on_prompt = true;
    let (_, message) = error_of(&args);
    assert!(
        message.contains("template `breeze`") && message.contains("train_on_prompt"),
        "{message}"
    );
}

#[test]
fn a_function_call_llama2_templates_cannot_parse_names_the_example() {
    // Llama2-style templates read function calls as bare JSON, so a thought in front fails
    // (LLaMA-Factory raises on it too).
    let mut args = args("tool_calls_tagged", &test_data());
    args.template = "mistral".into();
    let (error, message) = error_of(&args);
    assert!(matches!(error, DataError::BadExample { .. }), "{error:?}");
    assert!(
        message.contains("example 0 of dataset `tool_calls_tagged`"),
        "{message}"
    );
    assert!(
        message.contains("function call is not valid JSON"),
        "{message}"
    );
}

#[test]
fn a_tokenizer_folder_without_tokenizer_json_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let error = prepare(&args("chat_multiturn", &test_data()), dir.path()).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("has no tokenizer.json"), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
}
