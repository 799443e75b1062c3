//! `accelerate config`'s questions, in its order and wording where they apply to this build,
//! each answer checked as it is given.

use anyhow::Result;
use ff_config::{
    AutoWrapPolicy, BackwardPrefetch, DistributedType, FsdpConfig, LaunchConfig, MixedPrecision,
    ShardingStrategy, StateDictType,
};

use super::prompt::{yes_or_no, Asker};

const ANY: &dyn Fn(usize) -> Result<(), String> = &|_| Ok(());

/// Asks every question that applies and returns the settings, already validated.
pub fn ask(asker: &mut Asker) -> Result<LaunchConfig> {
    asker.choose(
        "In which compute environment are you running?",
        &["This machine", "AWS (Amazon SageMaker)"],
        0,
        &|choice| match choice {
            0 => Ok(()),
            _ => {
                Err("Amazon SageMaker is not supported by ferrofactory; choose This machine".into())
            }
        },
    )?;
    let machine = asker.choose(
        "Which type of machine are you using?",
        &["No distributed training", "multi-CPU", "multi-GPU"],
        0,
        ANY,
    )?;
    let distributed_type = [
        DistributedType::No,
        DistributedType::MultiCpu,
        DistributedType::MultiGpu,
    ][machine];
    let mut config = LaunchConfig::single_process(MixedPrecision::No);
    config.distributed_type = distributed_type;
    config.use_cpu = distributed_type != DistributedType::MultiGpu;
    config.same_network = true;
    if distributed_type != DistributedType::No {
        ask_machines(asker, &mut config)?;
        if asker.yes_no(
            "Do you want to use FullyShardedDataParallel? [yes/NO]: ",
            false,
        )? {
            config.distributed_type = DistributedType::Fsdp;
            config.fsdp = Some(ask_fsdp(asker, config.num_machines)?);
        }
    }
    if distributed_type != DistributedType::No {
        let what = if distributed_type == DistributedType::MultiGpu {
            "GPU(s)"
        } else {
            "processes"
        };
        let machines = config.num_machines;
        config.num_processes = asker.field(
            &format!("How many {what} should be used for distributed training? [{machines}]:"),
            Some(&machines.to_string()),
            &|answer| {
                let n = count(answer)?;
                if n % machines != 0 {
                    return Err(format!(
                        "The number counts the {what} of all {machines} machines together; enter a multiple of {machines}."
                    ));
                }
                Ok(n)
            },
        )?;
    }
    let precisions = [
        MixedPrecision::No,
        MixedPrecision::Fp16,
        MixedPrecision::Bf16,
    ];
    let names = precisions.map(MixedPrecision::name);
    config.mixed_precision =
        precisions[asker.choose("Do you wish to use mixed precision?", &names, 0, ANY)?];
    config.validate()?;
    Ok(config)
}

fn ask_machines(asker: &mut Asker, config: &mut LaunchConfig) -> Result<()> {
    config.num_machines = asker.field(
        "How many different machines will you use (use more than 1 for multi-node training)? [1]: ",
        Some("1"),
        &count,
    )?;
    if config.num_machines == 1 {
        return Ok(());
    }
    let ranks: Vec<String> = (0..config.num_machines).map(|r| r.to_string()).collect();
    let ranks: Vec<&str> = ranks.iter().map(String::as_str).collect();
    config.machine_rank = asker.choose("What is the rank of this machine?", &ranks, 0, ANY)?;
    config.main_process_ip = Some(asker.field(
        "What is the IP address of the machine that will host the main process? ",
        None,
        &|answer| match answer {
            "" => Err("Please enter the address of machine 0.".into()),
            address => Ok(address.to_string()),
        },
    )?);
    config.main_process_port = Some(asker.field(
        "What is the port you will use to communicate with the main process? ",
        None,
        &|answer| match answer.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err("Please enter a port between 1 and 65535.".into()),
        },
    )?);
    config.same_network = asker.yes_no(
        "Are all the machines on the same local network? Answer `no` if nodes are on the cloud and/or on different network hosts [YES/no]: ",
        true,
    )?;
    if !config.same_network {
        config.rdzv_backend = asker.field(
            "What rendezvous backend will you use? ('static', 'c10d', ...): ",
            Some("static"),
            &|answer| match answer {
                "static" | "c10d" => Ok(answer.to_string()),
                _ => Err(
                    "Please enter static or c10d; machine 0 hosts the rendezvous either way."
                        .into(),
                ),
            },
        )?;
    }
    Ok(())
}

