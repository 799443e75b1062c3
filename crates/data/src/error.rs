//! Everything that can go wrong while turning datasets into training examples, each as one
//! sentence that says what is wrong and how to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(transparent)]
    Write(#[from] ff_fsio::WriteError),

    #[error("{} line {line} is not valid JSON ({message}); fix that line", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("dataset `{name}` is not defined in {}; defined datasets are: {}", path.display(), available.join(", "))]
    UnknownDataset {
        name: String,
        path: PathBuf,
        available: Vec<String>,
    },

    #[error(
        "dataset `{name}` is loaded from a hub ({key}), which this machine does not download; \
         download it on a machine with access and point `file_name` in dataset_info.json at the local copy"
    )]
    HubDataset { name: String, key: String },

    #[error("dataset `{name}` in dataset_info.json is not usable: {reason}")]
    BadDatasetEntry { name: String, reason: String },

    #[error(
        "dataset `{dataset}` maps a column to `{column}` in dataset_info.json, but {} has no such column; \
         fix the `columns` entry or the data",
        path.display()
    )]
    MissingColumn {
        dataset: String,
        column: String,
        path: PathBuf,
    },

    #[error("example {index} of dataset `{dataset}` cannot be used: {reason}")]
    BadExample {
        dataset: String,
        index: usize,
        reason: String,
    },

    #[error("template `{name}` does not exist; available templates are: {}", available.join(", "))]
    UnknownTemplate {
        name: String,
        available: Vec<&'static str>,
    },

    #[error("tool format `{name}` does not exist; available tool formats are: {}", available.join(", "))]
    UnknownToolFormat {
        name: String,
        available: Vec<&'static str>,
    },

    #[error("the tokenizer in {} cannot be used: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },

    #[error("{what} has no examples left after preprocessing; check the dataset format, its dataset_info.json entry and the template")]
    Empty { what: String },

    #[error("invalid data arguments: {0}")]
    Args(String),
}

impl DataError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
