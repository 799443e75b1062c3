//! Gradients and AdamW moments kept on disk instead of in memory (`offload_optimizer_dir`), as
//! DeepSpeed's NVMe offload keeps them. A full fine-tuning step then holds the weights, one
//! layer's work and a few chunks in memory, instead of weights, gradients and two moments per
//! parameter: about a third of the memory, for reading and writing them once a step, which
//! the update overlaps with the next step's forward.
//!
//! The data lives in unnamed files (`O_TMPFILE`), so nothing is left behind whatever way the
//! process ends, and it moves by direct I/O, so that the kernel's page cache does not keep a
//! second copy in memory.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ff_dist::ProcessGroup;

use crate::error::{TrainError, TrainResult};

/// Direct I/O moves whole blocks, at block-aligned offsets, from block-aligned memory.
const BLOCK_BYTES: usize = 4096;
const BLOCK_FLOATS: usize = BLOCK_BYTES / 4;
/// Floats moved by one read or write (1 MiB); a multiple of the block.
pub const CHUNK_FLOATS: usize = 1 << 18;
/// `statfs` magic of tmpfs, whose files are memory.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The ranges of at most [`CHUNK_FLOATS`] that cover `len` floats, in order.
pub fn chunk_ranges(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len)
        .step_by(CHUNK_FLOATS)
        .map(move |start| start..(start + CHUNK_FLOATS).min(len))
}

/// A buffer of up to [`CHUNK_FLOATS`] floats that starts on a block boundary.
pub struct Chunk {
    storage: Vec<f32>,
    start: usize,
    len: usize,
}

impl Default for Chunk {
    fn default() -> Self {
        let storage = vec![0f32; CHUNK_FLOATS + BLOCK_FLOATS];
        let address = storage.as_ptr() as usize;
        // Vec<f32> is 4-byte aligned, so the distance to the next block is whole floats.
        let start = (address.next_multiple_of(BLOCK_BYTES) - address) / 4;
        Self {
            storage,
            start,
            len: 0,
        }
    }
}

impl Chunk {
    pub fn values(&self) -> &[f32] {
        &self.storage[self.start..][..self.len]
    }

    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.storage[self.start..][..self.len]
    }

    /// Makes the chunk `len` floats long, all zero.
    pub fn zeroed(&mut self, len: usize) {
        self.len = len;
        self.values_mut().fill(0.0);
    }

    /// Makes the chunk a copy of `values`.
    pub fn copy_from(&mut self, values: &[f32]) {
        self.len = values.len();
        self.values_mut().copy_from_slice(values);
    }

    /// The whole blocks that hold the chunk's floats.
    fn blocks(&self) -> &[u8] {
        bytemuck::cast_slice(&self.storage[self.start..][..self.len.next_multiple_of(BLOCK_FLOATS)])
    }

    fn blocks_mut(&mut self) -> &mut [u8] {
        let len = self.len.next_multiple_of(BLOCK_FLOATS);
        bytemuck::cast_slice_mut(&mut self.storage[self.start..][..len])
    }
}

/// Float arrays of fixed lengths in an unnamed file, each starting on a block boundary.
pub struct DirectFile {
    file: File,
    dir: PathBuf,
    offsets: Vec<u64>,
}

