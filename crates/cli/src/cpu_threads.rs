//! candle runs elementwise ops on a pool of its own besides rayon's (which the matrix products
//! use), and that pool's idle worker spins 25 000 rounds before it sleeps. With few cores the
//! spinning worker takes a core from the product threads after every elementwise op: on 2 cores
//! a LoRA step of SmolLM2-135M ran 2.5× slower with the default than with a short spin.

/// Rounds an idle elementwise worker spins before it parks.
const SPIN_ROUNDS: &str = "100";

/// Sets candle's spin limit unless the user has; call first in `main`, before any thread exists
/// (the pool reads it once, when it starts).
pub fn shorten_idle_spin() {
    const VAR: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, SPIN_ROUNDS);
    }
}
