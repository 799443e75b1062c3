//! The worker's side of an FSDP job: the settings `launch` handed over, placeholder loading for
//! cpu_ram_efficient_loading, and each rank's memory report.

use std::collections::HashMap;
use std::io::Write;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use ff_config::{FsdpConfig, ShardingStrategy};
use ff_model::load::{from_tensors_quantized, Zeros};
use ff_model::quant::QuantFormat;
use ff_model::{CausalLm, ModelConfig};
use ff_train::trainer::{FsdpRun, MemoryReport};

use crate::model_source::ModelSource;

/// The FSDP settings of this worker, if it was started by `launch` with FSDP.
pub fn settings(env: &HashMap<String, String>) -> Result<Option<FsdpRun>> {
    let Some(config) = FsdpConfig::from_env()? else {
        return Ok(None);
    };
    let count = |key: &str| -> usize {
        env.get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1)
            .max(1)
    };
    let local_world_size = count("LOCAL_WORLD_SIZE");
    let nodes = count("WORLD_SIZE") / local_world_size;
    if config.sharding_strategy == ShardingStrategy::HybridShard && nodes < 2 {
        bail!("fsdp_sharding_strategy HYBRID_SHARD shards within a node and replicates across nodes, but this job has one node; use FULL_SHARD or run on several machines");
    }
    if config.offload_params && config.sharding_strategy == ShardingStrategy::NoShard {
        bail!("fsdp_offload_params offloads parameter shards, but NO_SHARD has none; set fsdp_offload_params: false or pick a sharding strategy");
    }
    Ok(Some(FsdpRun {
        config,
        local_world_size,
    }))
}

/// Under cpu_ram_efficient_loading, ranks other than 0 build the model from config.json alone
/// and receive every value from rank 0 when the model is sharded.
pub fn loads_placeholder(fsdp: Option<&FsdpRun>, rank: usize) -> bool {
    fsdp.is_some_and(|f| {
        f.config.cpu_ram_efficient_loading
            && f.config.sharding_strategy != ShardingStrategy::NoShard
            && rank != 0
    })
}

/// The model's shapes, all zeros, without reading a weight file.
pub fn load_placeholder(
    source: &ModelSource,
    dtype: DType,
    quant: Option<QuantFormat>,
) -> Result<CausalLm> {
    let config = ModelConfig::from_dir(source.files_dir())?;
    Ok(from_tensors_quantized(
        config,
        &Zeros,
        dtype,
        &Device::Cpu,
        quant,
    )?)
}

/// One line per rank: what it held, so a user (and the tests) can see the sharding work.
pub fn report(rank: usize, memory: &MemoryReport) {
    // One write, so that the ranks' lines do not interleave on a shared terminal or pipe.
    let line = format!(
        "fsdp rank {rank}: {} parameter bytes held of {} in the model, {} optimizer bytes, largest unit {} bytes, at most {} bytes gathered at once, peak RSS {} bytes, {} quantized bytes held of {}\n",
        memory.parameter_bytes,
        memory.model_bytes,
        memory.optimizer_bytes,
        memory.largest_unit_bytes,
        memory.peak_gathered_bytes,
        ff_fsio::peak_rss_bytes(ff_fsio::PeakOf::ThisProcess).unwrap_or(0),
        memory.quantized_bytes,
        memory.model_quantized_bytes,
    );
    let _ = std::io::stderr().write_all(line.as_bytes());
}
