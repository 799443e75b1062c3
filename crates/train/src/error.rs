use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ff_model::ModelError),

    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),

    #[error("cannot access {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error(transparent)]
    Write(#[from] ff_fsio::WriteError),

    #[error("{0}")]
    Checkpoint(String),

    #[error(transparent)]
    Dist(#[from] ff_dist::DistError),

    #[error(transparent)]
    Fsdp(#[from] ff_fsdp::FsdpError),

    #[error(transparent)]
    Walk(#[from] ff_walk::WalkError),

    #[error("{0}")]
    Config(String),

    #[error("the row groups of a micro-batch went apart: {0}")]
    RowGroups(String),

    #[error("training stopped by interrupt after step {step}; resume with resume_from_checkpoint={}", checkpoint.display())]
    Interrupted { step: u64, checkpoint: PathBuf },
}

impl TrainError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type TrainResult<T> = std::result::Result<T, TrainError>;
