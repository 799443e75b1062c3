//! From data arguments to training and evaluation examples, in LLaMA-Factory's order: read each
//! dataset, draw its `num_samples` rows if it has that setting, keep the first `max_samples`,
//! convert, concatenate, split off the evaluation rows, then template and tokenize every row (on
//! all cores) and drop the ones SFT cannot use.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::args::{DataArgs, ValSize};
use crate::cache::{self, CachedData, KeyHasher};
use crate::convert::{convert, Conversation};
use crate::error::{DataError, Result};
use crate::numpy_rng::{BitGenerator, Mt19937};
use crate::reader::{dataset_files, read_rows};
use crate::registry::{self, DatasetAttr, DATASET_INFO};
use crate::split::train_test_split;
use crate::supervised::{encode_example, Example, SupervisedOptions};
use crate::template::{Template, TemplateKind};
use crate::tokenizer::{Tokenizer, TOKENIZER_FILES};
use crate::tools::{today, ToolFormat, TOOL_FORMAT_NAMES};

/// Training and evaluation examples, and the padding id for batches.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub train: Vec<Example>,
    pub eval: Vec<Example>,
    pub pad_token_id: u32,
}

/// Whether `prepare_cached` read its result from the cache or built (and stored) it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Built,
}

/// NumPy's global generator as `transformers.set_seed(seed)` leaves it, which LLaMA-Factory's
/// `num_samples` draws from; seeded on first use, shared by all datasets in loading order.
struct GlobalRng {
    seed: u64,
    rng: Option<Mt19937>,
}

impl GlobalRng {
    fn new(seed: u64) -> Self {
        Self { seed, rng: None }
    }

    fn get(&mut self) -> Result<&mut Mt19937> {
        let seed = u32::try_from(self.seed).map_err(|_| {
            DataError::Args(format!(
                "seed {} is too large for NumPy's generator, which num_samples uses; use a seed below 2^32",
                self.seed
            ))
        })?;
        Ok(self.rng.get_or_insert_with(|| Mt19937::from_seed(seed)))
    }
}

/// The rows a dataset contributes, in order: all of them, or LLaMA-Factory's `num_samples`
/// draw; then the first `max_samples`.
fn selected_rows(
    attr: &DatasetAttr,
    n: usize,
    max_samples: Option<usize>,
    rng: &mut GlobalRng,
) -> Result<Vec<usize>> {
    let mut indices: Vec<usize> = match attr.num_samples {
        None => (0..n).collect(),
        Some(_) if n == 0 => {
            return Err(DataError::BadDatasetEntry {
                name: attr.name.clone(),
                reason: "it has no rows to draw num_samples from".into(),
            })
        }
        Some(target) => {
            let rng = rng.get()?;
            let mut indices = rng.permutation(n);
            indices.truncate(target);
            if target > n {
                indices.extend(rng.choice(n, target - n));
            }
            indices
        }
    };
    indices.truncate(max_samples.unwrap_or(usize::MAX));
    Ok(indices)
}

/// One converted row and where it came from, for error messages.
struct Row {
    dataset: String,
    index: usize,
    conversation: Conversation,
}

/// The tokenizer from `tokenizer_dir` and the template named in `args`, set up as LLaMA-Factory's
/// `get_template_and_fix_tokenizer` does (tool format, default system, thinking flags, EOS
/// replacement, stop words, pad token).
pub fn load_template(args: &DataArgs, tokenizer_dir: &Path) -> Result<(Template, Tokenizer)> {
    let mut tokenizer = Tokenizer::from_dir(tokenizer_dir)?;
    let mut template = if args.template.is_empty() {
        match Template::from_tokenizer(&tokenizer)? {
            Some(template) => template,
            None => Template::by_name("empty")?,
        }
    } else {
        Template::by_name(&args.template)?
    };
    if args.train_on_prompt && template.efficient_eos {
        return Err(DataError::Args(format!(
            "template `{}` puts EOS at the end of the sequence and cannot train_on_prompt; turn train_on_prompt off",
            template.name
        )));
    }
    if let Some(name) = &args.tool_format {
        let format = ToolFormat::from_name(name).ok_or_else(|| DataError::UnknownToolFormat {
            name: name.clone(),
            available: TOOL_FORMAT_NAMES.to_vec(),
        })?;
        template.set_tool_format(format);
    }
    if let Some(system) = &args.default_system {
        template.default_system = system.clone();
    }
    if template.kind == TemplateKind::Reasoning {
        template.enable_thinking = args.enable_thinking;
        template.preserve_thinking = args.preserve_thinking;
    }
    template.tool_date = today();
    template.fix_tokenizer(&mut tokenizer)?;
    Ok((template, tokenizer))
}

