//! What a worker process does in each scenario. Workers check their own results exactly
//! (every input is a small integer, so every sum is exact in any order) and report through
//! their exit code and stderr, which the parent test asserts on.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ff_dist::{init_from_env, DistError, WorkerEnv};

pub const TIMEOUT_MS_VAR: &str = "FF_DIST_TEST_TIMEOUT_MS";
/// A folder where workers leave files for the parent (their pid, their environment).
pub const OUT_DIR_VAR: &str = "FF_DIST_TEST_OUT";

fn timeout() -> Duration {
    let ms = std::env::var(TIMEOUT_MS_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    Duration::from_millis(ms)
}

/// Runs `scenario` and returns the process exit code.
pub fn run(scenario: &str) -> i32 {
    let result = match scenario {
        "collectives" => collectives(),
        "dead_peer" => peer_failure(PeerFailure::Dies),
        "stuck_peer" => peer_failure(PeerFailure::Stalls),
        "launched" => launched(),
        "hold" => hold(),
        other => Err(format!("unknown scenario {other}")),
    };
    match result {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("WORKER FAILED: {message}");
            1
        }
    }
}

fn input(rank: usize, i: usize) -> f32 {
    ((rank + 1) * 1000 + i % 997) as f32
}

fn check<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} elements, expected {}",
            got.len(),
            want.len()
        ));
    }
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{what}: element {i} is {:?}, expected {:?}",
            got[i], want[i]
        )),
    }
}

fn err(e: DistError) -> String {
    e.to_string()
}

fn collectives() -> Result<(), String> {
    let pg = init_from_env(timeout()).map_err(err)?;
    let (rank, w) = (pg.rank(), pg.world_size());
    if pg.backend() != "gloo" {
        return Err(format!("expected the gloo backend, got {}", pg.backend()));
    }

    // all_reduce: a small odd length and one past Gloo's 1 MiB segment size.
    for len in [1003, 300_001] {
        let mut data: Vec<f32> = (0..len).map(|i| input(rank, i)).collect();
        pg.all_reduce_sum(&mut data).map_err(err)?;
        let want: Vec<f32> = (0..len)
            .map(|i| (0..w).map(|r| input(r, i)).sum())
            .collect();
        check(&format!("all_reduce_sum of {len}"), &data, &want)?;
    }

    let mut mean: Vec<f32> = (0..10).map(|i| input(rank, i)).collect();
    pg.all_reduce_mean(&mut mean).map_err(err)?;
    let want: Vec<f32> = (0..10)
        .map(|i| (0..w).map(|r| input(r, i)).sum::<f32>() / w as f32)
        .collect();
    check("all_reduce_mean", &mean, &want)?;

    let mut doubles: Vec<f64> = (0..5)
        .map(|i| (rank + 1) as f64 * 0.5 + i as f64 * 0.25)
        .collect();
    pg.all_reduce_sum_f64(&mut doubles).map_err(err)?;
    let want: Vec<f64> = (0..5)
        .map(|i| (0..w).map(|r| (r + 1) as f64 * 0.5 + i as f64 * 0.25).sum())
        .collect();
    check("all_reduce_sum_f64", &doubles, &want)?;

    // reduce_scatter: several shard sizes, each shape twice (the second run reuses Gloo's
    // algorithm built by the first) with different data.
    for shard in [1, 5, 1000, 100_003] {
        for scale in [1.0f32, 2.0] {
            let full: Vec<f32> = (0..w * shard).map(|i| scale * input(rank, i)).collect();
            let mut out = vec![0f32; shard];
            pg.reduce_scatter_sum(&full, &mut out).map_err(err)?;
            let want: Vec<f32> = (0..shard)
                .map(|j| (0..w).map(|r| scale * input(r, rank * shard + j)).sum())
                .collect();
            check(
                &format!("reduce_scatter_sum shard {shard} ×{scale}"),
                &out,
                &want,
            )?;
        }
    }

    let mine: Vec<f32> = (0..7).map(|i| input(rank, i)).collect();
    let mut gathered = vec![0f32; 7 * w];
    pg.all_gather(&mine, &mut gathered).map_err(err)?;
    let want: Vec<f32> = (0..w)
        .flat_map(|r| (0..7).map(move |i| input(r, i)))
        .collect();
    check("all_gather", &gathered, &want)?;

    let mut bytes_out = vec![0u8; 3 * w];
    pg.all_gather_bytes(&[rank as u8; 3], &mut bytes_out)
        .map_err(err)?;
    let want: Vec<u8> = (0..w).flat_map(|r| [r as u8; 3]).collect();
    check("all_gather_bytes", &bytes_out, &want)?;

    let root = w - 1;
    let mut shared: Vec<f32> = if rank == root {
        (0..9).map(|i| input(root, i)).collect()
    } else {
        vec![0.0; 9]
    };
    pg.broadcast(&mut shared, root).map_err(err)?;
    let want: Vec<f32> = (0..9).map(|i| input(root, i)).collect();
    check("broadcast", &shared, &want)?;

    let blob = pg
        .broadcast_blob(if rank == 0 { b"config-hash-0123" } else { b"" }, 0)
        .map_err(err)?;
    check("broadcast_blob", &blob, b"config-hash-0123")?;

    // A caller mistake is reported before any communication and leaves the group usable.
    match pg.reduce_scatter_sum(&[0.0; 3], &mut [0.0; 2]) {
        Err(DistError::BufferSize { .. }) => {}
        other => return Err(format!("a mis-sized reduce_scatter gave {other:?}")),
    }
    pg.barrier().map_err(err)?;

    // A sub-group of the last and first rank, listed in that order, so the last rank is
    // the sub-group's rank 0; the ranks in between do not take part.
    let members = [w - 1, 0];
    if let Some(sub_rank) = members.iter().position(|&m| m == rank) {
        let sub = pg.subgroup("ends", &members).map_err(err)?;
        if (sub.rank(), sub.world_size()) != (sub_rank, 2) {
            return Err(format!(
                "sub-group rank/size {}/{}",
                sub.rank(),
                sub.world_size()
            ));
        }
        let mut value = [(rank + 1) as f32];
        sub.all_reduce_sum(&mut value).map_err(err)?;
        check("sub-group all_reduce", &value, &[(w + 1) as f32])?;
        let mut from_first = [if sub.rank() == 0 { 42.0f32 } else { 0.0 }];
        sub.broadcast(&mut from_first, 0).map_err(err)?;
        check("sub-group broadcast", &from_first, &[42.0])?;
    }
    let alone = pg.subgroup("alone", &[rank]).map_err(err)?;
    if alone.world_size() != 1 {
        return Err("a one-member sub-group should have world size 1".into());
    }
    pg.barrier().map_err(err)?;
    eprintln!("rank {rank}: all collectives checked");
    Ok(())
}