impl DirectFile {
    /// An unnamed file in `dir` with room for arrays of `lens` floats. The space is reserved
    /// now, so that a disk too small shows before training starts, not in the middle of it.
    pub fn create(dir: &Path, lens: &[usize]) -> TrainResult<Self> {
        let mut offsets = Vec::with_capacity(lens.len());
        let mut total = 0u64;
        for &len in lens {
            offsets.push(total);
            total += (len.next_multiple_of(BLOCK_FLOATS) * 4) as u64;
        }
        check_offload_dir(dir)?;
        let refuse = |why: String| {
            TrainError::Config(format!("offload_optimizer_dir {} {why}", dir.display()))
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_DIRECT)
            .mode(0o600)
            .open(dir)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => refuse(
                    "is on a filesystem without direct I/O to unnamed files; choose a folder on a local disk".into(),
                ),
                _ => refuse(format!("cannot hold the offload file ({e})")),
            })?;
        if total > 0 {
            // SAFETY: posix_fallocate only reads its integer arguments; the descriptor is open.
            let errno = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, total as libc::off_t) };
            if errno != 0 {
                let e = std::io::Error::from_raw_os_error(errno);
                return Err(refuse(format!(
                    "cannot reserve the {:.2} GB that gradients and optimizer state need ({e})",
                    total as f64 / 1e9
                )));
            }
        }
        Ok(Self {
            file,
            dir: dir.to_path_buf(),
            offsets,
        })
    }

    fn position(&self, array: usize, start: usize) -> u64 {
        debug_assert!(start.is_multiple_of(BLOCK_FLOATS));
        self.offsets[array] + (start * 4) as u64
    }

    /// Reads floats `start..start + len` of `array` into `chunk`; `start` is a chunk boundary.
    pub fn read(
        &self,
        array: usize,
        start: usize,
        len: usize,
        chunk: &mut Chunk,
    ) -> TrainResult<()> {
        chunk.len = len;
        let position = self.position(array, start);
        self.file
            .read_exact_at(chunk.blocks_mut(), position)
            .map_err(|e| TrainError::io(&self.dir, e))
    }

    /// Writes `chunk` as floats `start..` of `array`; `start` is a chunk boundary.
    pub fn write(&self, array: usize, start: usize, chunk: &Chunk) -> TrainResult<()> {
        let position = self.position(array, start);
        self.file
            .write_all_at(chunk.blocks(), position)
            .map_err(|e| TrainError::io(&self.dir, e))
    }
}

/// Refuses an offload folder that does not exist, or that is on tmpfs, whose files are memory.
pub fn check_offload_dir(dir: &Path) -> TrainResult<()> {
    let refuse = |why: &str| {
        Err(TrainError::Config(format!(
            "offload_optimizer_dir {} {why}",
            dir.display()
        )))
    };
    if !dir.is_dir() {
        return refuse("is not an existing folder");
    }
    if filesystem_magic(dir).is_some_and(|magic| magic == TMPFS_MAGIC) {
        return refuse("is on tmpfs, whose files are memory, so offloading there would save none; choose a folder on a disk");
    }
    Ok(())
}

fn filesystem_magic(dir: &Path) -> Option<i64> {
    let file = File::open(dir).ok()?;
    let mut stats = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct it is given when it returns 0.
    let stats = unsafe {
        (libc::fstatfs(file.as_raw_fd(), stats.as_mut_ptr()) == 0).then(|| stats.assume_init())
    }?;
    Some(stats.f_type as i64)
}

/// The gradients of a step, on disk: each micro-batch's share is added to what is there.
pub struct OffloadedGrads {
    file: Arc<DirectFile>,
    /// Each array's length in floats.
    lens: Vec<usize>,
    /// Whether an array holds this step's gradient yet.
    written: Vec<bool>,
    /// Squared L2 norm of each array's latest sum, in float64.
    sq_norms: Vec<f64>,
    chunk: Chunk,
}

impl OffloadedGrads {
    pub fn create(dir: &Path, lens: &[usize]) -> TrainResult<Self> {
        Ok(Self {
            file: Arc::new(DirectFile::create(dir, lens)?),
            lens: lens.to_vec(),
            written: vec![false; lens.len()],
            sq_norms: vec![0.0; lens.len()],
            chunk: Chunk::default(),
        })
    }

