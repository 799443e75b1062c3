//! Preprocesses alpaca_en_demo (1000 rows) with the SmolLM2 tokenizer and the smollm2 template,
//! without the cache, and prints the time and examples per second.
//!
//! `cargo bench -p ff-data --bench preprocess`

use std::path::Path;
use std::time::Instant;

use ff_data::{load_template, prepare, DataArgs};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let args = DataArgs {
        dataset: vec!["alpaca_en_demo".into()],
        dataset_dir: root.join("data"),
        template: "smollm2".into(),
        cutoff_len: 2048,
        ..DataArgs::default()
    };
    let tokenizer_dir = root.join("testdata/smollm2-135m-config");
    let runs = 5;
    let mut times = Vec::with_capacity(runs);
    let mut examples = 0;
    for _ in 0..runs {
        let start = Instant::now();
        let prepared = match prepare(&args, &tokenizer_dir) {
            Ok(prepared) => prepared,
            Err(e) => {
                eprintln!("preprocessing failed: {e}");
                std::process::exit(1);
            }
        };
        times.push(start.elapsed().as_secs_f64());
        examples = prepared.train.len();
    }
    times.sort_by(f64::total_cmp);
    // The fixed cost inside each run: reading tokenizer.json and setting up the template.
    let start = Instant::now();
    if let Err(e) = load_template(&args, &tokenizer_dir) {
        eprintln!("loading the tokenizer failed: {e}");
        std::process::exit(1);
    }
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let best = times[0];
    let median = times[runs / 2];
    println!(
        "preprocess alpaca_en_demo (smollm2, {} threads): {examples} examples, \
         best {:.1} ms ({:.0} examples/s), median {:.1} ms ({:.0} examples/s); \
         of which loading the tokenizer {load_ms:.1} ms",
        rayon::current_num_threads(),
        best * 1e3,
        examples as f64 / best,
        median * 1e3,
        examples as f64 / median,
    );
}
