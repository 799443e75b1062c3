//! The `fsdp_config` section of a launch file, read as accelerate's launcher and
//! `FullyShardedDataParallelPlugin` read it: names in any case, torch's enum numbers, and
//! accelerate's defaults for keys a file leaves out.

use serde_yaml::{Mapping, Value};

use super::scalar::{parse_bool_text, read_bool, read_text, read_whole};
use crate::error::closest;
use crate::value::{read, render, CommaList};
use crate::{
    AutoWrapPolicy, BackwardPrefetch, ConfigError, FsdpConfig, ShardingStrategy, StateDictType,
};

const KEYS: &[&str] = &[
    "fsdp_version",
    "fsdp_auto_wrap_policy",
    "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_min_num_params",
    "fsdp_backward_prefetch",
    "fsdp_backward_prefetch_policy",
    "fsdp_forward_prefetch",
    "fsdp_cpu_ram_efficient_loading",
    "fsdp_offload_params",
    "fsdp_sharding_strategy",
    "fsdp_reshard_after_forward",
    "fsdp_state_dict_type",
    "fsdp_sync_module_states",
    "fsdp_use_orig_params",
    "fsdp_activation_checkpointing",
];

/// accelerate's launcher default for fsdp_min_num_params.
const DEFAULT_MIN_NUM_PARAMS: u64 = 100_000_000;

/// Keys that say the same setting as `key` (a flag for one replaces the others).
pub(super) fn same_setting(key: &str) -> &'static [&'static str] {
    match key {
        "fsdp_sharding_strategy" | "fsdp_reshard_after_forward" => {
            &["fsdp_sharding_strategy", "fsdp_reshard_after_forward"]
        }
        "fsdp_backward_prefetch" | "fsdp_backward_prefetch_policy" => {
            &["fsdp_backward_prefetch", "fsdp_backward_prefetch_policy"]
        }
        _ => &[],
    }
}

pub(super) fn sharding_name(strategy: ShardingStrategy) -> &'static str {
    match strategy {
        ShardingStrategy::FullShard => "FULL_SHARD",
        ShardingStrategy::ShardGradOp => "SHARD_GRAD_OP",
        ShardingStrategy::NoShard => "NO_SHARD",
        ShardingStrategy::HybridShard => "HYBRID_SHARD",
    }
}

pub(super) fn auto_wrap_name(policy: AutoWrapPolicy) -> &'static str {
    match policy {
        AutoWrapPolicy::TransformerBased => "TRANSFORMER_BASED_WRAP",
        AutoWrapPolicy::SizeBased => "SIZE_BASED_WRAP",
        AutoWrapPolicy::NoWrap => "NO_WRAP",
    }
}

pub(super) fn backward_prefetch_name(prefetch: BackwardPrefetch) -> &'static str {
    match prefetch {
        BackwardPrefetch::BackwardPre => "BACKWARD_PRE",
        BackwardPrefetch::BackwardPost => "BACKWARD_POST",
        BackwardPrefetch::NoPrefetch => "NO_PREFETCH",
    }
}

pub(super) fn state_dict_name(kind: StateDictType) -> &'static str {
    match kind {
        StateDictType::FullStateDict => "FULL_STATE_DICT",
        StateDictType::ShardedStateDict => "SHARDED_STATE_DICT",
    }
}

/// Whether a strategy frees gathered parameters after forward (FSDP2's reshard_after_forward).
pub(super) fn reshards_after_forward(strategy: ShardingStrategy) -> bool {
    matches!(
        strategy,
        ShardingStrategy::FullShard | ShardingStrategy::HybridShard
    )
}

/// The keys as written, before the version decides how some of them read.
#[derive(Default)]
struct Written<'a> {
    version: Option<u8>,
    sharding_strategy: Option<&'a Value>,
    reshard_after_forward: Option<&'a Value>,
    backward_prefetch: Vec<(&'static str, &'a Value)>,
    auto_wrap_policy: Option<AutoWrapPolicy>,
    transformer_layer_cls_to_wrap: Vec<String>,
    min_num_params: Option<u64>,
    forward_prefetch: Option<bool>,
    offload_params: Option<bool>,
    cpu_ram_efficient_loading: Option<bool>,
    sync_module_states: Option<bool>,
    state_dict_type: Option<&'a Value>,
    use_orig_params: Option<bool>,
    activation_checkpointing: Option<bool>,
}

