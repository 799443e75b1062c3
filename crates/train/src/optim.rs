//! AdamW as `torch.optim.AdamW`, and gradient clipping by global L2 norm.

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;
use std::path::Path;
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::thread::JoinHandle;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{TrainError, TrainResult};
use crate::offload::{chunk_ranges, Chunk, DirectFile, OffloadedGrads, UpdateProgress};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// Hugging Face Trainer's defaults.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Moments of one parameter, kept in float32 beside the float32 master weight.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Moments {
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AdamWState {
    pub step: u64,
    pub moments: Vec<Moments>,
}

pub struct AdamW {
    pub config: AdamWConfig,
    pub state: AdamWState,
    /// Per parameter: whether weight decay applies (not to biases and norm weights).
    decays: Vec<bool>,
    /// The moments, when they live on disk; `state.moments` then stays empty.
    offloaded: Option<OffloadedMoments>,
}

/// Hugging Face Trainer exempts biases and normalisation weights from weight decay.
pub fn decays_weight(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

/// AdamW moments in a direct-I/O file: `exp_avg` of parameter `i` is array `2i`, `exp_avg_sq`
/// array `2i + 1`.
struct OffloadedMoments {
    file: Arc<DirectFile>,
    lens: Vec<usize>,
    /// Whether a parameter has been updated yet (its moments are zeros until then).
    started: Vec<bool>,
    /// The update still running on its own thread.
    pending: Option<JoinHandle<TrainResult<()>>>,
}

/// One step's update of offloaded parameters, owned by the thread that runs it.
struct DiskUpdate {
    vars: Vec<Var>,
    grads: Arc<DirectFile>,
    moments: Arc<DirectFile>,
    /// Which parameters had moments before this step.
    started: Vec<bool>,
    factors: Vec<StepFactors>,
    /// Chunks to update, parameter by parameter in order.
    jobs: Vec<(usize, Range<usize>)>,
}

impl DiskUpdate {
    /// Reads, updates and writes every chunk in `jobs` on three threads, telling `progress`
    /// as each parameter's values are done (its moments may still be on their way to disk).
    fn run(&self, progress: &UpdateProgress) -> TrainResult<()> {
        let Self {
            vars,
            grads,
            moments,
            started,
            factors,
            jobs,
        } = self;
        let (free_tx, free_rx) = sync_channel::<ChunkSet>(CHUNK_SETS_IN_FLIGHT);
        let (full_tx, full_rx) = sync_channel::<(usize, ChunkSet)>(CHUNK_SETS_IN_FLIGHT);
        let (done_tx, done_rx) = sync_channel::<(usize, ChunkSet)>(CHUNK_SETS_IN_FLIGHT);
        for _ in 0..CHUNK_SETS_IN_FLIGHT {
            free_tx
                .send(ChunkSet::default())
                .expect("the receiver is here");
        }
        let (read, update, written) = std::thread::scope(|scope| {
            let reader = scope.spawn(move || -> TrainResult<()> {
                for (job, (i, range)) in jobs.iter().enumerate() {
                    let Ok(mut set) = free_rx.recv() else {
                        return Ok(());
                    };
                    let (start, len) = (range.start, range.len());
                    grads.read(*i, start, len, &mut set.grad)?;
                    if started[*i] {
                        moments.read(2 * i, start, len, &mut set.exp_avg)?;
                        moments.read(2 * i + 1, start, len, &mut set.exp_avg_sq)?;
                    } else {
                        set.exp_avg.zeroed(len);
                        set.exp_avg_sq.zeroed(len);
                    }
                    if full_tx.send((job, set)).is_err() {
                        return Ok(());
                    }
                }
                Ok(())
            });
            let writer = scope.spawn(move || -> TrainResult<()> {
                for (job, set) in done_rx {
                    let (i, range) = &jobs[job];
                    moments.write(2 * i, range.start, &set.exp_avg)?;
                    moments.write(2 * i + 1, range.start, &set.exp_avg_sq)?;
                    // The reader may be done; then the set is simply dropped.
                    let _ = free_tx.send(set);
                }
                Ok(())
            });
            let mut update = Ok(());
            for (job, mut set) in full_rx {
                let (i, range) = &jobs[job];
                let ChunkSet {
                    grad,
                    exp_avg,
                    exp_avg_sq,
                } = &mut set;
                update = vars[*i].inplace_op1(&Update {
                    start: range.start,
                    grad: grad.values(),
                    moments: RefCell::new((exp_avg.values_mut(), exp_avg_sq.values_mut())),
                    factors: factors[*i],
                    on_every_core: false,
                });
                if update.is_err() || done_tx.send((job, set)).is_err() {
                    break;
                }
                if jobs.get(job + 1).is_none_or(|(next, _)| next != i) {
                    progress.advance(i + 1);
                }
            }
            drop(done_tx);
            let join = |handle: std::thread::ScopedJoinHandle<'_, TrainResult<()>>| {
                handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            };
            (join(reader), update, join(writer))
        });
        read?;
        update?;
        written
    }
}

