//! Evaluation on the eval set: the mean loss over its examples, and Hugging Face's metrics.

use std::time::Instant;

use ff_config::TrainArgs;
use ff_model::CausalLm;
use ff_walk::Residency;
use serde_json::{json, Map, Value};

use crate::batch::{collate, Example};
use crate::engine::Engine;
use crate::error::TrainResult;
use crate::walk::eval_nll;

use super::log::round;
use super::Run;

/// An evaluation's mean loss and how long it took.
#[derive(Clone, Copy)]
pub(super) struct Evaluation {
    pub loss: f64,
    runtime: f64,
}

impl Evaluation {
    /// Hugging Face's evaluation metrics: the loss and its speed figures, with the steps counted
    /// as its evaluation loop counts them (batches of `per_device_eval_batch_size` on every rank).
    pub fn metrics(&self, run: &Run<'_>) -> Map<String, Value> {
        let samples = run.eval.len() as f64;
        let batch = (run.args.per_device_eval_batch_size as usize * run.group.world_size()).max(1);
        let steps = run.eval.len().div_ceil(batch) as f64;
        let mut metrics = Map::new();
        metrics.insert("eval_loss".into(), json!(self.loss));
        metrics.insert("eval_runtime".into(), json!(round(self.runtime, 4)));
        metrics.insert(
            "eval_samples_per_second".into(),
            json!(round(samples / self.runtime, 3)),
        );
        metrics.insert(
            "eval_steps_per_second".into(),
            json!(round(steps / self.runtime, 3)),
        );
        metrics
    }
}

/// The evaluation loss on the ranks that compute it: replicated evaluation involves no
/// collective, so rank 0 alone runs it and the others wait at their next collective; sharded
/// evaluation gathers units, so every rank runs it. `None` on ranks that do not evaluate.
pub(super) fn evaluate_where_needed(
    model: &mut CausalLm,
    engine: &mut Engine,
    run: &Run<'_>,
) -> TrainResult<Option<Evaluation>> {
    let sharded = matches!(engine, Engine::Sharded(_));
    if run.group.rank() != 0 && !sharded {
        return Ok(None);
    }
    let start = Instant::now();
    let loss = evaluate(
        model,
        engine.residency(),
        run.eval,
        run.args,
        run.pad_token_id,
    )?;
    Ok(Some(Evaluation {
        loss,
        runtime: start.elapsed().as_secs_f64(),
    }))
}

fn evaluate(
    model: &mut CausalLm,
    params: &mut dyn Residency,
    eval: &[Example],
    args: &TrainArgs,
    pad: u32,
) -> TrainResult<f64> {
    let mut weighted = 0.0;
    let mut examples = 0usize;
    for chunk in eval.chunks(args.per_device_eval_batch_size as usize) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (nll, tokens) = eval_nll(model, params, &collate(&refs, pad))?;
        if tokens > 0 {
            weighted += nll / tokens as f64 * chunk.len() as f64;
            examples += chunk.len();
        }
    }
    Ok(if examples == 0 {
        f64::NAN
    } else {
        weighted / examples as f64
    })
}
