//! A worker's view of the job: torchrun's environment variables, parsed and checked, and the
//! process group they describe.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::env_error::EnvError;
use crate::process_group::{
    DistError, GlooOptions, GlooProcessGroup, GlooTransport, ProcessGroup, SingleProcessGroup,
};
use crate::store::{StoreClient, StoreServer};

/// Set (to "1") in every worker the launcher starts. A worker that sees it does not launch
/// workers of its own, and knows that the launcher hosts the store.
pub const LAUNCHED_MARKER_VAR: &str = "FERROFACTORY_LAUNCHED";

/// MASTER_ADDR when unset, as in torchrun.
pub const DEFAULT_MASTER_ADDR: &str = "127.0.0.1";

/// The torchrun variables a worker runs under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEnv {
    /// Global rank (RANK).
    pub rank: usize,
    /// Number of workers in the job (WORLD_SIZE).
    pub world_size: usize,
    /// Rank among the workers of this node (LOCAL_RANK).
    pub local_rank: usize,
    /// Workers per node (LOCAL_WORLD_SIZE).
    pub local_world_size: usize,
    /// This node's rank (NODE_RANK, else torchrun's GROUP_RANK).
    pub node_rank: usize,
    pub master_addr: String,
    /// Required when `world_size > 1`.
    pub master_port: Option<u16>,
    /// Started by the ferrofactory launcher ([`LAUNCHED_MARKER_VAR`]), which hosts the store.
    pub launched: bool,
    /// GLOO_SOCKET_IFNAME: the network interface Gloo should use, as in PyTorch.
    pub socket_ifname: Option<String>,
}

impl WorkerEnv {
    /// Reads this process's environment.
    pub fn from_process_env() -> Result<Self, EnvError> {
        Self::from_map(&std::env::vars().collect())
    }

    /// Parses the variables from `env`. With WORLD_SIZE unset the job is one process; the
    /// local and node values default to a single node, so a hand-written environment needs
    /// only RANK, WORLD_SIZE and MASTER_PORT.
    pub fn from_map(env: &HashMap<String, String>) -> Result<Self, EnvError> {
        let world_size = parse_count(env, "WORLD_SIZE")?.unwrap_or(1);
        let rank = match parse_index(env, "RANK")? {
            Some(rank) => rank,
            None if world_size > 1 => {
                return Err(EnvError::Missing {
                    var: "RANK",
                    reason: format!("WORLD_SIZE is {world_size}"),
                })
            }
            None => 0,
        };
        if rank >= world_size {
            return Err(EnvError::Inconsistent(format!(
                "RANK {rank} is not below WORLD_SIZE {world_size}; ranks run from 0 to WORLD_SIZE - 1"
            )));
        }
        let local_world_size = parse_count(env, "LOCAL_WORLD_SIZE")?.unwrap_or(world_size);
        if world_size % local_world_size != 0 {
            return Err(EnvError::Inconsistent(format!(
                "WORLD_SIZE {world_size} is not a multiple of LOCAL_WORLD_SIZE {local_world_size}; every node must run the same number of workers"
            )));
        }
        let local_rank = parse_index(env, "LOCAL_RANK")?.unwrap_or(rank % local_world_size);
        if local_rank >= local_world_size {
            return Err(EnvError::Inconsistent(format!(
                "LOCAL_RANK {local_rank} is not below LOCAL_WORLD_SIZE {local_world_size}"
            )));
        }
        let node_rank = match parse_index(env, "NODE_RANK")? {
            Some(node) => node,
            None => parse_index(env, "GROUP_RANK")?.unwrap_or(rank / local_world_size),
        };
        if node_rank * local_world_size + local_rank != rank {
            return Err(EnvError::Inconsistent(format!(
                "RANK {rank} is not NODE_RANK {node_rank} × LOCAL_WORLD_SIZE {local_world_size} + LOCAL_RANK {local_rank}; number ranks node by node, as torchrun does"
            )));
        }
        let master_addr = match env.get("MASTER_ADDR").map(|s| s.trim()) {
            Some(addr) if !addr.is_empty() => addr.to_string(),
            _ => DEFAULT_MASTER_ADDR.to_string(),
        };
        let master_port = parse_port(env, "MASTER_PORT")?;
        if world_size > 1 && master_port.is_none() {
            return Err(EnvError::Missing {
                var: "MASTER_PORT",
                reason: format!("WORLD_SIZE is {world_size} and the workers must meet at MASTER_ADDR:MASTER_PORT"),
            });
        }
        Ok(Self {
            rank,
            world_size,
            local_rank,
            local_world_size,
            node_rank,
            master_addr,
            master_port,
            launched: env.get(LAUNCHED_MARKER_VAR).is_some_and(|v| v == "1"),
            socket_ifname: env
                .get("GLOO_SOCKET_IFNAME")
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        })
    }

    /// Number of nodes in the job.
    pub fn nnodes(&self) -> usize {
        self.world_size / self.local_world_size
    }

    /// The global ranks on this node (HYBRID_SHARD's sharding group).
    pub fn intra_node_ranks(&self) -> Vec<usize> {
        let first = self.node_rank * self.local_world_size;
        (first..first + self.local_world_size).collect()
    }

    /// The global ranks with this worker's local rank, one per node (HYBRID_SHARD's
    /// replication group).
    pub fn inter_node_ranks(&self) -> Vec<usize> {
        (0..self.nnodes())
            .map(|node| node * self.local_world_size + self.local_rank)
            .collect()
    }
}

