//! Rendezvous, process groups (Gloo on CPU) and the torchrun-style launcher.
//!
//! - [`store`]: the TCP key-value store every process of a job meets in.
//! - [`ProcessGroup`]: collectives for the training code; [`init_from_env`] builds the right
//!   one from torchrun's variables ([`WorkerEnv`]).
//! - [`launch`]: the torchrun-style launcher that starts and supervises the workers of a node
//!   ([`LaunchSpec`] says what to run, [`LaunchError`] why it failed).
//! - `testing` (feature `testing`): the harness of the tests that run real processes, shared
//!   by this crate's tests and those of the crates built on it.

mod duration_text;
mod env;
mod env_error;
mod gloo;
mod launcher;
mod process_group;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod wire;

pub use env::{init_from_env, init_with_env, WorkerEnv, DEFAULT_MASTER_ADDR, LAUNCHED_MARKER_VAR};
pub use env_error::EnvError;
pub use launcher::{
    launch, LaunchError, LaunchSpec, WorkerExit, WorkerFailure, DEFAULT_RENDEZVOUS_TIMEOUT,
    DEFAULT_STOP_GRACE, RENDEZVOUS_TIMEOUT_VAR,
};
pub use process_group::{
    DistError, GlooOptions, GlooProcessGroup, GlooTransport, ProcessGroup, SingleProcessGroup,
};
