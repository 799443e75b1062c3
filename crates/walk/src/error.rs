/// A walk that could not go on.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),

    /// The residency could not bring a part's parameters or keep its gradients: a collective
    /// with other ranks, a peer's shard, an offload file. Its own error, whole.
    #[error(transparent)]
    Residency(Box<dyn std::error::Error + Send + Sync>),
}

impl WalkError {
    pub fn residency(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Residency(Box::new(error))
    }
}

pub type WalkResult<T> = std::result::Result<T, WalkError>;
