//! A launch file's text as `accelerate config` writes it: keys sorted (PyYAML's safe_dump),
//! unset values left out, and the keys accelerate always writes that do nothing here.

use super::fsdp_keys::{
    auto_wrap_name, backward_prefetch_name, reshards_after_forward, sharding_name, state_dict_name,
};
use super::LaunchConfig;
use crate::{FsdpConfig, ShardingStrategy};

pub(super) fn write(config: &LaunchConfig) -> String {
    let mut lines: Vec<(&str, String)> = vec![
        ("compute_environment", "LOCAL_MACHINE".into()),
        ("debug", "false".into()),
        ("distributed_type", config.distributed_type.name().into()),
        ("downcast_bf16", text("no")),
        ("enable_cpu_affinity", "false".into()),
        ("machine_rank", config.machine_rank.to_string()),
        ("main_training_function", "main".into()),
        ("mixed_precision", text(config.mixed_precision.name())),
        ("num_machines", config.num_machines.to_string()),
        ("num_processes", config.num_processes.to_string()),
        ("rdzv_backend", text(&config.rdzv_backend)),
        ("same_network", config.same_network.to_string()),
        ("tpu_env", "[]".into()),
        ("tpu_use_cluster", "false".into()),
        ("tpu_use_sudo", "false".into()),
        ("use_cpu", config.use_cpu.to_string()),
    ];
    if let Some(ip) = &config.main_process_ip {
        lines.push(("main_process_ip", text(ip)));
    }
    if let Some(port) = config.main_process_port {
        lines.push(("main_process_port", port.to_string()));
    }
    if let Some(fsdp) = &config.fsdp {
        lines.push(("fsdp_config", fsdp_section(fsdp)));
    }
    lines.sort_by(|a, b| a.0.cmp(b.0));
    lines
        .into_iter()
        .map(|(key, value)| {
            if value.starts_with('\n') {
                format!("{key}:{value}")
            } else {
                format!("{key}: {value}\n")
            }
        })
        .collect()
}

/// The nested section, each line indented, starting with a newline after its key.
fn fsdp_section(fsdp: &FsdpConfig) -> String {
    let flag = |b: bool| b.to_string();
    let mut lines: Vec<(&str, String)> = vec![
        (
            "fsdp_activation_checkpointing",
            flag(fsdp.activation_checkpointing),
        ),
        (
            "fsdp_auto_wrap_policy",
            auto_wrap_name(fsdp.auto_wrap_policy).into(),
        ),
        (
            "fsdp_backward_prefetch",
            backward_prefetch_name(fsdp.backward_prefetch).into(),
        ),
        (
            "fsdp_cpu_ram_efficient_loading",
            flag(fsdp.cpu_ram_efficient_loading),
        ),
        ("fsdp_forward_prefetch", flag(fsdp.forward_prefetch)),
        ("fsdp_min_num_params", fsdp.min_num_params.to_string()),
        ("fsdp_offload_params", flag(fsdp.offload_params)),
        (
            "fsdp_state_dict_type",
            state_dict_name(fsdp.state_dict_type).into(),
        ),
        ("fsdp_sync_module_states", flag(fsdp.sync_module_states)),
        ("fsdp_use_orig_params", flag(fsdp.use_orig_params)),
        ("fsdp_version", fsdp.version.to_string()),
    ];
    // FSDP2 says FULL_SHARD / SHARD_GRAD_OP as reshard_after_forward, the way accelerate asks;
    // the other strategies, and every FSDP1 strategy, by name (accelerate's launcher reads
    // fsdp_sharding_strategy for FSDP1).
    let as_reshard_flag = fsdp.version == 2
        && matches!(
            fsdp.sharding_strategy,
            ShardingStrategy::FullShard | ShardingStrategy::ShardGradOp
        );
    if as_reshard_flag {
        lines.push((
            "fsdp_reshard_after_forward",
            flag(reshards_after_forward(fsdp.sharding_strategy)),
        ));
    } else {
        lines.push((
            "fsdp_sharding_strategy",
            sharding_name(fsdp.sharding_strategy).into(),
        ));
    }
    if !fsdp.transformer_layer_cls_to_wrap.is_empty() {
        lines.push((
            "fsdp_transformer_layer_cls_to_wrap",
            text(&fsdp.transformer_layer_cls_to_wrap.join(",")),
        ));
    }
    lines.sort_by(|a, b| a.0.cmp(b.0));
    lines
        .into_iter()
        .map(|(key, value)| format!("\n  {key}: {value}"))
        .collect::<String>()
        + "\n"
}

/// A string scalar, single-quoted where a YAML 1.1 reader (PyYAML, which accelerate uses) would
/// read it as something else: `no` is false to PyYAML, `10` a number.
fn text(s: &str) -> String {
    const YAML11_WORDS: &[&str] = &[
        "y", "yes", "n", "no", "true", "false", "on", "off", "null", "~",
    ];
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,/-".contains(c))
        && !s.starts_with(['-', '.'])
        && !YAML11_WORDS.contains(&s.to_ascii_lowercase().as_str())
        && s.parse::<f64>().is_err();
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "''"))
    }
}

#[cfg(test)]
mod tests {
    use super::text;

    #[test]
    fn words_pyyaml_would_misread_are_quoted() {
        assert_eq!(text("no"), "'no'");
        assert_eq!(text("On"), "'On'");
        assert_eq!(text("29500"), "'29500'");
        assert_eq!(text("it's"), "'it''s'");
        assert_eq!(text("bf16"), "bf16");
        assert_eq!(text("10.0.0.1"), "10.0.0.1");
        assert_eq!(
            text("LlamaDecoderLayer,Qwen2DecoderLayer"),
            "LlamaDecoderLayer,Qwen2DecoderLayer"
        );
    }
}