/// Rows of one dataset, first `max_samples` only, converted. Work runs in parallel but results
/// (and the error reported, the first in row order) come back in row order.
fn load_dataset(
    attr: &DatasetAttr,
    max_samples: Option<usize>,
    rng: &mut GlobalRng,
) -> Result<Vec<Row>> {
    let files = dataset_files(&attr.path)?;
    if files.is_empty() {
        return Err(DataError::BadDatasetEntry {
            name: attr.name.clone(),
            reason: format!("{} holds no files", attr.path.display()),
        });
    }
    let rows = read_rows(&files)?;
    // A column exists when any row has it; rows without it read it as null.
    if !rows.is_empty() {
        let present: HashSet<&str> = rows
            .iter()
            .filter_map(|r| r.as_object())
            .flat_map(|r| r.keys().map(String::as_str))
            .collect();
        if let Some(column) = attr.columns().into_iter().find(|c| !present.contains(c)) {
            return Err(DataError::MissingColumn {
                dataset: attr.name.clone(),
                column: column.to_string(),
                path: attr.path.clone(),
            });
        }
    }
    selected_rows(attr, rows.len(), max_samples, rng)?
        .into_par_iter()
        .map(|index| {
            let conversation =
                convert(&rows[index], attr).map_err(|reason| DataError::BadExample {
                    dataset: attr.name.clone(),
                    index,
                    reason,
                })?;
            Ok(Row {
                dataset: attr.name.clone(),
                index,
                conversation,
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect()
}

/// The converted rows of `names`, concatenated in order.
fn load_rows(names: &[String], args: &DataArgs, rng: &mut GlobalRng) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for attr in registry::resolve(&args.dataset_dir, names)? {
        rows.extend(load_dataset(&attr, args.max_samples, rng)?);
    }
    Ok(rows)
}

/// Examples of `rows` in order; rows the supervised processor drops are left out.
fn encode_rows(
    rows: &[Row],
    args: &DataArgs,
    template: &Template,
    tokenizer: &Tokenizer,
) -> Result<Vec<Example>> {
    let options = SupervisedOptions {
        cutoff_len: args.cutoff_len,
        train_on_prompt: args.train_on_prompt,
        mask_history: args.mask_history,
    };
    let encoded: Vec<Option<Example>> = rows
        .par_iter()
        .map(|row| {
            encode_example(&row.conversation, template, tokenizer, options).map_err(|reason| {
                DataError::BadExample {
                    dataset: row.dataset.clone(),
                    index: row.index,
                    reason,
                }
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .collect::<Result<_>>()?;
    Ok(encoded.into_iter().flatten().collect())
}

fn non_empty(examples: Vec<Example>, what: impl FnOnce() -> String) -> Result<Vec<Example>> {
    if examples.is_empty() {
        return Err(DataError::Empty { what: what() });
    }
    Ok(examples)
}

/// Examples of `names`, concatenated in order, each dataset cut to `max_samples`, in dataset
/// order before any shuffling and without a split. No examples at all is an error.
pub fn encode_datasets(
    names: &[String],
    args: &DataArgs,
    template: &Template,
    tokenizer: &Tokenizer,
) -> Result<Vec<Example>> {
    check_args(args)?;
    let rows = load_rows(names, args, &mut GlobalRng::new(args.seed))?;
    non_empty(encode_rows(&rows, args, template, tokenizer)?, || {
        format!("dataset {}", names.join(","))
    })
}

fn check_args(args: &DataArgs) -> Result<()> {
    if args.dataset.is_empty() {
        return Err(DataError::Args(
            "no training dataset is named; set `dataset` to names from dataset_info.json".into(),
        ));
    }
    if !args.eval_dataset.is_empty() && args.val_size() != ValSize::None {
        return Err(DataError::Args(
            "`val_size` and `eval_dataset` cannot both be set; keep one of them".into(),
        ));
    }
    if args.mask_history && args.train_on_prompt {
        return Err(DataError::Args(
            "`mask_history` trains on the last answer only and cannot be combined with `train_on_prompt`; turn one off".into(),
        ));
    }
    if args.cutoff_len == 0 {
        return Err(DataError::Args("cutoff_len must be at least 1".into()));
    }
    Ok(())
}

/// Everything training needs from the data side, without a cache.
pub fn prepare(args: &DataArgs, tokenizer_dir: &Path) -> Result<Prepared> {
    let (template, tokenizer) = load_template(args, tokenizer_dir)?;
    prepare_with(args, &template, &tokenizer)
}

/// `prepare` with a template and tokenizer already loaded by [`load_template`].
pub fn prepare_with(
    args: &DataArgs,
    template: &Template,
    tokenizer: &Tokenizer,
) -> Result<Prepared> {
    check_args(args)?;
    let mut rng = GlobalRng::new(args.seed);
    let mut rows = load_rows(&args.dataset, args, &mut rng)?;
    let eval_rows = if !args.eval_dataset.is_empty() {
        load_rows(&args.eval_dataset, args, &mut rng)?
    } else {
        let (train_indices, eval_indices) =
            train_test_split(rows.len(), args.val_size(), args.seed)?;
        let mut slots: Vec<Option<Row>> = rows.into_iter().map(Some).collect();
        let mut take = |indices: &[usize]| -> Vec<Row> {
            indices.iter().filter_map(|&i| slots[i].take()).collect()
        };
        let eval = take(&eval_indices);
        rows = take(&train_indices);
        eval
    };
    let train = non_empty(encode_rows(&rows, args, template, tokenizer)?, || {
        format!("the training set ({})", args.dataset.join(","))
    })?;
    let wants_eval = !args.eval_dataset.is_empty() || args.val_size() != ValSize::None;
    let eval = encode_rows(&eval_rows, args, template, tokenizer)?;
    let eval = if wants_eval {
        non_empty(eval, || "the evaluation set".to_string())?
    } else {
        eval
    };
    let pad_token_id = tokenizer
        .pad_token_id
        .or(tokenizer.eos_token_id)
        .ok_or_else(|| {
            DataError::Args("the tokenizer has neither a pad nor an EOS token".into())
        })?;
    Ok(Prepared {
        train,
        eval,
        pad_token_id,
    })
}

/// The cache file `prepare_cached` uses for these inputs: its name is a hash of the arguments,
/// the tokenizer files, dataset_info.json and every data file read (and the date, when the
/// llama3 tool prompt carries it).
pub fn cache_file(args: &DataArgs, tokenizer_dir: &Path, cache_dir: &Path) -> Result<PathBuf> {
    let mut key = KeyHasher::new();
    let args_json = serde_json::to_vec(args).map_err(|e| DataError::Args(e.to_string()))?;
    key.part("args", &args_json);
    let mut hash_file = |path: &Path| key.file(path).map_err(|e| DataError::io(path, e));
    for name in TOKENIZER_FILES {
        hash_file(&tokenizer_dir.join(name))?;
    }
    hash_file(&args.dataset_dir.join(DATASET_INFO))?;
    let names: Vec<String> = args
        .dataset
        .iter()
        .chain(&args.eval_dataset)
        .cloned()
        .collect();
    for attr in registry::resolve(&args.dataset_dir, &names)? {
        for file in dataset_files(&attr.path)? {
            hash_file(&file)?;
        }
    }
    // Templates read from a tokenizer use the default tool format.
    let template_tools = if args.template.is_empty() {
        ToolFormat::Default
    } else {
        Template::by_name(&args.template)?.tool_format
    };
    let tool_format = args.tool_format.as_deref().and_then(ToolFormat::from_name);
    let llama3_tools =
        tool_format == Some(ToolFormat::Llama3) || template_tools == ToolFormat::Llama3;
    if llama3_tools {
        key.part("date", today().as_bytes());
    }
    Ok(cache::cache_path(cache_dir, &key.finish()))
}

/// `prepare`, reusing the result stored in `cache_dir` for the same inputs. A cache file that
/// does not verify is rebuilt, never trusted.
pub fn prepare_cached(
    args: &DataArgs,
    tokenizer_dir: &Path,
    cache_dir: &Path,
) -> Result<(Prepared, CacheStatus)> {
    check_args(args)?;
    let path = cache_file(args, tokenizer_dir, cache_dir)?;
    if let Some(data) = std::fs::read(&path)
        .ok()
        .and_then(|b| cache::from_bytes(&b))
    {
        let prepared = Prepared {
            train: data.train,
            eval: data.eval,
            pad_token_id: data.pad_token_id,
        };
        return Ok((prepared, CacheStatus::Hit));
    }
    let prepared = prepare(args, tokenizer_dir)?;
    let data = CachedData {
        train: prepared.train,
        eval: prepared.eval,
        pad_token_id: prepared.pad_token_id,
    };
    std::fs::create_dir_all(cache_dir).map_err(|e| DataError::io(cache_dir, e))?;
    ff_fsio::write_atomically(&path, |file| file.write_all(&cache::to_bytes(&data)))?;
    let prepared = Prepared {
        train: data.train,
        eval: data.eval,
        pad_token_id: data.pad_token_id,
    };
    Ok((prepared, CacheStatus::Built))
}
