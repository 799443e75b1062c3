use std::io;
use std::time::Duration;

use crate::duration_text::duration_text;

/// What can go wrong hosting or using the rendezvous store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("port {port} on {addr} is in use; pick another MASTER_PORT")]
    PortInUse { addr: String, port: u16 },

    #[error("could not listen on {addr}:{port} ({source}); set MASTER_ADDR to an address of this machine")]
    Listen {
        addr: String,
        port: u16,
        source: io::Error,
    },

    #[error("could not resolve the host name '{host}' ({reason}); set MASTER_ADDR to a reachable host name or IP address")]
    Resolve { host: String, reason: String },

    #[error(
        "could not reach the rendezvous store at {host}:{port} within {} ({last_error}); check that node 0 was started and that MASTER_ADDR and MASTER_PORT are the same on every node",
        duration_text(*waited)
    )]
    Unreachable {
        host: String,
        port: u16,
        waited: Duration,
        last_error: String,
    },

    #[error(
        "timed out after {} waiting for {} in the rendezvous store at {host}:{port}; the process that should set {} did not start, failed, or is slower than the timeout allows",
        duration_text(*waited),
        key_list(keys),
        if keys.len() == 1 { "it" } else { "them" }
    )]
    Timeout {
        keys: Vec<String>,
        waited: Duration,
        host: String,
        port: u16,
    },

    #[error("lost the connection to the rendezvous store at {host}:{port} ({reason}); the process hosting it (node 0's launcher, or rank 0) has probably stopped")]
    ConnectionLost {
        host: String,
        port: u16,
        reason: String,
    },

    #[error("the rendezvous store at {host}:{port} refused a request: {reason}")]
    Refused {
        host: String,
        port: u16,
        reason: String,
    },
}

fn key_list(keys: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("'{k}'"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(" and {} more keys", keys.len() - SHOWN));
    }
    if keys.len() == 1 {
        format!("key {text}")
    } else {
        format!("keys {text}")
    }
}
