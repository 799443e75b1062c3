//! The rendezvous store: a small TCP key-value server hosted at MASTER_ADDR:MASTER_PORT
//! (by node 0's launcher, or by rank 0 when there is no launcher) and its client.
//!
//! Processes find each other through it: the launchers check that all nodes agree and
//! report failures through it, and process groups exchange their transport addresses in it.
//! Every blocking call takes a timeout and its error names the keys it waited for.

mod client;
mod error;
mod protocol;
mod server;

pub use client::{CompareSet, StoreClient};
pub use error::StoreError;
pub use server::StoreServer;
