//! `checkpoint-N` folders, written whole or not at all, from whichever engine holds the state.

use std::collections::HashMap;
use std::path::PathBuf;

use ff_config::StateDictType;
use ff_fsdp::Sharded;
use ff_fsio::{write_json, JsonEnding};
use ff_model::peft::write_adapter_config;
use ff_model::CausalLm;
use ff_walk::Residency;
use serde_json::{json, Map, Value};

use crate::checkpoint::{
    copy_files, rotate_checkpoints, save_optimizer, save_shard, save_weights, shard_file,
    write_run_hash, SavedWeights, TrainerState, OPTIMIZER_FILE, SHARDED_MARKER, TRAINER_STATE,
};
use crate::engine::Engine;
use crate::error::{TrainError, TrainResult};
use crate::optim::{AdamW, AdamWState, MomentSource, Moments};

use super::Run;

/// Writes `checkpoint-N` through a temporary folder renamed at the end, so that a crash never
/// leaves a checkpoint that looks complete. Every rank calls it: a sharded run gathers (full
/// state dict) or has every rank write its shard (sharded state dict); rank 0 writes the rest.
pub(super) fn save_checkpoint(
    model: &mut CausalLm,
    run: &Run<'_>,
    engine: &mut Engine,
    optimizer: &AdamW,
    state: &TrainerState,
    full_names: &[String],
) -> TrainResult<PathBuf> {
    let out = &run.output_dir;
    let main = run.group.rank() == 0;
    let name = format!("checkpoint-{}", state.global_step);
    let dir = out.join(&name);
    let tmp = out.join(format!(".{name}.tmp"));
    if main {
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    let sharded_dict = match (&*engine, &run.fsdp) {
        (Engine::Sharded(_), Some(f)) => {
            f.config.state_dict_type == StateDictType::ShardedStateDict
        }
        _ => false,
    };
    if let (true, Engine::Sharded(s)) = (sharded_dict, &*engine) {
        // Every rank writes its own file into the folder rank 0 made.
        run.group.barrier()?;
        let world = run.group.world_size();
        let values = s
            .vars
            .iter()
            .map(|v| v.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let path = tmp.join(shard_file(run.group.rank(), world));
        save_shard(&path, &s.piece_labels(), &values, &optimizer.state)?;
        run.group.barrier()?;
        if main {
            let tensors: Map<String, Value> = s
                .trained_shapes()
                .into_iter()
                .map(|(name, shape)| (name, json!(shape)))
                .collect();
            write_json(
                &tmp.join(SHARDED_MARKER),
                &json!({
                    "world_size": world,
                    "state_dict_type": "SHARDED_STATE_DICT",
                    "tensors": tensors,
                }),
                JsonEnding::Bracket,
            )?;
            // The adapter's settings, so that the shards can be turned back into an adapter.
            if let SavedWeights::Lora(spec) = &run.weights {
                write_adapter_config(spec, &run.base_model, &tmp)?;
            }
        }
    } else {
        gather_for_saving(model, engine, &run.weights)?;
        let gathered = match &*engine {
            Engine::Sharded(s) => Some(full_optimizer_state(s, optimizer, full_names)?),
            Engine::Replicated(_) => None,
        };
        if main {
            save_weights(model, &run.weights, &run.base_model, &tmp)?;
            let moments: &dyn MomentSource = match &gathered {
                Some(state) => state,
                None => optimizer,
            };
            save_optimizer(moments, full_names, &tmp.join(OPTIMIZER_FILE))?;
        }
        release_after_saving(model, engine)?;
    }
    if main {
        copy_files(&run.tokenizer_files, &tmp)?;
        write_json(&tmp.join(TRAINER_STATE), state, JsonEnding::Bracket)?;
        write_run_hash(&tmp, &state.run_hash)?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
        }
        std::fs::rename(&tmp, &dir).map_err(|e| TrainError::io(&dir, e))?;
        if let Some(limit) = run.args.save_total_limit {
            rotate_checkpoints(out, limit.max(1))?;
        }
    }
    Ok(dir)
}

/// Puts every trained tensor (and the frozen ones too for a full save) back into the model of
/// a sharded run, so that the usual writers see whole tensors. Collective.
pub(super) fn gather_for_saving(
    model: &mut CausalLm,
    engine: &mut Engine,
    weights: &SavedWeights,
) -> TrainResult<()> {
    if let Engine::Sharded(s) = engine {
        s.materialize(model, matches!(weights, SavedWeights::Full))?;
    }
    Ok(())
}

/// Empties what [`gather_for_saving`] put into the model of a sharded run. Collective.
pub(super) fn release_after_saving(model: &mut CausalLm, engine: &mut Engine) -> TrainResult<()> {
    if let Engine::Sharded(s) = engine {
        s.end(model)?;
    }
    Ok(())
}

/// The optimizer state of whole tensors (as a replicated run keeps it) cut into this rank's pieces.
pub(super) fn scatter_optimizer(
    engine: &Sharded,
    names: &[String],
    full: AdamWState,
) -> TrainResult<AdamWState> {
    let mut avg = HashMap::new();
    let mut avg_sq = HashMap::new();
    for (name, m) in names.iter().zip(full.moments) {
        if !m.exp_avg.is_empty() {
            avg.insert(name.clone(), m.exp_avg);
            avg_sq.insert(name.clone(), m.exp_avg_sq);
        }
    }
    let moments = engine
        .scatter_values(&avg)?
        .into_iter()
        .zip(engine.scatter_values(&avg_sq)?)
        .map(|(exp_avg, exp_avg_sq)| Moments {
            exp_avg,
            exp_avg_sq,
        })
        .collect();
    Ok(AdamWState {
        step: full.step,
        moments,
    })
}

/// The optimizer state of whole tensors, in `names` order, gathered from the pieces of a
/// sharded run (collective).
fn full_optimizer_state(
    s: &Sharded,
    optimizer: &AdamW,
    names: &[String],
) -> TrainResult<AdamWState> {
    // Moments never updated are zeros, as AdamW starts them; every rank must send its share.
    let gather = |moment: fn(&Moments) -> &Vec<f32>| -> TrainResult<HashMap<String, Vec<f32>>> {
        let per_piece: Vec<Vec<f32>> = optimizer
            .state
            .moments
            .iter()
            .zip(&s.vars)
            .map(|(m, var)| match moment(m) {
                v if v.is_empty() => vec![0.0; var.elem_count()],
                v => v.clone(),
            })
            .collect();
        Ok(s.gather_values(&per_piece)?.into_iter().collect())
    };
    let mut avg = gather(|m| &m.exp_avg)?;
    let mut avg_sq = gather(|m| &m.exp_avg_sq)?;
    let moments = names
        .iter()
        .map(|name| match (avg.remove(name), avg_sq.remove(name)) {
            (Some(exp_avg), Some(exp_avg_sq)) if optimizer.state.step > 0 => Moments {
                exp_avg,
                exp_avg_sq,
            },
            _ => Moments::default(),
        })
        .collect();
    Ok(AdamWState {
        step: optimizer.state.step,
        moments,
    })
}
