//! What a finished run leaves in `output_dir`, and what it reports.

use ff_config::IntervalStrategy;
use ff_fsio::{write_json, JsonEnding};
use ff_model::CausalLm;
use serde_json::{json, Value};

use crate::checkpoint::{copy_files, save_weights, TrainerState, TRAINER_STATE};
use crate::engine::Engine;
use crate::error::TrainResult;
use crate::optim::{AdamW, AdamWState};

use super::evaluation::evaluate_where_needed;
use super::log::{append_log_line, progress_line, round};
use super::saving::{gather_for_saving, release_after_saving, save_checkpoint};
use super::{MemoryReport, Run};

/// The figures of a finished run that its result files report.
pub(super) struct FinalFigures {
    pub total_steps: u64,
    pub steps_run: f64,
    pub runtime: f64,
    pub train_loss: f64,
    pub samples: f64,
    pub eval_enabled: bool,
}

/// What a completed run leaves: weights (always whole, whatever the state dict type), last
/// checkpoint, trainer state, results files, the closing log record and plots. Every rank
/// calls it; rank 0 writes. Returns the final evaluation loss, if any.
pub(super) fn write_final_outputs(
    model: &mut CausalLm,
    run: &Run<'_>,
    engine: &mut Engine,
    optimizer: &AdamW,
    state: &mut TrainerState,
    full_names: &[String],
    figures: FinalFigures,
) -> TrainResult<Option<f64>> {
    let (args, out) = (run.args, &run.output_dir);
    let main = run.group.rank() == 0;
    let FinalFigures {
        total_steps,
        steps_run,
        runtime,
        train_loss,
        samples,
        eval_enabled,
    } = figures;
    gather_for_saving(model, engine, &run.weights)?;
    if main {
        save_weights(model, &run.weights, &run.base_model, out)?;
        copy_files(&run.tokenizer_files, out)?;
    }
    release_after_saving(model, engine)?;
    // Hugging Face saves a last checkpoint at the end whatever the interval.
    if args.save_strategy != IntervalStrategy::No {
        save_checkpoint(model, run, engine, optimizer, state, full_names)?;
    }
    let final_eval = if eval_enabled {
        evaluate_where_needed(model, engine, run)?
    } else {
        None
    };
    if !main {
        return Ok(None);
    }
    let mut eval_loss = None;
    let train_metrics = json!({
        "epoch": state.epoch,
        "train_loss": train_loss,
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(samples / runtime, 3),
        "train_steps_per_second": round(steps_run / runtime, 3),
        "total_flos": state.total_flos,
    });
    let mut final_record = train_metrics.as_object().cloned().unwrap_or_default();
    final_record.insert("step".into(), json!(state.global_step));
    state.log_history.push(Value::Object(final_record));
    // LLaMA-Factory's log ends with a progress record for the end of training.
    let line = progress_line(
        state.global_step,
        total_steps,
        &[],
        state.epoch,
        runtime,
        0.0,
    );
    append_log_line(out, &line)?;
    write_json(&out.join(TRAINER_STATE), state, JsonEnding::Bracket)?;
    write_json(
        &out.join("train_results.json"),
        &train_metrics,
        JsonEnding::Bracket,
    )?;
    let mut all = train_metrics.as_object().cloned().unwrap_or_default();
    if let Some(evaluation) = final_eval {
        let mut eval_metrics = evaluation.metrics(run);
        eval_metrics.insert("epoch".into(), json!(state.epoch));
        write_json(
            &out.join("eval_results.json"),
            &eval_metrics,
            JsonEnding::Bracket,
        )?;
        all.extend(eval_metrics);
        eval_loss = Some(evaluation.loss);
    }
    write_json(
        &out.join("all_results.json"),
        &Value::Object(all),
        JsonEnding::Bracket,
    )?;
    if args.plot_loss {
        crate::plot::plot_losses(out, &state.log_history)?;
    }
    Ok(eval_loss)
}

/// What a sharded rank held, as its engine counted it; `None` for a replicated run.
pub(super) fn memory_report(engine: &Engine, optimizer: &AdamW) -> Option<MemoryReport> {
    let Engine::Sharded(s) = engine else {
        return None;
    };
    let a = s.accounting();
    Some(MemoryReport {
        parameter_bytes: a.shard_bytes,
        model_bytes: a.full_bytes,
        optimizer_bytes: optimizer_bytes(&optimizer.state),
        largest_unit_bytes: a.largest_unit_bytes,
        peak_gathered_bytes: a.peak_gathered_bytes,
        quantized_bytes: a.quantized_shard_bytes,
        model_quantized_bytes: a.quantized_full_bytes,
    })
}

fn optimizer_bytes(state: &AdamWState) -> usize {
    state
        .moments
        .iter()
        .map(|m| (m.exp_avg.len() + m.exp_avg_sq.len()) * 4)
        .sum()
}
