//! FSDP settings: what an accelerate config file's `fsdp_config` section says, typed.
//!
//! `launch` reads them from the launch file and flags and hands them to every worker in the
//! environment variable [`FSDP_ENV_VAR`] as JSON; `train` reads them back with [`FsdpConfig::from_env`].
//! A worker without that variable trains data-parallel (or in one process) as before.

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// The environment variable that carries a worker's FSDP settings (JSON of [`FsdpConfig`]).
pub const FSDP_ENV_VAR: &str = "FERROFACTORY_FSDP_CONFIG";

/// How parameters, gradients and optimizer state are split across ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShardingStrategy {
    /// Parameters, gradients and optimizer state sharded; parameters gathered for each use.
    FullShard,
    /// Gradients and optimizer state sharded; parameters kept from forward to backward.
    ShardGradOp,
    /// Nothing sharded: data parallelism (DDP).
    NoShard,
    /// FULL_SHARD inside each node, replicated across nodes.
    HybridShard,
}

/// How the model is cut into units (each unit gathered and freed as one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AutoWrapPolicy {
    /// One unit per decoder layer (the class named by `transformer_layer_cls_to_wrap`).
    TransformerBased,
    /// Consecutive decoder layers grouped until a unit holds `min_num_params` parameters.
    SizeBased,
    /// The whole model is one unit.
    NoWrap,
}

/// When backward gathers the next unit's parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BackwardPrefetch {
    /// Before the current unit's gradient computation.
    BackwardPre,
    /// After the current unit's gradient computation.
    BackwardPost,
    NoPrefetch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateDictType {
    /// Rank 0 gathers and writes the usual single-file outputs.
    FullStateDict,
    /// Every rank writes its own shard and the layout metadata.
    ShardedStateDict,
}

/// Every `fsdp_*` key of an accelerate config file, typed, with accelerate's defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FsdpConfig {
    /// 1 or 2; FSDP2's `reshard_after_forward` is folded into `sharding_strategy`.
    pub version: u8,
    pub sharding_strategy: ShardingStrategy,
    pub auto_wrap_policy: AutoWrapPolicy,
    /// Class names to wrap under TRANSFORMER_BASED_WRAP; empty means the model's decoder layer.
    pub transformer_layer_cls_to_wrap: Vec<String>,
    pub min_num_params: u64,
    pub backward_prefetch: BackwardPrefetch,
    pub forward_prefetch: bool,
    pub offload_params: bool,
    pub cpu_ram_efficient_loading: bool,
    pub sync_module_states: bool,
    pub state_dict_type: StateDictType,
    pub use_orig_params: bool,
    pub activation_checkpointing: bool,
}

impl Default for FsdpConfig {
    fn default() -> Self {
        Self {
            version: 1,
            sharding_strategy: ShardingStrategy::FullShard,
            auto_wrap_policy: AutoWrapPolicy::TransformerBased,
            transformer_layer_cls_to_wrap: Vec::new(),
            min_num_params: 100_000_000,
            backward_prefetch: BackwardPrefetch::BackwardPre,
            forward_prefetch: false,
            offload_params: false,
            cpu_ram_efficient_loading: true,
            sync_module_states: true,
            state_dict_type: StateDictType::FullStateDict,
            use_orig_params: true,
            activation_checkpointing: false,
        }
    }
}

impl FsdpConfig {
    /// The settings `launch` handed to this worker, if any.
    pub fn from_env() -> Result<Option<Self>, ConfigError> {
        match std::env::var(FSDP_ENV_VAR) {
            Ok(json) => serde_json::from_str(&json).map(Some).map_err(|e| {
                ConfigError::Invalid(format!(
                    "{FSDP_ENV_VAR} does not hold FSDP settings ({e}); start FSDP jobs with `ferrofactory launch`"
                ))
            }),
            Err(_) => Ok(None),
        }
    }

    pub fn to_env_value(&self) -> String {
        serde_json::to_string(self).expect("FSDP settings serialize")
    }
}
