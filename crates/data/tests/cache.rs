//! The preprocessing cache: reused for the same inputs, rebuilt when any input changes or the
//! file is damaged, and always equal to preprocessing without it.

use std::path::{Path, PathBuf};

use ff_data::{cache_file, prepare, prepare_cached, CacheStatus, DataArgs};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A private copy of the test datasets and the tokenizer, so the test can change them.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        for file in [
            "dataset_info.json",
            "chat_multiturn.json",
            "alpaca_history.jsonl",
        ] {
            std::fs::copy(crate_dir().join("tests/data").join(file), data.join(file)).unwrap();
        }
        let tokenizer = dir.path().join("tokenizer");
        std::fs::create_dir_all(&tokenizer).unwrap();
        let source = crate_dir().join("../../testdata/smollm2-135m-config");
        for file in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(source.join(file), tokenizer.join(file)).unwrap();
        }
        Self { dir }
    }

    fn args(&self) -> DataArgs {
        DataArgs {
            dataset: vec!["chat_multiturn".into(), "alpaca_history".into()],
            dataset_dir: self.dir.path().join("data"),
            template: "smollm2".into(),
            cutoff_len: 128,
            val_size: 0.25,
            ..DataArgs::default()
        }
    }

    fn tokenizer(&self) -> PathBuf {
        self.dir.path().join("tokenizer")
    }

    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
}

fn status(inputs: &Inputs, args: &DataArgs) -> CacheStatus {
    prepare_cached(args, &inputs.tokenizer(), &inputs.cache())
        .unwrap()
        .1
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn second_run_reads_the_cache_and_gets_the_same_examples() {
    let inputs = Inputs::new();
    let args = inputs.args();
    let uncached = prepare(&args, &inputs.tokenizer()).unwrap();
    let (built, first) = prepare_cached(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    let (read, second) = prepare_cached(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    assert_eq!(first, CacheStatus::Built);
    assert_eq!(second, CacheStatus::Hit);
    assert_eq!(built, uncached);
    assert_eq!(read, uncached);
    assert!(!uncached.eval.is_empty());
    // Only the final file is left: the temporary one was renamed.
    let path = cache_file(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(files_in(&inputs.cache()), vec![name]);
}

#[test]
fn any_changed_input_builds_again() {
    let inputs = Inputs::new();
    let args = inputs.args();
    assert_eq!(status(&inputs, &args), CacheStatus::Built);
    assert_eq!(status(&inputs, &args), CacheStatus::Hit);

    let changed_args = [
        DataArgs {
            cutoff_len: 64,
            ..args.clone()
        },
        DataArgs {
            max_samples: Some(3),
            ..args.clone()
        },
        DataArgs {
            train_on_prompt: true,
            ..args.clone()
        },
        DataArgs {
            mask_history: true,
            ..args.clone()
        },
        DataArgs {
            seed: 7,
            ..args.clone()
        },
        DataArgs {
            template: "chatml".into(),
            ..args.clone()
        },
        DataArgs {
            default_system: Some("Other.".into()),
            ..args.clone()
        },
    ];
    for changed in &changed_args {
        assert_eq!(status(&inputs, changed), CacheStatus::Built, "{changed:?}");
    }

    // Editing a data file, dataset_info.json or the tokenizer invalidates too.
    let data_file = args.dataset_dir.join("alpaca_history.jsonl");
    let mut rows = std::fs::read_to_string(&data_file).unwrap();
    rows.push_str("{\"instruction\": \"new\", \"input\": \"\", \"output\": \"row\"}\n");
    std::fs::write(&data_file, rows).unwrap();
    assert_eq!(status(&inputs, &args), CacheStatus::Built);
    assert_eq!(status(&inputs, &args), CacheStatus::Hit);

    let info = args.dataset_dir.join("dataset_info.json");
    let text = std::fs::read_to_string(&info).unwrap();
    std::fs::write(
        &info,
        text.replacen("{", "{\"extra\": {\"file_name\": \"x.json\"},", 1),
    )
    .unwrap();
    assert_eq!(status(&inputs, &args), CacheStatus::Built);

    let config = inputs.tokenizer().join("tokenizer_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace(
            "\"pad_token\": \"<|im_end|>\"",
            "\"pad_token\": \"<|endoftext|>\"",
        ),
    )
    .unwrap();
    let (prepared, status) = prepare_cached(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    assert_eq!(status, CacheStatus::Built);
    assert_eq!(prepared.pad_token_id, 0, "the new pad token is used");
}

#[test]
fn a_damaged_cache_file_is_rebuilt_not_trusted() {
    let inputs = Inputs::new();
    let args = inputs.args();
    let (good, _) = prepare_cached(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    let path = cache_file(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
    let bytes = std::fs::read(&path).unwrap();

    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    let damaged: [&[u8]; 3] = [&flipped, &bytes[..bytes.len() / 3], b"not a cache file"];
    for contents in damaged {
        std::fs::write(&path, contents).unwrap();
        let (prepared, status) =
            prepare_cached(&args, &inputs.tokenizer(), &inputs.cache()).unwrap();
        assert_eq!(status, CacheStatus::Built);
        assert_eq!(prepared, good);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the file is written anew"
        );
    }
}
