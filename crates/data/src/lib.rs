//! Datasets, chat templates and tokenization for supervised fine-tuning, token for token as
//! LLaMA-Factory 0.9.5 produces them.
//!
//! The entry points are [`prepare`] (or [`prepare_cached`]) for training and evaluation
//! examples, and [`load_template`] + [`encode_datasets`] + [`to_json_lines`] for writing the
//! examples of datasets as JSON lines.
//!
//! Where the result can differ from LLaMA-Factory's:
//! - A folder dataset reads its files in name order; LLaMA-Factory takes the file system's
//!   listing order.
//! - An entry with both `file_name` and a hub URL reads the local file; LLaMA-Factory downloads.
//! - Rows are read as JSON, not through an Arrow table, so columns of mixed types are accepted
//!   where `datasets` would refuse them.
//! - Tool JSON: integers beyond 64 bits are read as floats, and floats with more than 17
//!   significant digits may differ in the last digit; `str()` of rare non-printable Unicode
//!   characters in tool descriptions is not escaped as Python would.
//! - The llama3 tool prompt's "Today Date" is the UTC date (Python uses local time).

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
