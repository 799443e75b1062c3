//! The threads row groups run on: one per core, each with a rayon pool of that thread alone, so
//! that a group's products and fused ops never wait on another group's.

use std::sync::OnceLock;

/// One thread per core, each with a rayon pool of its own thread alone.
fn row_group_pools() -> &'static [rayon::ThreadPool] {
    static POOLS: OnceLock<Vec<rayon::ThreadPool>> = OnceLock::new();
    POOLS.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (0..cores)
            .map_while(|_| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok())
            .collect()
    })
}

/// How many row groups the calling thread's rayon pool allows (one per thread it has).
pub fn row_group_threads() -> usize {
    rayon::current_num_threads().min(row_group_pools().len())
}

/// Runs `jobs` at the same time, each on a row group's thread, whose rayon pool is that thread
/// alone, and returns their results in order (jobs past the number of cores wait their turn).
pub fn on_row_group_threads<T: Send, F: FnOnce() -> T + Send>(jobs: Vec<F>) -> Vec<T> {
    let pools = row_group_pools();
    std::thread::scope(|scope| {
        let running: Vec<_> = jobs
            .into_iter()
            .zip(pools.iter().cycle())
            .map(|(job, pool)| scope.spawn(move || pool.install(job)))
            .collect();
        running
            .into_iter()
            .map(|job| job.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}