/// Joins the job described by this process's environment: a [`SingleProcessGroup`] when
/// WORLD_SIZE is unset or 1, else the Gloo group of all workers, named "world". `timeout`
/// bounds joining and every collective (training's `ddp_timeout`).
pub fn init_from_env(timeout: Duration) -> Result<Box<dyn ProcessGroup>, DistError> {
    init_with_env(&WorkerEnv::from_process_env()?, timeout)
}

/// [`init_from_env`] for an already parsed environment.
///
/// Under the launcher the store already runs (node 0's launcher hosts it). Without one, rank
/// 0 hosts it at MASTER_ADDR:MASTER_PORT for as long as the returned group lives, as
/// PyTorch's `env://` initialization does.
pub fn init_with_env(
    env: &WorkerEnv,
    timeout: Duration,
) -> Result<Box<dyn ProcessGroup>, DistError> {
    if env.world_size == 1 {
        return Ok(Box::new(SingleProcessGroup));
    }
    let port = env.master_port.ok_or_else(|| EnvError::Missing {
        var: "MASTER_PORT",
        reason: format!("WORLD_SIZE is {}", env.world_size),
    })?;
    let hosted = if !env.launched && env.rank == 0 {
        Some(StoreServer::host_master(&env.master_addr, port)?)
    } else {
        None
    };
    let store = Arc::new(StoreClient::connect(&env.master_addr, port, timeout)?);
    let transport = match &env.socket_ifname {
        Some(iface) => GlooTransport::Interface(iface.clone()),
        // The address this machine uses to reach the store is one the other nodes can reach.
        None => GlooTransport::Hostname(store.local_ip().to_string()),
    };
    let group = GlooProcessGroup::connect_with_host(
        store,
        "world",
        env.rank,
        env.world_size,
        GlooOptions { timeout, transport },
        hosted,
    )?;
    Ok(Box::new(group))
}

pub(crate) fn parse_index(
    env: &HashMap<String, String>,
    var: &'static str,
) -> Result<Option<usize>, EnvError> {
    parse(env, var, "a whole number (0 or more)", |v| {
        v.parse::<usize>().ok()
    })
}

pub(crate) fn parse_count(
    env: &HashMap<String, String>,
    var: &'static str,
) -> Result<Option<usize>, EnvError> {
    parse(env, var, "a whole number of at least 1", |v| {
        v.parse::<usize>().ok().filter(|&n| n >= 1)
    })
}

pub(crate) fn parse_port(
    env: &HashMap<String, String>,
    var: &'static str,
) -> Result<Option<u16>, EnvError> {
    parse(env, var, "a TCP port between 1 and 65535", |v| {
        v.parse::<u16>().ok().filter(|&p| p >= 1)
    })
}

/// Unset and empty both mean "not given"; anything else must parse.
fn parse<T>(
    env: &HashMap<String, String>,
    var: &'static str,
    expected: &'static str,
    parse_value: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>, EnvError> {
    match env.get(var).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(value) => parse_value(value)
            .map(Some)
            .ok_or_else(|| EnvError::Malformed {
                var,
                value: value.to_string(),
                expected,
            }),
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

    #[test]
    fn unset_world_size_is_one_process() {
        let w = WorkerEnv::from_map(&env(&[])).unwrap();
        assert_eq!(
            (w.rank, w.world_size, w.local_world_size, w.node_rank),
            (0, 1, 1, 0)
        );
        assert_eq!(w.master_addr, "127.0.0.1");
        assert!(!w.launched);
    }

    #[test]
    fn torchrun_variables_parse_and_give_hybrid_groups() {
        let w = WorkerEnv::from_map(&env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("GROUP_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
            (LAUNCHED_MARKER_VAR, "1"),
        ]))
        .unwrap();
        assert_eq!(w.node_rank, 1);
        assert_eq!(w.master_port, Some(29500));
        assert!(w.launched);
        assert_eq!(w.nnodes(), 2);
        assert_eq!(w.intra_node_ranks(), [4, 5, 6, 7]);
        assert_eq!(w.inter_node_ranks(), [1, 5]);
    }

    #[test]
    fn malformed_and_inconsistent_values_are_named() {
        let err = WorkerEnv::from_map(&env(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "WORLD_SIZE='two' is not a whole number of at least 1; set WORLD_SIZE to a whole number of at least 1 or unset it"
        );
        let err =
            WorkerEnv::from_map(&env(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "1")])).unwrap_err();
        assert!(
            matches!(err, EnvError::Missing { var: "RANK", .. }),
            "{err}"
        );
        let err = WorkerEnv::from_map(&env(&[("WORLD_SIZE", "2"), ("RANK", "1")])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("MASTER_PORT is not set but WORLD_SIZE is 2"),
            "{err}"
        );
        let err = WorkerEnv::from_map(&env(&[
            ("WORLD_SIZE", "2"),
            ("RANK", "2"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("RANK 2 is not below WORLD_SIZE 2"),
            "{err}"
        );
        let err = WorkerEnv::from_map(&env(&[("MASTER_PORT", "70000")])).unwrap_err();
        assert!(
            err.to_string().contains("a TCP port between 1 and 65535"),
            "{err}"
        );
        let err = WorkerEnv::from_map(&env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("MASTER_PORT", "1"),
        ]))
        .unwrap_err();
        assert!(
            err.to_string().contains("number ranks node by node"),
            "{err}"
        );
    }

    #[test]
    fn single_process_needs_no_network() {
        let pg = init_with_env(
            &WorkerEnv::from_map(&env(&[])).unwrap(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!((pg.backend(), pg.rank(), pg.world_size()), ("single", 0, 1));
    }
}