fn ask_fsdp(asker: &mut Asker, num_machines: usize) -> Result<FsdpConfig> {
    let version = 1 + asker.choose(
        "What should be your FSDP version? [2]: ",
        &["1", "2"],
        1,
        ANY,
    )? as u8;
    let sharding_strategy = if version == 1 {
        let strategies = [
            ShardingStrategy::FullShard,
            ShardingStrategy::ShardGradOp,
            ShardingStrategy::NoShard,
            ShardingStrategy::HybridShard,
        ];
        let chosen = asker.choose(
            "What should be your sharding strategy?",
            &["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"],
            0,
            &|choice| match strategies[choice] {
                ShardingStrategy::HybridShard if num_machines < 2 => Err(
                    "HYBRID_SHARD replicates across machines and needs at least 2; choose FULL_SHARD on one machine.".into(),
                ),
                _ => Ok(()),
            },
        )?;
        strategies[chosen]
    } else if asker.yes_no(
        "Do you want to enable resharding after forward? [YES/no]: ",
        true,
    )? {
        ShardingStrategy::FullShard
    } else {
        ShardingStrategy::ShardGradOp
    };
    let offload_params = asker.field(
        "Do you want to offload parameters and gradients to CPU? [yes/NO]: ",
        Some("no"),
        &|answer| {
            let offload = yes_or_no(answer)?;
            if offload && sharding_strategy == ShardingStrategy::NoShard {
                return Err("NO_SHARD keeps no shards to offload; answer no, or choose another sharding strategy.".into());
            }
            Ok(offload)
        },
    )?;
    let policies = [
        AutoWrapPolicy::TransformerBased,
        AutoWrapPolicy::SizeBased,
        AutoWrapPolicy::NoWrap,
    ];
    let auto_wrap_policy = policies[asker.choose(
        "What should be your auto wrap policy?",
        &["TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP"],
        0,
        ANY,
    )?];
    let mut fsdp = FsdpConfig {
        version,
        sharding_strategy,
        auto_wrap_policy,
        transformer_layer_cls_to_wrap: Vec::new(),
        min_num_params: 100_000_000,
        // FSDP2 prefetches the next unit in backward and always trains the original parameters.
        backward_prefetch: BackwardPrefetch::BackwardPre,
        forward_prefetch: false,
        offload_params,
        cpu_ram_efficient_loading: true,
        sync_module_states: true,
        state_dict_type: StateDictType::FullStateDict,
        use_orig_params: true,
        activation_checkpointing: false,
    };
    match auto_wrap_policy {
        AutoWrapPolicy::TransformerBased => {
            let use_model_layers = asker.yes_no(
                "Do you want to use the model's `_no_split_modules` (its decoder layer class) to wrap? [yes/NO]: ",
                false,
            )?;
            if !use_model_layers {
                fsdp.transformer_layer_cls_to_wrap = asker.field(
                    "Specify the comma-separated list of transformer layer class names (case-sensitive) to wrap ,e.g, :`LlamaDecoderLayer`, `Qwen2DecoderLayer` ...? : ",
                    None,
                    &class_names,
                )?;
            }
        }
        AutoWrapPolicy::SizeBased => {
            fsdp.min_num_params = asker.field(
                "What should be your FSDP's minimum number of parameters for Default Auto Wrapping Policy? [1e8]: ",
                Some("100000000"),
                &whole_number,
            )?;
        }
        AutoWrapPolicy::NoWrap => {}
    }
    if version == 1 {
        let prefetches = [
            BackwardPrefetch::BackwardPre,
            BackwardPrefetch::BackwardPost,
            BackwardPrefetch::NoPrefetch,
        ];
        fsdp.backward_prefetch = prefetches[asker.choose(
            "What should be your FSDP's backward prefetch policy?",
            &["BACKWARD_PRE", "BACKWARD_POST", "NO_PREFETCH"],
            0,
            ANY,
        )?];
    }
    // accelerate lists the default first: FULL for FSDP1, SHARDED for FSDP2.
    let state_dicts = if version == 1 {
        [
            StateDictType::FullStateDict,
            StateDictType::ShardedStateDict,
        ]
    } else {
        [
            StateDictType::ShardedStateDict,
            StateDictType::FullStateDict,
        ]
    };
    let names = state_dicts.map(|kind| match kind {
        StateDictType::FullStateDict => "FULL_STATE_DICT",
        StateDictType::ShardedStateDict => "SHARDED_STATE_DICT",
    });
    fsdp.state_dict_type = state_dicts[asker.choose(
        "What should be your FSDP's state dict type?",
        &names,
        0,
        ANY,
    )?];
    if version == 1 {
        fsdp.forward_prefetch = asker.yes_no(
            "Do you want to enable FSDP's forward prefetch policy? [yes/NO]: ",
            false,
        )?;
        fsdp.use_orig_params = asker.yes_no(
            "Do you want to enable FSDP's `use_orig_params` feature? [YES/no]: ",
            true,
        )?;
    }
    fsdp.cpu_ram_efficient_loading = asker.yes_no(
        "Do you want to enable CPU RAM efficient model loading? [YES/no]: ",
        true,
    )?;
    // Efficient loading needs rank 0's broadcast, so the question only comes without it.
    if version == 1 && !fsdp.cpu_ram_efficient_loading {
        fsdp.sync_module_states = asker.yes_no(
            "Do you want each individually wrapped FSDP unit to broadcast module parameters from rank 0 at the start? [YES/no]: ",
            true,
        )?;
    }
    fsdp.activation_checkpointing = asker.yes_no(
        "Do you want to enable FSDP activation checkpointing? [yes/NO]: ",
        false,
    )?;
    Ok(fsdp)
}

fn count(answer: &str) -> Result<usize, String> {
    match answer.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err("Please enter a whole number of at least 1.".into()),
    }
}

/// A parameter count, also written as accelerate shows it (`1e8`).
fn whole_number(answer: &str) -> Result<u64, String> {
    if let Ok(n) = answer.parse::<u64>() {
        return Ok(n);
    }
    match answer.parse::<f64>() {
        Ok(x) if x >= 0.0 && x.fract() == 0.0 && x <= u64::MAX as f64 => Ok(x as u64),
        _ => Err("Please enter a whole number of parameters, e.g. 100000000 or 1e8.".into()),
    }
}

fn class_names(answer: &str) -> Result<Vec<String>, String> {
    let names: Vec<String> = answer
        .split(',')
        .map(|name| name.trim().trim_matches('`').to_string())
        .filter(|name| !name.is_empty())
        .collect();
    let valid = |name: &String| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    if names.is_empty() || !names.iter().all(valid) {
        return Err(
            "Please enter class names such as LlamaDecoderLayer, separated by commas.".into(),
        );
    }
    Ok(names)
}
