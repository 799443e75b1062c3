//! candle runs its elementwise ops on a thread pool of its own besides rayon's (which the matrix
//! products and the model's fused ops use). The two pools' threads contend for the same cores,
//! the pool's idle workers spin 25 000 rounds before they sleep, and its barrier makes every op
//! wait for its slowest thread. On 2 cores a LoRA step of SmolLM2-135M ran at 77 tokens/s with
//! candle's defaults, 117 with a 100-round spin, and 16-20% faster again with candle's pool left
//! to the calling thread alone (each comparison measured within one run), which is what this sets.

/// Limits candle's elementwise pool to the calling thread unless the user chose a size; call
/// first in `main`, before any thread exists (the pool reads it once, when it starts).
pub fn keep_elementwise_on_caller() {
    const VAR: &str = "CANDLE_NUM_THREADS";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}
