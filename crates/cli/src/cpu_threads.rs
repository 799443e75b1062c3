//! candle runs its elementwise ops on a thread pool of its own besides rayon's (which the matrix
//! products and the model's fused ops use). The two pools' threads contend for the same cores,
//! the pool's idle workers spin 25 000 rounds before they sleep, and its barrier makes every op
//! wait for its slowest thread. A shorter spin made a LoRA step much faster, and leaving
//! candle's pool to the calling thread alone faster again (each comparison measured within one
//! run; figures in bench/RESULTS.md), which is what this sets.

/// Limits candle's elementwise pool to the calling thread unless the user chose a size; call
/// first in `main`, before any thread exists (the pool reads it once, when it starts).
pub fn keep_elementwise_on_caller() {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}
