//! What a person sees while training: a progress bar on a terminal, plain log lines otherwise
//! (so that logs of batch jobs stay readable).

use std::io::IsTerminal;

use ff_train::trainer::Observer;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Map, Value};

pub struct Progress {
    bar: Option<ProgressBar>,
    /// Only rank 0 reports; the other ranks of a data-parallel run stay quiet.
    enabled: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        Self { bar: None, enabled }
    }

    fn print(&self, line: &str) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// A record in the style Hugging Face Trainer prints: `{'loss': 1.2345, 'epoch': 0.5}`.
fn render(record: &Map<String, Value>) -> String {
    let fields: Vec<String> = record
        .iter()
        .map(|(k, v)| match v.as_f64() {
            Some(x) if k == "learning_rate" => format!("'{k}': {x:.4e}"),
            Some(x) if k == "grad_norm" => format!("'{k}': {x:.4}"),
            _ => format!("'{k}': {v}"),
        })
        .collect();
    format!("{{{}}}", fields.join(", "))
}

impl Observer for Progress {
    fn on_start(&mut self, total_steps: u64, first_step: u64) {
        if !self.enabled {
            return;
        }
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total_steps).with_position(first_step);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
                )
                .expect("the template is valid"),
            );
            self.bar = Some(bar);
        } else {
            eprintln!("training for {total_steps} steps (starting at step {first_step})");
        }
    }

    fn on_step(&mut self, _step: u64, loss: f64, lr: f64) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4}, lr {lr:.3e}"));
            bar.inc(1);
        }
    }

    fn on_log(&mut self, record: &Map<String, Value>) {
        self.print(&render(record));
    }

    fn on_message(&mut self, message: &str) {
        self.print(message);
    }

    fn on_finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }
}