/// Types every key of the section and fills in accelerate's defaults for the rest.
pub(super) fn parse(section: &Mapping) -> Result<FsdpConfig, ConfigError> {
    let mut w = Written::default();
    for (key, value) in section {
        let Some(written_key) = key.as_str() else {
            return Err(ConfigError::Invalid(format!(
                "fsdp_config keys must be strings, found {}",
                render(key)
            )));
        };
        // accelerate accepts the keys with or without their fsdp_ prefix.
        let key = if written_key.starts_with("fsdp") {
            written_key.to_string()
        } else {
            format!("fsdp_{written_key}")
        };
        if value.is_null() && KEYS.contains(&key.as_str()) {
            continue;
        }
        match key.as_str() {
            "fsdp_version" => w.version = Some(read_version(value)?),
            "fsdp_sharding_strategy" => w.sharding_strategy = Some(value),
            "fsdp_reshard_after_forward" => w.reshard_after_forward = Some(value),
            "fsdp_backward_prefetch" => w.backward_prefetch.push(("fsdp_backward_prefetch", value)),
            "fsdp_backward_prefetch_policy" => w
                .backward_prefetch
                .push(("fsdp_backward_prefetch_policy", value)),
            "fsdp_auto_wrap_policy" => w.auto_wrap_policy = Some(read_auto_wrap(value)?),
            "fsdp_transformer_layer_cls_to_wrap" => {
                w.transformer_layer_cls_to_wrap = read::<CommaList>(&key, value)?.0
            }
            "fsdp_min_num_params" => w.min_num_params = Some(read_whole(&key, value)?),
            "fsdp_forward_prefetch" => w.forward_prefetch = Some(read_bool(&key, value)?),
            "fsdp_offload_params" => w.offload_params = Some(read_bool(&key, value)?),
            "fsdp_cpu_ram_efficient_loading" => {
                w.cpu_ram_efficient_loading = Some(read_bool(&key, value)?)
            }
            "fsdp_sync_module_states" => w.sync_module_states = Some(read_bool(&key, value)?),
            "fsdp_state_dict_type" => w.state_dict_type = Some(value),
            "fsdp_use_orig_params" => w.use_orig_params = Some(read_bool(&key, value)?),
            "fsdp_activation_checkpointing" => {
                w.activation_checkpointing = Some(read_bool(&key, value)?)
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: format!("fsdp_config.{written_key}"),
                    suggestion: closest(&key, KEYS.iter().copied()),
                })
            }
        }
    }
    resolve(w)
}

fn resolve(w: Written) -> Result<FsdpConfig, ConfigError> {
    let version = w.version.unwrap_or(1);
    let auto_wrap_policy = w.auto_wrap_policy.unwrap_or(AutoWrapPolicy::NoWrap);
    let min_num_params = w.min_num_params.unwrap_or(DEFAULT_MIN_NUM_PARAMS);
    Ok(FsdpConfig {
        version,
        sharding_strategy: resolve_sharding(version, w.sharding_strategy, w.reshard_after_forward)?,
        // accelerate drops a size-based policy whose threshold is 0: nothing is wrapped.
        auto_wrap_policy: if auto_wrap_policy == AutoWrapPolicy::SizeBased && min_num_params == 0 {
            AutoWrapPolicy::NoWrap
        } else {
            auto_wrap_policy
        },
        transformer_layer_cls_to_wrap: w.transformer_layer_cls_to_wrap,
        min_num_params,
        backward_prefetch: resolve_backward_prefetch(version, &w.backward_prefetch)?,
        forward_prefetch: w.forward_prefetch.unwrap_or(false),
        offload_params: w.offload_params.unwrap_or(false),
        cpu_ram_efficient_loading: w.cpu_ram_efficient_loading.unwrap_or(true),
        sync_module_states: w.sync_module_states.unwrap_or(true),
        state_dict_type: match w.state_dict_type {
            Some(value) => read_state_dict_type(value)?,
            // FSDP2 saves sharded by default in accelerate, FSDP1 full.
            None if version == 2 => StateDictType::ShardedStateDict,
            None => StateDictType::FullStateDict,
        },
        // FSDP2 always trains the original parameters.
        use_orig_params: version == 2 || w.use_orig_params.unwrap_or(true),
        activation_checkpointing: w.activation_checkpointing.unwrap_or(false),
    })
}

