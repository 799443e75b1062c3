//! The direct-I/O files behind `offload_optimizer_dir`: lengths that are not whole blocks or
//! chunks, and gradients summed on disk.

use ff_train::offload::{chunk_ranges, Chunk, DirectFile, OffloadedGrads, CHUNK_FLOATS};

/// A folder on the disk that holds the build (tmpfs is refused for offload files).
fn offload_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

fn values(len: usize, seed: f32) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37 + seed).sin()).collect()
}

/// Reads array `i` of `len` floats whole, chunk by chunk.
fn read_back(len: usize, read: impl Fn(usize, usize, &mut Chunk)) -> Vec<f32> {
    let mut chunk = Chunk::default();
    let mut out = Vec::with_capacity(len);
    for range in chunk_ranges(len) {
        read(range.start, range.len(), &mut chunk);
        out.extend_from_slice(chunk.values());
    }
    out
}

const LENS: [usize; 6] = [1, 1023, 1024, 1025, CHUNK_FLOATS, CHUNK_FLOATS + 5];

#[test]
fn arrays_of_any_length_read_back_as_written() {
    let dir = offload_dir();
    let file = DirectFile::create(dir.path(), &LENS).unwrap();
    let mut chunk = Chunk::default();
    for (i, &len) in LENS.iter().enumerate() {
        let data = values(len, i as f32);
        for range in chunk_ranges(len) {
            chunk.copy_from(&data[range.clone()]);
            file.write(i, range.start, &chunk).unwrap();
        }
    }
    // Written after its neighbours, each array still holds its own values only.
    for (i, &len) in LENS.iter().enumerate() {
        let got = read_back(len, |start, n, chunk| {
            file.read(i, start, n, chunk).unwrap()
        });
        assert_eq!(got, values(len, i as f32), "array {i} of {len}");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn gradients_add_up_on_disk_with_their_norm() {
    let dir = offload_dir();
    let mut grads = OffloadedGrads::create(dir.path(), &LENS).unwrap();
    let (first, second) = (values(LENS[5], 1.0), values(LENS[5], 2.0));
    grads.add(5, &first).unwrap();
    grads.add(5, &second).unwrap();
    grads.add(1, &values(LENS[1], 3.0)).unwrap();
    let sum: Vec<f32> = first.iter().zip(&second).map(|(a, b)| a + b).collect();
    let got = read_back(LENS[5], |start, n, chunk| {
        grads.read(5, start, n, chunk).unwrap()
    });
    assert_eq!(got, sum);
    assert!(grads.has(1) && grads.has(5) && !grads.has(0));
    let sq = |v: &[f32]| v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    let expected = sq(&values(LENS[1], 3.0)) + sq(&sum);
    assert_eq!(grads.sq_norm(), expected);

    grads.clear();
    assert!(!grads.has(5));
    assert_eq!(grads.sq_norm(), 0.0);
    // After a clear the first gradient replaces what was there instead of adding to it.
    grads.add(5, &first).unwrap();
    let got = read_back(LENS[5], |start, n, chunk| {
        grads.read(5, start, n, chunk).unwrap()
    });
    assert_eq!(got, first);
}