/// Chunks of a gradient and its two moments on their way through the update.
#[derive(Default)]
struct ChunkSet {
    grad: Chunk,
    exp_avg: Chunk,
    exp_avg_sq: Chunk,
}

/// Chunk sets being read, updated or written at once: enough for each of the three stages to
/// have one while a fourth waits.
const CHUNK_SETS_IN_FLIGHT: usize = 4;

/// The scalars of one step's update, the same for every parameter but the decay.
#[derive(Clone, Copy)]
struct StepFactors {
    decay: f32,
    step_size: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bias_correction2_sqrt: f32,
    grad_scale: Option<f32>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, names: &[String]) -> Self {
        Self {
            config,
            state: AdamWState {
                step: 0,
                moments: vec![Moments::default(); names.len()],
            },
            decays: names.iter().map(|n| decays_weight(n)).collect(),
            offloaded: None,
        }
    }

    /// AdamW whose moments live in an unnamed direct-I/O file in `dir`; `lens` are the
    /// parameters' element counts.
    pub fn offloaded(
        config: AdamWConfig,
        names: &[String],
        lens: &[usize],
        dir: &Path,
    ) -> TrainResult<Self> {
        let arrays: Vec<usize> = lens.iter().flat_map(|&n| [n, n]).collect();
        let mut adamw = Self::new(config, names);
        adamw.offloaded = Some(OffloadedMoments {
            file: Arc::new(DirectFile::create(dir, &arrays)?),
            lens: lens.to_vec(),
            started: vec![false; lens.len()],
            pending: None,
        });
        Ok(adamw)
    }

    fn factors(&self, i: usize, lr: f64, grad_scale: Option<f64>) -> StepFactors {
        let c = &self.config;
        let t = self.state.step as i32;
        StepFactors {
            decay: if self.decays[i] {
                (1.0 - lr * c.weight_decay) as f32
            } else {
                1.0
            },
            step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            bias_correction2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            grad_scale: grad_scale.map(|s| s as f32),
        }
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars[i]` (None: no gradient,
    /// the parameter is left alone as torch does). Every gradient is first multiplied by
    /// `grad_scale` when one is given: the clipping coefficient of [`clip_coefficient`], applied
    /// here, element by element as `clip_grad_norm_` would, instead of by a scaled copy of each
    /// gradient. The parameter and its moments are updated in place.
    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        grad_scale: Option<f64>,
    ) -> TrainResult<()> {
        self.state.step += 1;
        if self.offloaded.is_some() {
            return Err(mixed_offload());
        }
        for (i, (var, grad)) in vars.iter().zip(grads).enumerate() {
            let Some(grad) = grad else { continue };
            let factors = self.factors(i, lr, grad_scale);
            let moments = &mut self.state.moments[i];
            if moments.exp_avg.is_empty() {
                moments.exp_avg = vec![0.0; grad.elem_count()];
                moments.exp_avg_sq = vec![0.0; grad.elem_count()];
            }
            with_float32_values(grad, |grad| {
                var.inplace_op1(&Update {
                    start: 0,
                    grad,
                    moments: RefCell::new((&mut moments.exp_avg[..], &mut moments.exp_avg_sq[..])),
                    factors,
                    on_every_core: true,
                })
            })??;
        }
        Ok(())
    }

    /// The update with gradients and moments on disk, started on a thread of its own, which
    /// reads each chunk's gradient and moments ahead, updates the parameter and writes the
    /// moments back on three threads, so that the disk works while the CPU does. The returned
    /// progress says which parameters are done; the next forward waits on it part by part, and
    /// [`AdamW::finish`] waits for the whole update.
    pub fn step_offloaded(
        &mut self,
        vars: &[Var],
        grads: &OffloadedGrads,
        lr: f64,
        grad_scale: Option<f64>,
    ) -> TrainResult<Arc<UpdateProgress>> {
        self.finish()?;
        self.state.step += 1;
        let factors: Vec<StepFactors> = (0..vars.len())
            .map(|i| self.factors(i, lr, grad_scale))
            .collect();
        let Some(disk) = &mut self.offloaded else {
            return Err(mixed_offload());
        };
        let update = DiskUpdate {
            vars: vars.to_vec(),
            grads: grads.file(),
            moments: Arc::clone(&disk.file),
            started: disk.started.clone(),
            factors,
            jobs: (0..vars.len())
                .filter(|&i| grads.has(i))
                .flat_map(|i| chunk_ranges(vars[i].elem_count()).map(move |range| (i, range)))
                .collect(),
        };
        for (i, _) in &update.jobs {
            disk.started[*i] = true;
        }
        let progress = Arc::new(UpdateProgress::default());
        let reported = Arc::clone(&progress);
        let thread = std::thread::Builder::new()
            .name("adamw-offload".into())
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    update.run(&reported)
                }));
                let outcome = outcome.unwrap_or_else(|_| {
                    Err(TrainError::Config("an offload thread panicked".into()))
                });
                match &outcome {
                    Ok(()) => reported.advance(usize::MAX),
                    Err(e) => reported.fail(e.to_string()),
                }
                outcome
            })
            .map_err(|e| TrainError::Config(format!("cannot start the offload thread: {e}")))?;
        disk.pending = Some(thread);
        Ok(progress)
    }

    /// Waits for an update still running on its own thread; its error, if it failed.
    pub fn finish(&mut self) -> TrainResult<()> {
        let Some(thread) = self.offloaded.as_mut().and_then(|d| d.pending.take()) else {
            return Ok(());
        };
        thread
            .join()
            .unwrap_or_else(|_| Err(TrainError::Config("an offload thread panicked".into())))
    }

    /// Takes `state` as the optimizer's (resume), writing its moments to disk when they live
    /// there.
    pub fn restore(&mut self, state: AdamWState) -> TrainResult<()> {
        self.finish()?;
        let Some(disk) = &mut self.offloaded else {
            self.state = state;
            return Ok(());
        };
        let mut chunk = Chunk::default();
        for (i, m) in state.moments.iter().enumerate() {
            disk.started[i] = !m.exp_avg.is_empty();
            for (array, values) in [(2 * i, &m.exp_avg), (2 * i + 1, &m.exp_avg_sq)] {
                for range in chunk_ranges(values.len()) {
                    chunk.copy_from(&values[range.clone()]);
                    disk.file.write(array, range.start, &chunk)?;
                }
            }
        }
        self.state.step = state.step;
        Ok(())
    }
}

/// Engines and optimizers offload together; a mix is a wiring mistake, reported rather than
/// trained wrong.
fn mixed_offload() -> TrainError {
    TrainError::Config("gradients and optimizer state are offloaded together or not at all".into())
}

/// One of a parameter's two AdamW moments.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Moment {
    ExpAvg,
    ExpAvgSq,
}

/// Optimizer state to save, wherever it lives.
pub trait MomentSource {
    /// Updates taken so far.
    fn step(&self) -> u64;
    /// The element count of parameter `i`'s moments; `None` before its first update.
    fn moment_len(&self, i: usize) -> Option<usize>;
    /// The float32 bytes (little-endian, as safetensors stores them) of one moment of
    /// parameter `i`, which has moments.
    fn moment_bytes(&self, i: usize, which: Moment) -> TrainResult<Cow<'_, [u8]>>;
}

impl MomentSource for AdamWState {
    fn step(&self) -> u64 {
        self.step
    }

    fn moment_len(&self, i: usize) -> Option<usize> {
        let len = self.moments[i].exp_avg.len();
        (len > 0).then_some(len)
    }

    fn moment_bytes(&self, i: usize, which: Moment) -> TrainResult<Cow<'_, [u8]>> {
        let m = &self.moments[i];
        Ok(Cow::Borrowed(bytemuck::cast_slice(match which {
            Moment::ExpAvg => &m.exp_avg,
            Moment::ExpAvgSq => &m.exp_avg_sq,
        })))
    }
}

/// Moments on disk are read whole, one at a time, as they are saved.
impl MomentSource for AdamW {
    fn step(&self) -> u64 {
        self.state.step
    }

    fn moment_len(&self, i: usize) -> Option<usize> {
        match &self.offloaded {
            Some(disk) => disk.started[i].then_some(disk.lens[i]),
            None => self.state.moment_len(i),
        }
    }

    fn moment_bytes(&self, i: usize, which: Moment) -> TrainResult<Cow<'_, [u8]>> {
        let Some(disk) = &self.offloaded else {
            return self.state.moment_bytes(i, which);
        };
        if disk.pending.is_some() {
            return Err(TrainError::Config(
                "the optimizer state was read while an update was still writing it".into(),
            ));
        }
        let array = match which {
            Moment::ExpAvg => 2 * i,
            Moment::ExpAvgSq => 2 * i + 1,
        };
        let mut chunk = Chunk::default();
        let mut bytes = Vec::with_capacity(disk.lens[i] * 4);
        for range in chunk_ranges(disk.lens[i]) {
            disk.file
                .read(array, range.start, range.len(), &mut chunk)?;
            bytes.extend_from_slice(bytemuck::cast_slice(chunk.values()));
        }
        Ok(Cow::Owned(bytes))
    }
}

/// One parameter's AdamW update over elements `start..start + grad.len()`, run on the
/// parameter's own storage.
struct Update<'a> {
    start: usize,
    grad: &'a [f32],
    moments: RefCell<(&'a mut [f32], &'a mut [f32])>,
    factors: StepFactors,
    /// Whether to split the elements among rayon's threads: the update in memory runs alone
    /// between steps, while the one from disk overlaps the next forward on threads of its own.
    on_every_core: bool,
}

/// Elements of one task when the update is split among threads.
const UPDATE_TASK: usize = 1 << 16;

impl InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(values) = storage else {
            candle_core::bail!("AdamW updates float32 parameters");
        };
        if !layout.is_contiguous() || layout.shape().elem_count() < self.start + self.grad.len() {
            candle_core::bail!("AdamW needs a contiguous parameter that holds its gradient");
        }
        let params = &mut values[layout.start_offset() + self.start..][..self.grad.len()];
        let mut moments = self.moments.borrow_mut();
        let (exp_avg, exp_avg_sq) = &mut *moments;
        let f = self.factors;
        if self.on_every_core && params.len() > UPDATE_TASK {
            params
                .par_chunks_mut(UPDATE_TASK)
                .zip(self.grad.par_chunks(UPDATE_TASK))
                .zip(exp_avg.par_chunks_mut(UPDATE_TASK))
                .zip(exp_avg_sq.par_chunks_mut(UPDATE_TASK))
                .for_each(|(((p, g), m1), m2)| adamw(f, p, g, m1, m2));
        } else {
            adamw(f, params, self.grad, exp_avg, exp_avg_sq);
        }
        Ok(())
    }
}

/// AdamW on parameters `params` with gradients `grad` and moments `exp_avg`, `exp_avg_sq`,
/// element by element.
fn adamw(
    f: StepFactors,
    params: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
) {
    let (b1, b2) = (f.beta1, f.beta2);
    for (((p, &g), m1), m2) in params
        .iter_mut()
        .zip(grad)
        .zip(exp_avg.iter_mut())
        .zip(exp_avg_sq.iter_mut())
    {
        // `+ 0.0` as candle's affine computes a clipped gradient, so that a zero keeps its
        // sign exactly as with a scaled copy.
        let g = match f.grad_scale {
            Some(scale) => g * scale + 0.0,
            None => g,
        };
        *p *= f.decay;
        *m1 = b1 * *m1 + (1.0 - b1) * g;
        *m2 = b2 * *m2 + (1.0 - b2) * g * g;
        let denom = m2.sqrt() / f.bias_correction2_sqrt + f.eps;
        *p -= f.step_size * *m1 / denom;
    }
}

/// Sum of squares of every gradient: the square of the global L2 norm. Kept separate from
/// clipping so that shards can add their partial sums across ranks first. Summed in float64:
/// over millions of elements a float32 sum drifts by about 1e-4 relative, enough to move the
/// clipping coefficient away from torch's. Each gradient's sum runs in order, one element
/// after another, as offloaded gradients' do, so that both give the same bits; the gradients
/// are summed side by side on rayon's threads.
pub fn grad_sq_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let sums = grads
        .par_iter()
        .flatten()
        .map(|g| {
            with_float32_values(g, |values| {
                values.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(sums.iter().fold(0.0, |total, sum| total + sum))
}

/// Calls `f` with the float32 values of `t` in order, converted or made contiguous only when
/// they are not already.
pub(crate) fn with_float32_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(CpuStorage::F32(values)) = &*storage else {
        candle_core::bail!("gradients are float32 tensors on the CPU");
    };
    Ok(f(
        &values[layout.start_offset()..][..layout.shape().elem_count()]
    ))
}

/// The factor that brings gradients of global norm `total_norm` to at most `max_norm`, as
/// `clip_grad_norm_` computes it (`max_norm / (norm + 1e-6)`); `None` when it would not shrink
/// them (torch caps it at 1).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (total_norm + 1e-6);
    (coef < 1.0).then_some(coef)
}