fn read_version(value: &Value) -> Result<u8, ConfigError> {
    match read::<u64>("fsdp_version", value) {
        Ok(1) => Ok(1),
        Ok(2) => Ok(2),
        _ => Err(ConfigError::BadValue {
            key: "fsdp_version".into(),
            expected: "1 or 2",
            got: render(value),
        }),
    }
}

/// fsdp_sharding_strategy decides when given; fsdp_reshard_after_forward (a strategy name with
/// FSDP1, as `accelerate config` writes it, or true/false) otherwise. Both given must agree.
fn resolve_sharding(
    version: u8,
    sharding_strategy: Option<&Value>,
    reshard_after_forward: Option<&Value>,
) -> Result<ShardingStrategy, ConfigError> {
    let named = sharding_strategy
        .map(|v| read_strategy("fsdp_sharding_strategy", v))
        .transpose()?;
    let reshard = reshard_after_forward
        .map(|v| read_reshard(version, v))
        .transpose()?;
    match (named, reshard) {
        (Some(strategy), None) => Ok(strategy),
        (None, Some(Reshard::Strategy(strategy))) => Ok(strategy),
        (None, Some(Reshard::Flag(true))) | (None, None) => Ok(ShardingStrategy::FullShard),
        (None, Some(Reshard::Flag(false))) => Ok(ShardingStrategy::ShardGradOp),
        (Some(strategy), Some(reshard)) => {
            let agree = match reshard {
                Reshard::Strategy(other) => other == strategy,
                Reshard::Flag(flag) => flag == reshards_after_forward(strategy),
            };
            if agree {
                Ok(strategy)
            } else {
                Err(ConfigError::Invalid(format!(
                    "fsdp_sharding_strategy {} and fsdp_reshard_after_forward {} disagree; keep one of them",
                    sharding_name(strategy),
                    render(reshard_after_forward.unwrap_or(&Value::Null))
                )))
            }
        }
    }
}

enum Reshard {
    Flag(bool),
    Strategy(ShardingStrategy),
}

fn read_reshard(version: u8, value: &Value) -> Result<Reshard, ConfigError> {
    const KEY: &str = "fsdp_reshard_after_forward";
    match value {
        Value::Bool(flag) => return Ok(Reshard::Flag(*flag)),
        Value::String(text) => {
            if let Some(flag) = parse_bool_text(text) {
                return Ok(Reshard::Flag(flag));
            }
        }
        _ => {}
    }
    if version == 2 {
        // FSDP2 reads this key as a boolean only (accelerate's str_to_bool).
        return read_bool(KEY, value)
            .map(Reshard::Flag)
            .map_err(|_| ConfigError::BadValue {
                key: KEY.into(),
                expected: "true or false with fsdp_version 2",
                got: render(value),
            });
    }
    read_strategy(KEY, value).map(Reshard::Strategy)
}

/// A sharding strategy by name or by torch's number (FULL_SHARD = 1 ... HYBRID_SHARD = 4).
fn read_strategy(key: &str, value: &Value) -> Result<ShardingStrategy, ConfigError> {
    let text = read_text(key, value)?.to_ascii_uppercase();
    match text.as_str() {
        "FULL_SHARD" | "1" => Ok(ShardingStrategy::FullShard),
        "SHARD_GRAD_OP" | "2" => Ok(ShardingStrategy::ShardGradOp),
        "NO_SHARD" | "3" => Ok(ShardingStrategy::NoShard),
        "HYBRID_SHARD" | "4" => Ok(ShardingStrategy::HybridShard),
        "HYBRID_SHARD_ZERO2" | "_HYBRID_SHARD_ZERO2" | "5" => Err(ConfigError::Invalid(format!(
            "{key} HYBRID_SHARD_ZERO2 is not supported by ferrofactory; use HYBRID_SHARD (or SHARD_GRAD_OP on one machine)"
        ))),
        _ => Err(ConfigError::BadValue {
            key: key.into(),
            expected: "FULL_SHARD, SHARD_GRAD_OP, NO_SHARD or HYBRID_SHARD (or torch's numbers 1 to 4)",
            got: render(value),
        }),
    }
}

