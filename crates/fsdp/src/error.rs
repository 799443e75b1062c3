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

    #[error("reading a peer's frozen shard from shared memory failed: {0}")]
    PeerShard(#[from] std::io::Error),
}

pub type FsdpResult<T> = std::result::Result<T, FsdpError>;

/// The sharded engine's failures reach the walk whole.
impl From<FsdpError> for ff_walk::WalkError {
    fn from(error: FsdpError) -> Self {
        ff_walk::WalkError::residency(error)
    }
}
