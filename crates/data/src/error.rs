use std::path::PathBuf;

/// A problem with datasets, templates or the tokenizer, in one sentence that says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}:{line}: invalid JSON ({message})", path.display())]
    Json {
        path: PathBuf,
        line: usize,
        message: String,
    },

    #[error("{0}")]
    Invalid(String),
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
