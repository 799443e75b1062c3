//! Datasets, chat templates and tokenization for supervised fine-tuning, token for token as
//! LLaMA-Factory 0.9.5 produces them.
//!
//! The entry points are [`prepare`] (or [`prepare_cached`]) for training and evaluation
//! examples, and [`load_template`] + [`encode_datasets`] + [`to_json_lines`] for writing the
//! examples of datasets as JSON lines.

pub mod args;
mod cache;
mod chat_template;
pub mod convert;
pub mod error;
pub mod jsonl;
mod numpy_rng;
pub mod pipeline;
pub mod pyjson;
pub mod reader;
pub mod registry;
mod split;
pub mod supervised;
pub mod template;
pub mod templates;
pub mod tokenizer;
pub mod tools;

pub use args::DataArgs;
pub use error::{DataError, Result};
pub use jsonl::{to_json_lines, write_json_lines};
pub use pipeline::{
    cache_file, encode_datasets, load_template, prepare, prepare_cached, prepare_with, CacheStatus,
    Prepared,
};
pub use supervised::{Example, IGNORE_INDEX};
pub use template::Template;
pub use templates::TEMPLATE_NAMES;
pub use tokenizer::Tokenizer;
pub use tools::TOOL_FORMAT_NAMES;
