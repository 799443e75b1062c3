//! A malformed or inconsistent launch variable. A module of its own because reading the
//! variables (`env`) builds process groups, whose errors carry it.

/// A malformed or inconsistent launch variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("{var}='{value}' is not {expected}; set {var} to {expected} or unset it")]
    Malformed {
        var: &'static str,
        value: String,
        expected: &'static str,
    },

    #[error("{var} is not set but {reason}; set {var}")]
    Missing { var: &'static str, reason: String },

    #[error("{0}")]
    Inconsistent(String),
}
