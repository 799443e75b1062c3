//! Loading a checkpoint holds about one copy of its weights: the mapped file's pages are
//! dropped as tensors are copied out. Alone in its file so that no other test shares the
//! process whose peak memory it reads.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ff_model::safetensors_io::{save_atomic, SafetensorsFiles};

/// A field of /proc/self/status in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

#[test]
fn loading_keeps_one_copy_of_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let (count, elements) = (32, 1 << 20);
    let tensors: Vec<(String, Tensor)> = (0..count)
        .map(|i| {
            let t = Tensor::full(i as f32, elements, &Device::Cpu).unwrap();
            (format!("t{i}"), t)
        })
        .collect();
    save_atomic(&tensors, None, Path::new(&path)).unwrap();
    drop(tensors);
    let size = (count * elements * 4) as u64;

    let before = status_bytes("VmRSS:");
    let files = SafetensorsFiles::open(&[path]).unwrap();
    let loaded: Vec<Tensor> = (0..count)
        .map(|i| {
            files
                .load(&format!("t{i}"), None, DType::F32, &Device::Cpu)
                .unwrap()
        })
        .collect();
    let after = status_bytes("VmRSS:");
    assert_eq!(loaded.len(), count);
    let grown = after.saturating_sub(before);
    assert!(
        grown < size + size / 4,
        "loading {size} bytes grew the resident set by {grown}"
    );
}
