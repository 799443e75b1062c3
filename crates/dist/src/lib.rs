//! Rendezvous, process groups (Gloo on CPU) and the torchrun-style launcher.
//!
//! - [`store`]: the TCP key-value store every process of a job meets in.

mod duration_text;
pub mod store;
mod wire;