enum PeerFailure {
    Dies,
    Stalls,
}

/// The last rank dies (SIGKILL) or stalls after the group is up; the others must get an
/// error from their next collective within the timeout, and a refusal after that.
fn peer_failure(kind: PeerFailure) -> Result<(), String> {
    let limit = timeout();
    let pg = init_from_env(limit).map_err(err)?;
    pg.barrier().map_err(err)?;
    if pg.rank() == pg.world_size() - 1 {
        match kind {
            PeerFailure::Dies => {
                // SAFETY: raising a signal on this process has no memory-safety concerns.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            PeerFailure::Stalls => std::thread::sleep(limit + Duration::from_millis(1500)),
        }
        return Ok(());
    }
    let start = Instant::now();
    let mut data = vec![1.0f32; 1000];
    let error = match pg.all_reduce_sum(&mut data) {
        Ok(()) => return Err("all_reduce succeeded although a peer is gone".into()),
        Err(e) => e,
    };
    let elapsed = start.elapsed();
    eprintln!("COLLECTIVE ERROR after {}ms: {error}", elapsed.as_millis());
    if elapsed > limit + Duration::from_millis(1500) {
        return Err(format!(
            "the error took {elapsed:?}, beyond the {limit:?} timeout"
        ));
    }
    match pg.barrier() {
        Err(DistError::Broken { .. }) => Ok(()),
        other => Err(format!("after a failure, barrier gave {other:?}")),
    }
}

fn out_dir() -> Result<PathBuf, String> {
    std::env::var(OUT_DIR_VAR)
        .map(PathBuf::from)
        .map_err(|_| format!("{OUT_DIR_VAR} is not set"))
}

/// Writes the worker's pid and launch environment, then checks an all_reduce over the job.
fn launched() -> Result<(), String> {
    let env = WorkerEnv::from_process_env().map_err(|e| e.to_string())?;
    let seen: Vec<String> = [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "OMP_NUM_THREADS",
        "RAYON_NUM_THREADS",
        ff_dist::LAUNCHED_MARKER_VAR,
        "FF_DIST_TEST_EXTRA",
    ]
    .iter()
    .map(|var| format!("{var}={}", std::env::var(var).unwrap_or_default()))
    .collect();
    std::fs::write(
        out_dir()?.join(format!("env-{}", env.rank)),
        seen.join("\n"),
    )
    .map_err(|e| e.to_string())?;

    let pg = init_from_env(timeout()).map_err(err)?;
    let mut value = [(pg.rank() + 1) as f32, 1.0];
    pg.all_reduce_sum(&mut value).map_err(err)?;
    let w = pg.world_size();
    check(
        "job all_reduce",
        &value,
        &[(w * (w + 1) / 2) as f32, w as f32],
    )?;

    // HYBRID_SHARD's two sub-groups: the ranks of this node, and this local rank's peers
    // on the other nodes.
    for (name, members) in [
        ("intra_node", env.intra_node_ranks()),
        ("inter_node", env.inter_node_ranks()),
    ] {
        let sub = pg.subgroup(name, &members).map_err(err)?;
        let mut mine = [(env.rank + 1) as f32];
        sub.all_reduce_sum(&mut mine).map_err(err)?;
        let want: usize = members.iter().map(|r| r + 1).sum();
        check(name, &mine, &[want as f32])?;
    }
    std::fs::write(
        out_dir()?.join(format!("sum-{}", env.rank)),
        format!("{}", value[0]),
    )
    .map_err(|e| e.to_string())
}

/// Names the rank that exits with code 3 in the "hold" scenario (none when unset).
pub const FAILING_RANK_VAR: &str = "FF_DIST_TEST_FAILING_RANK";

/// Every worker writes its pid, joins the group and passes a barrier. Then the failing rank
/// (if any) exits with code 3 and the others block far longer than any test waits, so only
/// their launcher can end them.
fn hold() -> Result<(), String> {
    let env = WorkerEnv::from_process_env().map_err(|e| e.to_string())?;
    std::fs::write(
        out_dir()?.join(format!("pid-{}", env.rank)),
        std::process::id().to_string(),
    )
    .map_err(|e| e.to_string())?;
    let pg = init_from_env(timeout()).map_err(err)?;
    pg.barrier().map_err(err)?;
    let failing: Option<usize> = std::env::var(FAILING_RANK_VAR)
        .ok()
        .and_then(|v| v.parse().ok());
    if failing == Some(env.rank) {
        std::thread::sleep(Duration::from_millis(200));
        std::process::exit(3);
    }
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}