    /// Adds `grad` to the gradient of tensor `i`.
    pub fn add(&mut self, i: usize, grad: &[f32]) -> TrainResult<()> {
        let mut sq_norm = 0f64;
        for range in chunk_ranges(grad.len()) {
            let part = &grad[range.clone()];
            if self.written[i] {
                self.file
                    .read(i, range.start, part.len(), &mut self.chunk)?;
                for (sum, &g) in self.chunk.values_mut().iter_mut().zip(part) {
                    *sum += g;
                }
            } else {
                self.chunk.copy_from(part);
            }
            sq_norm = sum_squares(sq_norm, self.chunk.values());
            self.file.write(i, range.start, &self.chunk)?;
        }
        self.written[i] = true;
        self.sq_norms[i] = sq_norm;
        Ok(())
    }

    /// Sums every gradient over `group`, a chunk per collective (a rank that has no gradient
    /// for a tensor sends zeros, as data parallelism in memory does), and records the sums'
    /// norms. Every rank must call it.
    pub fn all_reduce(&mut self, group: &dyn ProcessGroup) -> TrainResult<()> {
        for (i, &len) in self.lens.iter().enumerate() {
            let mut sq_norm = 0f64;
            for range in chunk_ranges(len) {
                if self.written[i] {
                    self.file
                        .read(i, range.start, range.len(), &mut self.chunk)?;
                } else {
                    self.chunk.zeroed(range.len());
                }
                group.all_reduce_sum(self.chunk.values_mut())?;
                sq_norm = sum_squares(sq_norm, self.chunk.values());
                self.file.write(i, range.start, &self.chunk)?;
            }
            self.written[i] = true;
            self.sq_norms[i] = sq_norm;
        }
        Ok(())
    }

    pub fn has(&self, i: usize) -> bool {
        self.written[i]
    }

    /// Forgets the step's gradients; the space is reused.
    pub fn clear(&mut self) {
        self.written.fill(false);
    }

    /// Sum of squares of every gradient, added tensor by tensor in order as
    /// [`crate::optim::grad_sq_norm`] adds them, so that both give the same bits.
    pub fn sq_norm(&self) -> f64 {
        self.written
            .iter()
            .zip(&self.sq_norms)
            .filter(|(written, _)| **written)
            .fold(0.0, |total, (_, sq)| total + sq)
    }

    pub fn read(&self, i: usize, start: usize, len: usize, chunk: &mut Chunk) -> TrainResult<()> {
        self.file.read(i, start, len, chunk)
    }

    /// The file, for an update that reads the gradients on another thread.
    pub(crate) fn file(&self) -> Arc<DirectFile> {
        Arc::clone(&self.file)
    }
}

/// `acc` plus the squares of `values` in float64, added in order.
fn sum_squares(acc: f64, values: &[f32]) -> f64 {
    values
        .iter()
        .fold(acc, |acc, &v| acc + (v as f64) * (v as f64))
}

/// How far an AdamW update running on another thread has come: parameters `0..done` (in the
/// optimizer's order) are updated. The next step's forward waits here for each part's
/// parameters, so that the update's disk traffic overlaps the forward's computation.
#[derive(Default)]
pub struct UpdateProgress {
    state: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Default)]
struct Progress {
    done: usize,
    failure: Option<String>,
}

impl UpdateProgress {
    fn state(&self) -> MutexGuard<'_, Progress> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parameters `0..done` are updated.
    pub(crate) fn advance(&self, done: usize) {
        self.state().done = done;
        self.changed.notify_all();
    }

    /// The update stopped with `failure`; waiters get it instead of waiting forever.
    pub(crate) fn fail(&self, failure: String) {
        self.state().failure = Some(failure);
        self.changed.notify_all();
    }

    /// Blocks until parameters `0..n` are updated.
    pub fn wait_for(&self, n: usize) -> TrainResult<()> {
        let mut state = self.state();
        while state.done < n {
            if let Some(failure) = &state.failure {
                return Err(TrainError::Config(format!(
                    "the offloaded AdamW update failed: {failure}"
                )));
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        Ok(())
    }
}