/// fsdp_backward_prefetch, or fsdp_backward_prefetch_policy as older accelerate versions wrote
/// it. Left out, accelerate prefetches nothing with FSDP1; FSDP2 always prefetches the next unit
/// before the current unit's backward.
fn resolve_backward_prefetch(
    version: u8,
    written: &[(&'static str, &Value)],
) -> Result<BackwardPrefetch, ConfigError> {
    let mut chosen: Option<(&str, BackwardPrefetch)> = None;
    for (key, value) in written {
        let prefetch = read_backward_prefetch(key, value)?;
        if let Some((other_key, other)) = chosen {
            if other != prefetch {
                return Err(ConfigError::Invalid(format!(
                    "{other_key} {} and {key} {} disagree; keep one of them",
                    backward_prefetch_name(other),
                    backward_prefetch_name(prefetch)
                )));
            }
        }
        chosen = Some((key, prefetch));
    }
    Ok(match chosen {
        Some((_, prefetch)) => prefetch,
        None if version == 2 => BackwardPrefetch::BackwardPre,
        None => BackwardPrefetch::NoPrefetch,
    })
}

fn read_backward_prefetch(key: &str, value: &Value) -> Result<BackwardPrefetch, ConfigError> {
    match read_text(key, value)?.to_ascii_uppercase().as_str() {
        "BACKWARD_PRE" | "1" => Ok(BackwardPrefetch::BackwardPre),
        "BACKWARD_POST" | "2" => Ok(BackwardPrefetch::BackwardPost),
        "NO_PREFETCH" => Ok(BackwardPrefetch::NoPrefetch),
        _ => Err(ConfigError::BadValue {
            key: key.into(),
            expected: "BACKWARD_PRE, BACKWARD_POST or NO_PREFETCH",
            got: render(value),
        }),
    }
}

fn read_auto_wrap(value: &Value) -> Result<AutoWrapPolicy, ConfigError> {
    const KEY: &str = "fsdp_auto_wrap_policy";
    match read_text(KEY, value)?.to_ascii_uppercase().as_str() {
        "TRANSFORMER_BASED_WRAP" => Ok(AutoWrapPolicy::TransformerBased),
        "SIZE_BASED_WRAP" => Ok(AutoWrapPolicy::SizeBased),
        "NO_WRAP" => Ok(AutoWrapPolicy::NoWrap),
        _ => Err(ConfigError::BadValue {
            key: KEY.into(),
            expected: "TRANSFORMER_BASED_WRAP, SIZE_BASED_WRAP or NO_WRAP",
            got: render(value),
        }),
    }
}

/// A state dict type by name or torch's number (FULL = 1, LOCAL = 2, SHARDED = 3).
fn read_state_dict_type(value: &Value) -> Result<StateDictType, ConfigError> {
    const KEY: &str = "fsdp_state_dict_type";
    match read_text(KEY, value)?.to_ascii_uppercase().as_str() {
        "FULL_STATE_DICT" | "1" => Ok(StateDictType::FullStateDict),
        "SHARDED_STATE_DICT" | "3" => Ok(StateDictType::ShardedStateDict),
        "LOCAL_STATE_DICT" | "2" => Err(ConfigError::Invalid(
            "fsdp_state_dict_type LOCAL_STATE_DICT is not supported: its flat shards can only be read back by the same world size and wrapping, and nothing outside the run can load them; use SHARDED_STATE_DICT (resumable, every rank writes its shard) or FULL_STATE_DICT".into(),
        )),
        _ => Err(ConfigError::BadValue {
            key: KEY.into(),
            expected: "FULL_STATE_DICT or SHARDED_STATE_DICT",
            got: render(value),
        }),
    }
}
