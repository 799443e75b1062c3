//! What to launch: the node layout, the rendezvous address and the worker command.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::error::LaunchError;
use crate::env::{parse_count, parse_index, parse_port, DEFAULT_MASTER_ADDR};
use crate::env_error::EnvError;

/// How long launchers wait for each other by default (joining the store, the node check).
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(600);

/// Overrides [`DEFAULT_RENDEZVOUS_TIMEOUT`], in whole seconds. torchrun's equivalent is
/// `--rdzv-conf join_timeout=…`, which a launch through environment variables cannot pass.
pub const RENDEZVOUS_TIMEOUT_VAR: &str = "FERROFACTORY_RDZV_TIMEOUT";

/// How long workers get to exit after SIGTERM before they are killed, by default.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);

/// One node's launch: it runs `nproc_per_node` copies of `program args` as ranks
/// `node_rank * nproc_per_node ..` of a job of `nnodes * nproc_per_node` workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    pub nnodes: usize,
    pub node_rank: usize,
    pub nproc_per_node: usize,
    /// Where node 0's launcher hosts the store (its address as the other nodes reach it).
    pub master_addr: String,
    /// The store's port; `None` picks a free one, which only a single node can do.
    pub master_port: Option<u16>,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Extra variables for every worker, set after the launch variables (so they win).
    pub env: Vec<(String, String)>,
    /// Bounds joining the store and waiting for the other nodes.
    pub rendezvous_timeout: Duration,
    /// A digest of the training configuration; every node must present the same one.
    pub config_hash: String,
    /// Time between SIGTERM and SIGKILL when stopping workers.
    pub stop_grace: Duration,
}

impl LaunchSpec {
    /// Builds a spec from the launcher variables in `env` (LLaMA-Factory's conventions):
    /// NNODES (default 1); NODE_RANK, or RANK as the node rank when NODE_RANK is unset and
    /// NNODES > 1; NPROC_PER_NODE (default `accelerators`, at least 1); MASTER_ADDR (default
    /// 127.0.0.1); MASTER_PORT (required with several nodes, else a free port);
    /// [`RENDEZVOUS_TIMEOUT_VAR`] (default [`DEFAULT_RENDEZVOUS_TIMEOUT`]). The stop grace takes
    /// its default and the config hash is empty; set those fields afterwards.
    pub fn from_env(
        env: &HashMap<String, String>,
        accelerators: usize,
        program: impl Into<PathBuf>,
        args: Vec<OsString>,
    ) -> Result<Self, LaunchError> {
        let nnodes = parse_count(env, "NNODES")?.unwrap_or(1);
        let node_rank = match parse_index(env, "NODE_RANK")? {
            Some(node) => node,
            None if nnodes > 1 => match parse_index(env, "RANK")? {
                Some(node) => node,
                None => {
                    return Err(EnvError::Missing {
                        var: "NODE_RANK",
                        reason: format!(
                            "NNODES is {nnodes}; set it to this node's rank, 0 to {}, on each node",
                            nnodes - 1
                        ),
                    }
                    .into())
                }
            },
            None => 0,
        };
        let nproc_per_node = parse_count(env, "NPROC_PER_NODE")?.unwrap_or(accelerators.max(1));
        let master_addr = match env.get("MASTER_ADDR").map(|s| s.trim()) {
            Some(addr) if !addr.is_empty() => addr.to_string(),
            _ => DEFAULT_MASTER_ADDR.to_string(),
        };
        let master_port = parse_port(env, "MASTER_PORT")?;
        let rendezvous_timeout = parse_count(env, RENDEZVOUS_TIMEOUT_VAR)?
            .map_or(DEFAULT_RENDEZVOUS_TIMEOUT, |secs| {
                Duration::from_secs(secs as u64)
            });
        let spec = LaunchSpec {
            nnodes,
            node_rank,
            nproc_per_node,
            master_addr,
            master_port,
            program: program.into(),
            args,
            env: Vec::new(),
            rendezvous_timeout,
            config_hash: String::new(),
            stop_grace: DEFAULT_STOP_GRACE,
        };
        spec.validate()?;
        Ok(spec)
    }

    pub fn world_size(&self) -> usize {
        self.nnodes * self.nproc_per_node
    }

    /// The global rank of this node's worker `local_rank`.
    pub fn global_rank(&self, local_rank: usize) -> usize {
        self.node_rank * self.nproc_per_node + local_rank
    }

