//! The direct-I/O files behind `offload_optimizer_dir`: lengths that are not whole blocks or
//! chunks, and gradients summed on disk, a table's dense values and rows in memory's order.

use candle_core::{DType, Device, Tensor};
use ff_kernels::weight_grads::store_of;
use ff_model::finetune::make_all_trainable;
use ff_model::load::load_model_dir;
use ff_model::table_grad::{RowSums, TableGrad};
use ff_train::offload::{chunk_ranges, Chunk, DirectFile, OffloadedGrads, CHUNK_FLOATS};
use ff_train::{AdamWConfig, Trainables};
use ff_walk::{Part, Residency};

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

/// A table's gradient handed on as dense values and rows (a tied head's with the embedding's)
/// adds the dense values first and the rows after, on disk as in memory: (1e8 + -1e8) + 1 is
/// 1 in row 0, where adding the row to the dense values first gives 0.
#[test]
fn a_table_gradient_adds_its_rows_last_on_disk_as_in_memory() {
    let dir = offload_dir();
    let model_dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
    // The embedding table's gradient and its width.
    let first_grad = |offload: bool| -> (Vec<f32>, usize) {
        let mut model = load_model_dir(&model_dir, DType::F32, &Device::Cpu).unwrap();
        make_all_trainable(&mut model).unwrap();
        let mut trainables = Trainables::of(&mut model);
        if offload {
            trainables
                .offload_to(dir.path(), AdamWConfig::default())
                .unwrap();
        }
        let table = trainables.vars[0].clone();
        assert_eq!(trainables.names[0], "model.embed_tokens.weight");
        let (len, width) = (table.elem_count(), table.dim(1).unwrap());
        let earlier = Tensor::full(1e8f32, table.shape(), &Device::Cpu).unwrap();
        trainables
            .add_grads(Part::Embed, &store_of(table.as_tensor(), earlier).unwrap())
            .unwrap();
        let grad = TableGrad {
            dense: Some(vec![-1e8; len]),
            rows: RowSums::of(&[0], &vec![1.0; width], width, None).unwrap(),
        };
        trainables
            .add_table_grad(Part::Embed, &table, grad)
            .unwrap();
        let grad = match &trainables.offloaded {
            Some(offload) => read_back(len, |start, n, chunk| {
                offload.grads.read(0, start, n, chunk).unwrap()
            }),
            None => {
                let grad = trainables.grads[0].as_ref().unwrap();
                grad.flatten_all().unwrap().to_vec1().unwrap()
            }
        };
        (grad, width)
    };
    for offload in [false, true] {
        let (grad, width) = first_grad(offload);
        assert!(grad[..width].iter().all(|&g| g == 1.0), "offload {offload}");
        assert!(grad[width..].iter().all(|&g| g == 0.0), "offload {offload}");
    }
}
