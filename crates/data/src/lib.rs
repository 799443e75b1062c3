//! Datasets, chat templates and tokenization, token for token as LLaMA-Factory 0.9.5 produces
//! them for supervised fine-tuning.

pub mod convert;
pub mod error;
pub mod reader;
pub mod registry;
pub mod supervised;
pub mod template;
pub mod tokenizer;

use std::path::{Path, PathBuf};

pub use error::{DataError, Result};
pub use supervised::{Example, IGNORE_INDEX};
pub use template::{Template, TEMPLATE_NAMES};
pub use tokenizer::Tokenizer;

use supervised::{encode_example, SupervisedOptions};

/// The data keys of a training config.
#[derive(Clone, Debug, PartialEq)]
pub struct DataArgs {
    pub dataset: Vec<String>,
    pub eval_dataset: Vec<String>,
    pub dataset_dir: PathBuf,
    pub template: String,
    pub cutoff_len: usize,
    pub max_samples: Option<usize>,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    /// A fraction when below 1, else a number of examples.
    pub val_size: f64,
    pub seed: u64,
    pub default_system: Option<String>,
    pub enable_thinking: bool,
}

/// Training and evaluation examples, and the padding id for batches.
pub struct Prepared {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub pad_token_id: u32,
}

/// Loads the tokenizer from `tokenizer_dir` and the template named in `args`, fixed up as
/// LLaMA-Factory does (EOS replacement, stop words, default system prompt).
pub fn load_template(args: &DataArgs, tokenizer_dir: &Path) -> Result<(Template, Tokenizer)> {
    let mut tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
    let mut template = Template::by_name(&args.template)?;
    if let Some(system) = &args.default_system {
        template.default_system = system.clone();
    }
    template.enable_thinking = args.enable_thinking;
    template.fix_tokenizer(&mut tokenizer)?;
    Ok((template, tokenizer))
}

/// Examples of `names`, concatenated in order, each dataset cut to `max_samples`, in dataset
/// order before any shuffling.
pub fn encode_datasets(
    names: &[String],
    args: &DataArgs,
    template: &Template,
    tokenizer: &Tokenizer,
) -> Result<Vec<Example>> {
    let options = SupervisedOptions {
        cutoff_len: args.cutoff_len,
        train_on_prompt: args.train_on_prompt,
        mask_history: args.mask_history,
    };
    let mut examples = Vec::new();
    for attr in registry::resolve(&args.dataset_dir, names)? {
        let rows = reader::read_rows(&attr.file)?;
        let limit = args
            .max_samples
            .unwrap_or(usize::MAX)
            .min(attr.num_samples.unwrap_or(usize::MAX));
        for (index, row) in rows.iter().take(limit).enumerate() {
            let conversation = convert::convert(row, &attr, index)?;
            if let Some(example) = encode_example(&conversation, template, tokenizer, options)? {
                examples.push(example);
            }
        }
    }
    Ok(examples)
}

/// Everything `train` needs from the data side.
pub fn prepare(args: &DataArgs, tokenizer_dir: &Path) -> Result<Prepared> {
    let (template, tokenizer) = load_template(args, tokenizer_dir)?;
    let mut train = encode_datasets(&args.dataset, args, &template, &tokenizer)?;
    if train.is_empty() {
        return Err(DataError::Invalid(format!(
            "dataset {} yields no training examples after preprocessing; check its columns and the template",
            args.dataset.join(",")
        )));
    }
    let eval = if !args.eval_dataset.is_empty() {
        encode_datasets(&args.eval_dataset, args, &template, &tokenizer)?
    } else if args.val_size > 0.0 {
        split_off_eval(&mut train, args.val_size, args.seed)?
    } else {
        Vec::new()
    };
    Ok(Prepared {
        train,
        eval,
        pad_token_id: tokenizer
            .pad_token_id
            .or(tokenizer.eos_token_id)
            .unwrap_or(0),
    })
}

/// Moves a seeded random `val_size` of the examples into an evaluation set (a fraction rounds
/// up, as `train_test_split` does). The draw is our own, not numpy's.
fn split_off_eval(train: &mut Vec<Example>, val_size: f64, seed: u64) -> Result<Vec<Example>> {
    let n = train.len();
    let n_eval = if val_size < 1.0 {
        (val_size * n as f64).ceil() as usize
    } else {
        val_size as usize
    };
    if n_eval >= n {
        return Err(DataError::Invalid(format!(
            "val_size {val_size} leaves no training examples out of {n}; make it smaller"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut state = seed ^ 0x5A17_DA7A;
    for i in (1..n).rev() {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        order.swap(i, ((state >> 33) % (i as u64 + 1)) as usize);
    }
    let mut slots: Vec<Option<Example>> = std::mem::take(train).into_iter().map(Some).collect();
    let eval = order[..n_eval]
        .iter()
        .filter_map(|&i| slots[i].take())
        .collect();
    *train = order[n_eval..]
        .iter()
        .filter_map(|&i| slots[i].take())
        .collect();
    Ok(eval)
}

/// One JSON line per example, `{"input_ids": [...], "labels": [...]}`, as `preprocess` writes.
pub fn to_json_lines(examples: &[Example]) -> String {
    let mut out = String::new();
    for e in examples {
        out.push_str(&serde_json::to_string(e).expect("plain data serialises"));
        out.push('\n');
    }
    out
}