    /// Checks the spec's own consistency; [`crate::launch`] calls it first.
    pub fn validate(&self) -> Result<(), LaunchError> {
        let invalid = |text: String| Err(LaunchError::InvalidSpec(text));
        if self.nnodes == 0 {
            return invalid("NNODES must be at least 1".into());
        }
        if self.nproc_per_node == 0 {
            return invalid("NPROC_PER_NODE must be at least 1".into());
        }
        if self.node_rank >= self.nnodes {
            return invalid(format!(
                "NODE_RANK {} is not below NNODES {}; number the nodes 0 to {}",
                self.node_rank,
                self.nnodes,
                self.nnodes - 1
            ));
        }
        if self.nnodes > 1 && self.master_port.is_none() {
            return Err(EnvError::Missing {
                var: "MASTER_PORT",
                reason: format!(
                    "NNODES is {}; set the same free port on every node, e.g. 29500",
                    self.nnodes
                ),
            }
            .into());
        }
        if self.master_addr.trim().is_empty() {
            return invalid("MASTER_ADDR is empty; set it to node 0's address".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn spec(pairs: &[(&str, &str)], accelerators: usize) -> Result<LaunchSpec, LaunchError> {
        LaunchSpec::from_env(&env(pairs), accelerators, "/bin/true", Vec::new())
    }

    #[test]
    fn single_node_defaults() {
        let s = spec(&[], 0).unwrap();
        assert_eq!((s.nnodes, s.node_rank, s.nproc_per_node), (1, 0, 1));
        assert_eq!(s.master_addr, "127.0.0.1");
        assert_eq!(s.master_port, None);
        assert_eq!(spec(&[], 4).unwrap().nproc_per_node, 4);
        assert_eq!(spec(&[("NPROC_PER_NODE", "3")], 4).unwrap().world_size(), 3);
    }

    #[test]
    fn several_nodes_take_the_node_rank_from_node_rank_or_rank() {
        let base = [
            ("NNODES", "2"),
            ("MASTER_PORT", "29500"),
            ("MASTER_ADDR", "10.0.0.1"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            spec(&all, 2)
        };
        assert_eq!(with(&[("NODE_RANK", "1")]).unwrap().node_rank, 1);
        assert_eq!(with(&[("RANK", "1")]).unwrap().node_rank, 1);
        assert_eq!(
            with(&[("NODE_RANK", "0"), ("RANK", "1")])
                .unwrap()
                .node_rank,
            0
        );
        let s = with(&[("NODE_RANK", "1")]).unwrap();
        assert_eq!((s.world_size(), s.global_rank(1)), (4, 3));

        let err = with(&[]).unwrap_err().to_string();
        assert!(
            err.starts_with("NODE_RANK is not set but NNODES is 2"),
            "{err}"
        );
        let err = with(&[("NODE_RANK", "2")]).unwrap_err().to_string();
        assert!(err.contains("NODE_RANK 2 is not below NNODES 2"), "{err}");
    }

    #[test]
    fn several_nodes_need_a_port_and_values_must_parse() {
        let err = spec(&[("NNODES", "2"), ("NODE_RANK", "0")], 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("MASTER_PORT is not set but NNODES is 2"),
            "{err}"
        );
        let err = spec(&[("NPROC_PER_NODE", "0")], 1).unwrap_err().to_string();
        assert!(
            err.starts_with("NPROC_PER_NODE='0' is not a whole number of at least 1"),
            "{err}"
        );
        let err = spec(&[("NNODES", "x")], 1).unwrap_err().to_string();
        assert!(err.starts_with("NNODES='x'"), "{err}");
        let err = spec(&[("MASTER_PORT", "port")], 1).unwrap_err().to_string();
        assert!(err.contains("a TCP port between 1 and 65535"), "{err}");
    }

    #[test]
    fn rendezvous_timeout_comes_from_its_variable_in_seconds() {
        assert_eq!(
            spec(&[], 1).unwrap().rendezvous_timeout,
            DEFAULT_RENDEZVOUS_TIMEOUT
        );
        assert_eq!(
            spec(&[(RENDEZVOUS_TIMEOUT_VAR, "3")], 1)
                .unwrap()
                .rendezvous_timeout,
            Duration::from_secs(3)
        );
        let err = spec(&[(RENDEZVOUS_TIMEOUT_VAR, "0")], 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("FERROFACTORY_RDZV_TIMEOUT='0' is not a whole number of at least 1"),
            "{err}"
        );
    }
}
