use ff_dist::DistError;

#[derive(Debug, thiserror::Error)]
pub enum FsdpError {
    /// A setting that cannot work with this model or world.
    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    Dist(#[from] DistError),

    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    /// The engine could not keep gradients where it stores them (an offload file).
    #[error("{0}")]
    GradStorage(Box<dyn std::error::Error + Send + Sync>),

    #[error("reading a peer's frozen shard from shared memory failed: {0}")]
    PeerShard(#[from] std::io::Error),
}

pub type FsdpResult<T> = std::result::Result<T, FsdpError>;
