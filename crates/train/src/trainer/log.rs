//! `trainer_log.jsonl`, LLaMA-Factory's record of a run's progress, one JSON line per record.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{TrainError, TrainResult};

pub const TRAINER_LOG: &str = "trainer_log.jsonl";

/// Where a run is after `step` of `total_steps`, in LLaMA-Factory's order of keys: the step
/// counts, then `values` (the loss and learning rate, or the evaluation loss, or nothing), then
/// the epoch, the percentage and the times.
pub(super) fn progress_line(
    step: u64,
    total_steps: u64,
    values: &[(&str, &Value)],
    epoch: f64,
    elapsed: f64,
    remaining: f64,
) -> Value {
    let mut line = Map::new();
    line.insert("current_steps".into(), step.into());
    line.insert("total_steps".into(), total_steps.into());
    for (key, value) in values {
        line.insert((*key).into(), (*value).clone());
    }
    line.insert("epoch".into(), epoch.into());
    line.insert(
        "percentage".into(),
        round(step as f64 / total_steps as f64 * 100.0, 2).into(),
    );
    line.insert("elapsed_time".into(), duration(elapsed).into());
    line.insert("remaining_time".into(), duration(remaining).into());
    Value::Object(line)
}

pub(super) fn append_log_line(out: &Path, line: &Value) -> TrainResult<()> {
    use std::io::Write;
    let path = out.join(TRAINER_LOG);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| TrainError::io(&path, e))?;
    writeln!(file, "{line}").map_err(|e| TrainError::io(&path, e))
}

pub(super) fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_orders_its_keys_as_llama_factory_does() {
        let loss = Value::from(1.5);
        let line = progress_line(3, 8, &[("loss", &loss)], 0.375, 3725.0, 0.0);
        assert_eq!(
            line.to_string(),
            r#"{"current_steps":3,"total_steps":8,"loss":1.5,"epoch":0.375,"percentage":37.5,"elapsed_time":"1:02:05","remaining_time":"0:00:00"}"#
        );
    }
}
