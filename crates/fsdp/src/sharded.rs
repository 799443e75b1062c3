//! The sharded engine: FULL_SHARD, SHARD_GRAD_OP and HYBRID_SHARD.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use ff_config::{BackwardPrefetch, FsdpConfig, ShardingStrategy};
use ff_dist::ProcessGroup;
use ff_model::quant::{QuantFormat, QuantizedWeight, RawBuffer};
use ff_model::{CausalLm, Part};
use ff_walk::{BackwardExtent, Pass, Residency, Walk, WalkResult};

use crate::comm_thread::CommThread;
use crate::error::{FsdpError, FsdpResult};
use crate::gathered::{FrozenSource, Gathered, Shard};
use crate::layout::{Entry, Piece, UnitLayout};
use crate::peer_shards::PeerShards;
use crate::plan::plan_units;
use crate::slots::slots_of;

/// What wrapping a model needs besides the settings.
pub struct ShardedSetup<'a> {
    pub config: &'a FsdpConfig,
    /// Every rank of the job.
    pub group: &'a dyn ProcessGroup,
    /// Ranks per node; HYBRID_SHARD shards inside a node and replicates across nodes.
    pub local_world_size: usize,
}

/// Where a slot's values sit in its unit's layout.
#[derive(Clone, Debug)]
enum SlotLayout {
    /// One entry holds the tensor.
    Tensor(usize),
    /// A quantized weight: one frozen entry per array it is made of.
    Quantized {
        format: QuantFormat,
        dims: [usize; 2],
        buffers: Vec<(String, usize)>,
    },
}

/// One unit's state on this rank.
struct Unit {
    parts: Vec<Part>,
    layout: UnitLayout,
    /// Per slot of the unit's parts, in [`slots_of`] order.
    slots: Vec<SlotLayout>,
    /// This rank's frozen bytes, sent as they are by every gather (empty once every unit's
    /// are published in shared memory).
    frozen: Arc<Vec<u8>>,
    /// The dtype every frozen tensor of the unit has, if they share one and none is quantized:
    /// they are then gathered into one buffer of it and put in the model as views of it.
    frozen_dtype: Option<DType>,
    pieces: Vec<Piece>,
    /// Index of the unit's first piece in [`Sharded::vars`].
    first_piece: usize,
    /// While gathered: the trained [`Var`]s put in the model, by entry, and the bytes put there.
    installed: Option<(Vec<Option<Var>>, usize)>,
    /// During backward: the unit's full gradient, summed over its parts.
    grad_sum: Option<Vec<f32>>,
}

/// Bytes this rank holds, as the engine counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    /// Shards of trained (float32) and frozen tensors.
    pub shard_bytes: usize,
    /// What every unit would take gathered: the unsharded model.
    pub full_bytes: usize,
    /// The largest unit, gathered.
    pub largest_unit_bytes: usize,
    /// The most bytes gathered at one time so far.
    pub peak_gathered_bytes: usize,
    /// Of `shard_bytes`, the quantized weights' (QLoRA's base).
    pub quantized_shard_bytes: usize,
    /// The whole model's quantized weight bytes.
    pub quantized_full_bytes: usize,
    /// Time spent blocked on the engine's collectives: gathers not prefetched or not finished
    /// yet, and, at the walk's end, reduce-scatters of gradients not finished yet.
    pub comm_wait: Duration,
}

pub struct Sharded {
    units: Vec<Unit>,
    unit_of: HashMap<Part, usize>,
    shard_group: Box<dyn ProcessGroup>,
    /// HYBRID_SHARD: the ranks holding the same shard on other nodes.
    replicas: Option<Box<dyn ProcessGroup>>,
    strategy: ShardingStrategy,
    forward_prefetch: bool,
    backward_prefetch: BackwardPrefetch,
    /// Prefetched gathers and the gradients' reduce-scatters, off the walk's thread.
    comm: CommThread,
    /// Every unit's frozen shards, where the shard group's ranks share this machine.
    published: Option<Arc<PeerShards>>,
    device: Device,
    num_layers: usize,
    extent: BackwardExtent,
    /// The walk under way, and how far it has come.
    events: Vec<(Part, Pass)>,
    cursor: usize,
    gathered_bytes: usize,
    accounting: Accounting,
    /// The pieces this rank trains, in unit order: names (the tensor's), values, gradients.
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    pub grads: Vec<Option<Tensor>>,
}

impl Sharded {
    /// Cuts `model` into units, keeps this rank's shard of each and empties the model's slots.
    /// With `sync_module_states` (or `cpu_ram_efficient_loading`) rank 0's values are sent to
    /// every rank, so the others may have been built without reading the weight files.
    pub fn wrap(model: &mut CausalLm, setup: ShardedSetup<'_>) -> FsdpResult<Self> {
        let config = setup.config;
        let global = setup.group;
        let local = setup.local_world_size.max(1);
        if config.sharding_strategy == ShardingStrategy::NoShard {
            return Err(FsdpError::Config(
                "NO_SHARD is data parallelism; train it with the replicated engine".into(),
            ));
        }
        let (shard_group, replicas) = shard_groups(config.sharding_strategy, global, local)?;
        let members: Vec<usize> = (0..shard_group.world_size()).collect();
        let comm = CommThread::new(shard_group.subgroup("fsdp-comm", &members)?);
        let plan = plan_units(
            &model.config,
            config.auto_wrap_policy,
            &config.transformer_layer_cls_to_wrap,
            config.min_num_params,
        )?;
        let sync = config.sync_module_states || config.cpu_ram_efficient_loading;
        let mut engine = Self {
            units: Vec::with_capacity(plan.len()),
            unit_of: HashMap::new(),
            shard_group,
            replicas,
            strategy: config.sharding_strategy,
            forward_prefetch: config.forward_prefetch,
            backward_prefetch: config.backward_prefetch,
            comm,
            published: None,
            device: model.device.clone(),
            num_layers: model.layers.len(),
            extent: BackwardExtent::of_parts([], model.layers.len()),
            events: Vec::new(),
            cursor: 0,
            gathered_bytes: 0,
            accounting: Accounting::default(),
            names: Vec::new(),
            vars: Vec::new(),
            grads: Vec::new(),
        };
        let mut trained_parts = Vec::new();
        for (u, parts) in plan.into_iter().enumerate() {
            let (meta, slot_layouts) = describe_unit(model, &parts, &mut trained_parts)?;
            for &part in &parts {
                engine.unit_of.insert(part, u);
            }
            engine.add_unit(model, parts, meta, slot_layouts, sync.then_some(global))?;
            engine.empty_slots(model, u)?;
        }
        engine.extent = BackwardExtent::of_parts(trained_parts, engine.num_layers);
        if engine.shard_group.world_size() <= local {
            engine.publish_frozen_shards()?;
        }
        return_freed_pages();
        Ok(engine)
    }

    /// Lays out a unit of `parts` whose tensors are `meta` and keeps this rank's shard of it:
    /// its trained pieces as [`Var`]s, its frozen bytes. With `sync_from`, rank 0's values are
    /// broadcast over that group first.
    fn add_unit(
        &mut self,
        model: &mut CausalLm,
        parts: Vec<Part>,
        meta: Vec<EntryMeta>,
        slot_layouts: Vec<SlotLayout>,
        sync_from: Option<&dyn ProcessGroup>,
    ) -> FsdpResult<()> {
        let (world, rank) = (self.shard_group.world_size(), self.shard_group.rank());
        let device = self.device.clone();
        let layout = UnitLayout::new(meta, world);
        let mut full = if sync_from.is_none_or(|global| global.rank() == 0) {
            flatten_unit(model, &parts, &slot_layouts, &layout)?
        } else {
            vec![0u8; layout.trained_shard * world * 4 + layout.frozen_shard * world]
        };
        if let Some(global) = sync_from {
            global.broadcast_bytes(&mut full, 0)?;
        }
        let trained_bytes = layout.trained_shard * world * 4;
        let (trained, frozen) = full.split_at(trained_bytes);
        let trained: &[f32] = bytemuck::cast_slice(trained);
        let pieces = layout.pieces(rank);
        let first_piece = self.vars.len();
        for piece in &pieces {
            let entry = &layout.entries[piece.entry];
            let start = entry.offset + piece.in_entry.start;
            let values = &trained[start..start + piece.in_entry.len()];
            self.names.push(entry.name.clone());
            self.vars
                .push(Var::from_slice(values, values.len(), &device)?);
            self.grads.push(None);
        }
        let frozen_range = rank * layout.frozen_shard..(rank + 1) * layout.frozen_shard;
        self.accounting.shard_bytes += layout.trained_range(rank).len() * 4 + layout.frozen_shard;
        self.accounting.full_bytes += layout.full_bytes();
        let owned = layout.frozen_range(rank);
        for slot in &slot_layouts {
            if let SlotLayout::Quantized { buffers, .. } = slot {
                for (_, index) in buffers {
                    let entry = &layout.entries[*index];
                    let end = entry.offset + entry.num_bytes();
                    self.accounting.quantized_full_bytes += entry.num_bytes();
                    self.accounting.quantized_shard_bytes += end
                        .min(owned.end)
                        .saturating_sub(entry.offset.max(owned.start));
                }
            }
        }
        self.accounting.largest_unit_bytes =
            self.accounting.largest_unit_bytes.max(layout.full_bytes());
        let quantized = slot_layouts
            .iter()
            .any(|s| matches!(s, SlotLayout::Quantized { .. }));
        let mut frozen_dtypes = layout
            .entries
            .iter()
            .filter(|e| !e.trainable)
            .map(|e| e.dtype);
        let first_dtype = frozen_dtypes.next();
        let frozen_dtype =
            first_dtype.filter(|&d| !quantized && frozen_dtypes.all(|other| other == d));
        self.units.push(Unit {
            frozen: Arc::new(frozen[frozen_range].to_vec()),
            frozen_dtype,
            parts,
            layout,
            slots: slot_layouts,
            pieces,
            first_piece,
            installed: None,
            grad_sum: None,
        });
        Ok(())
    }

    /// Puts every unit's frozen shard where the shard group's ranks on this machine read it,
    /// and drops the private copies when that worked.
    fn publish_frozen_shards(&mut self) -> FsdpResult<()> {
        let shards: Vec<&[u8]> = self.units.iter().map(|u| u.frozen.as_slice()).collect();
        self.published = PeerShards::publish(self.shard_group.as_ref(), &shards)?.map(Arc::new);
        if self.published.is_some() {
            // The shared files hold them now.
            for unit in &mut self.units {
                unit.frozen = Arc::new(Vec::new());
            }
        }
        Ok(())
    }

    pub fn accounting(&self) -> Accounting {
        self.accounting
    }

    /// The group a shard is spread over (all ranks, or one node's under HYBRID_SHARD).
    pub fn shard_group(&self) -> &dyn ProcessGroup {
        self.shard_group.as_ref()
    }

    /// Every trained tensor's name and shape, on every rank.
    pub fn trained_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.units
            .iter()
            .flat_map(|u| u.layout.entries.iter())
            .filter(|e| e.trainable)
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect()
    }

    /// A label per piece that says which elements of its tensor it holds (`name[start:end]`).
    pub fn piece_labels(&self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.vars.len());
        for unit in &self.units {
            for piece in &unit.pieces {
                let entry = &unit.layout.entries[piece.entry];
                out.push(format!(
                    "{}[{}:{}]",
                    entry.name, piece.in_entry.start, piece.in_entry.end
                ));
            }
        }
        out
    }

    /// After every micro-batch's backward: sums gradients across HYBRID_SHARD's replicas.
    pub fn finish_grads(&mut self) -> FsdpResult<()> {
        let Some(replicas) = &self.replicas else {
            return Ok(());
        };
        let mut flat = Vec::new();
        for (var, grad) in self.vars.iter().zip(&self.grads) {
            match grad {
                Some(g) => flat.extend(g.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
            }
        }
        let started = Instant::now();
        replicas.all_reduce_sum(&mut flat)?;
        self.accounting.comm_wait += started.elapsed();
        let mut offset = 0;
        for (var, grad) in self.vars.iter().zip(self.grads.iter_mut()) {
            let n = var.elem_count();
            *grad = Some(Tensor::from_slice(
                &flat[offset..offset + n],
                n,
                &self.device,
            )?);
            offset += n;
        }
        Ok(())
    }

    pub fn zero_grads(&mut self) {
        self.grads.iter_mut().for_each(|g| *g = None);
    }

    /// Puts every unit's full tensors back into the model (trained ones only unless
    /// `with_frozen`), for saving; [`Residency::end`] empties them again.
    pub fn materialize(&mut self, model: &mut CausalLm, with_frozen: bool) -> FsdpResult<()> {
        self.drain_prefetch()?;
        for u in 0..self.units.len() {
            let unit = &self.units[u];
            let nothing_to_fill = unit.layout.trained_len == 0 && !with_frozen;
            if unit.installed.is_none() && !nothing_to_fill {
                let gathered = self
                    .shard_of(u, with_frozen)?
                    .gather(self.shard_group.as_ref())?;
                self.fill(model, u, gathered, with_frozen)?;
            }
        }
        Ok(())
    }

    /// Whole tensors from per-piece values (optimizer moments, for example), by name; every
    /// rank of the shard group must call it.
    pub fn gather_values(&self, per_piece: &[Vec<f32>]) -> FsdpResult<Vec<(String, Vec<f32>)>> {
        let world = self.shard_group.world_size();
        let mut out = Vec::new();
        for unit in &self.units {
            let layout = &unit.layout;
            if layout.trained_len == 0 {
                continue;
            }
            let mut shard = vec![0f32; layout.trained_shard];
            for (i, piece) in unit.pieces.iter().enumerate() {
                let values = &per_piece[unit.first_piece + i];
                if values.len() == piece.in_shard.len() {
                    shard[piece.in_shard.clone()].copy_from_slice(values);
                }
            }
            let mut full = vec![0f32; layout.trained_shard * world];
            self.shard_group.all_gather(&shard, &mut full)?;
            for entry in layout.entries.iter().filter(|e| e.trainable) {
                out.push((
                    entry.name.clone(),
                    full[entry.offset..entry.offset + entry.numel()].to_vec(),
                ));
            }
        }
        Ok(out)
    }

    /// This rank's piece of each whole tensor in `full` (the inverse of [`Self::gather_values`]);
    /// a tensor missing from `full` gives zeros, as optimizer moments never updated are.
    pub fn scatter_values(&self, full: &HashMap<String, Vec<f32>>) -> FsdpResult<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(self.vars.len());
        for unit in &self.units {
            for piece in &unit.pieces {
                let entry = &unit.layout.entries[piece.entry];
                let Some(values) = full.get(&entry.name) else {
                    out.push(vec![0.0; piece.in_entry.len()]);
                    continue;
                };
                if values.len() != entry.numel() {
                    return Err(FsdpError::Config(format!(
                        "the saved state's `{}` has {} elements but the model's has {}",
                        entry.name,
                        values.len(),
                        entry.numel()
                    )));
                }
                out.push(values[piece.in_entry.clone()].to_vec());
            }
        }
        Ok(out)
    }

    /// This rank's shard of unit `u` as it travels in the gathers.
    fn shard_of(&self, u: usize, with_frozen: bool) -> FsdpResult<Shard> {
        let unit = &self.units[u];
        let mut trained = vec![0f32; unit.layout.trained_shard];
        for (i, piece) in unit.pieces.iter().enumerate() {
            let values = self.vars[unit.first_piece + i].to_vec1::<f32>()?;
            trained[piece.in_shard.clone()].copy_from_slice(&values);
        }
        let frozen = (with_frozen && unit.layout.frozen_len > 0).then(|| {
            let source = match &self.published {
                Some(peers) => FrozenSource::Published(Arc::clone(peers), u),
                None => FrozenSource::Own(Arc::clone(&unit.frozen)),
            };
            (source, unit.frozen_dtype)
        });
        Ok(Shard { trained, frozen })
    }

    /// Puts unit `u`'s tensors, gathered from every rank, into the model.
    fn fill(
        &mut self,
        model: &mut CausalLm,
        u: usize,
        gathered: Gathered,
        with_frozen: bool,
    ) -> FsdpResult<()> {
        let unit = &self.units[u];
        let layout = &unit.layout;
        let device = &self.device;
        let trained = |entry: &Entry| -> FsdpResult<Tensor> {
            let values = &gathered.trained[entry.offset..entry.offset + entry.numel()];
            Ok(Tensor::from_slice(values, entry.shape.as_slice(), device)?)
        };
        let (flat, bytes) = match gathered.frozen {
            Some(values) => match values.into_tensor(device)? {
                Ok(flat) => (Some(flat), Vec::new()),
                Err(bytes) => (None, bytes),
            },
            None => (None, Vec::new()),
        };
        let frozen_bytes = |entry: &Entry| &bytes[entry.offset..entry.offset + entry.num_bytes()];
        let frozen = |entry: &Entry| -> FsdpResult<Tensor> {
            Ok(match &flat {
                Some(flat) => flat
                    .narrow(0, entry.offset / entry.dtype.size_in_bytes(), entry.numel())?
                    .reshape(entry.shape.as_slice())?,
                None => {
                    Tensor::from_raw_buffer(frozen_bytes(entry), entry.dtype, &entry.shape, device)?
                }
            })
        };
        let mut installed = vec![None; layout.entries.len()];
        let mut slot_layouts = unit.slots.iter();
        for &part in &unit.parts {
            for (name, mut slot) in slots_of(model, part) {
                match slot_layouts.next().expect("one layout per slot") {
                    SlotLayout::Tensor(index) => {
                        let entry = &layout.entries[*index];
                        debug_assert_eq!(entry.name, name);
                        if entry.trainable {
                            installed[*index] = slot.fill(trained(entry)?)?;
                        } else if with_frozen {
                            slot.fill(frozen(entry)?)?;
                        }
                    }
                    SlotLayout::Quantized {
                        format,
                        dims,
                        buffers,
                    } if with_frozen => {
                        let raw = buffers
                            .iter()
                            .map(|(buffer, index)| {
                                let entry = &layout.entries[*index];
                                let bytes = frozen_bytes(entry);
                                let raw = match entry.dtype {
                                    DType::U8 => RawBuffer::U8(bytes.to_vec()),
                                    _ => RawBuffer::F32(
                                        bytes
                                            .chunks_exact(4)
                                            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                                            .collect(),
                                    ),
                                };
                                (buffer.clone(), raw)
                            })
                            .collect();
                        slot.fill_quantized(QuantizedWeight::from_buffers(*format, *dims, raw)?);
                    }
                    SlotLayout::Quantized { .. } => {}
                }
            }
        }
        let full = if with_frozen {
            layout.full_bytes()
        } else {
            layout.trained_len * 4
        };
        self.gathered_bytes += full;
        self.accounting.peak_gathered_bytes =
            self.accounting.peak_gathered_bytes.max(self.gathered_bytes);
        self.units[u].installed = Some((installed, full));
        Ok(())
    }

    fn empty_slots(&mut self, model: &mut CausalLm, u: usize) -> FsdpResult<()> {
        for &part in &self.units[u].parts {
            for (_, mut slot) in slots_of(model, part) {
                slot.empty(&self.device)?;
            }
        }
        Ok(())
    }

    fn release(&mut self, model: &mut CausalLm, u: usize) -> FsdpResult<()> {
        if let Some((_, bytes)) = self.units[u].installed.take() {
            self.empty_slots(model, u)?;
            self.gathered_bytes -= bytes;
        }
        Ok(())
    }

    fn gather(&mut self, model: &mut CausalLm, u: usize) -> FsdpResult<()> {
        let started = Instant::now();
        let prefetched = if self.comm.pending_gather() == Some(u) {
            self.comm.finish_gather()?.map(|(_, gathered)| gathered)
        } else {
            None
        };
        let gathered = match prefetched {
            Some(gathered) => gathered,
            None => self.shard_of(u, true)?.gather(self.shard_group.as_ref())?,
        };
        self.accounting.comm_wait += started.elapsed();
        self.fill(model, u, gathered, true)
    }

    /// Starts gathering the first unit after event `k` that is not in the model yet.
    fn prefetch_after(&mut self, k: usize) -> FsdpResult<()> {
        if self.comm.pending_gather().is_some() {
            return Ok(());
        }
        let current = self.unit_of[&self.events[k].0];
        let next = self.events[k + 1..]
            .iter()
            .map(|(part, _)| self.unit_of[part])
            .find(|&v| v != current);
        if let Some(v) = next {
            if self.units[v].installed.is_none() {
                let shard = self.shard_of(v, true)?;
                self.comm.start_gather(v, shard)?;
            }
        }
        Ok(())
    }

    fn drain_prefetch(&mut self) -> FsdpResult<()> {
        self.comm.finish_gather()?;
        Ok(())
    }

    /// Adds the gradients `grads` holds for unit `u`'s trained tensors to the unit's sum. Any
    /// entry may have one: the head's backward reaches a tied embedding.
    fn add_unit_grads(&mut self, u: usize, grads: &GradStore) -> FsdpResult<()> {
        let world = self.shard_group.world_size();
        let unit = &mut self.units[u];
        let Some((installed, _)) = &unit.installed else {
            return Ok(());
        };
        let sum = unit
            .grad_sum
            .get_or_insert_with(|| vec![0f32; unit.layout.trained_shard * world]);
        for (i, entry) in unit.layout.entries.iter().enumerate() {
            if !entry.trainable {
                continue;
            }
            let Some(var) = &installed[i] else { continue };
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                for (acc, v) in sum[entry.offset..entry.offset + g.len()].iter_mut().zip(g) {
                    *acc += v;
                }
            }
        }
        Ok(())
    }

    /// Starts reduce-scattering unit `u`'s summed gradient; [`Self::add_reduced_grads`] adds
    /// this rank's shard of it to its pieces.
    fn reduce_grads(&mut self, u: usize) -> FsdpResult<()> {
        let world = self.shard_group.world_size();
        let unit = &mut self.units[u];
        if unit.layout.trained_len == 0 {
            return Ok(());
        }
        // Every rank joins the collective, with zeros when nothing reached the unit.
        let sum = unit
            .grad_sum
            .take()
            .unwrap_or_else(|| vec![0f32; unit.layout.trained_shard * world]);
        self.comm
            .start_reduce_scatter(u, sum, unit.layout.trained_shard)
    }

    /// Waits for the walk's reduce-scatters and adds each unit's shard to its pieces' gradients.
    fn add_reduced_grads(&mut self) -> FsdpResult<()> {
        let started = Instant::now();
        let reduced = self.comm.finish_reductions()?;
        self.accounting.comm_wait += started.elapsed();
        for (u, shard) in reduced {
            let unit = &self.units[u];
            for (i, piece) in unit.pieces.iter().enumerate() {
                let values = &shard[piece.in_shard.clone()];
                let g = Tensor::from_slice(values, values.len(), &self.device)?;
                let slot = &mut self.grads[unit.first_piece + i];
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        Ok(())
    }

    fn check_event(&self, part: Part, pass: Pass) -> FsdpResult<usize> {
        match self.events.get(self.cursor) {
            Some(&(p, q)) if p == part && q == pass => Ok(self.cursor),
            expected => Err(FsdpError::Config(format!(
                "the training walk used {part:?} ({pass:?}) where {expected:?} was due"
            ))),
        }
    }

    /// The next event after `k` that uses unit `u`, in the given pass if any.
    fn next_use(&self, k: usize, u: usize, pass: Option<Pass>) -> Option<usize> {
        self.events[k + 1..]
            .iter()
            .position(|(part, p)| self.unit_of[part] == u && pass.is_none_or(|q| q == *p))
            .map(|j| k + 1 + j)
    }
}

impl Residency for Sharded {
    fn backward_extent(&self) -> BackwardExtent {
        self.extent
    }

    fn begin(&mut self, walk: Walk) -> WalkResult<()> {
        let layers = (0..self.num_layers).map(|i| (Part::Layer(i), Pass::Forward));
        let mut events = vec![(Part::Embed, Pass::Forward)];
        events.extend(layers);
        match walk {
            Walk::Eval => events.push((Part::Head, Pass::Forward)),
            Walk::Train => {
                events.push((Part::Head, Pass::Backward));
                let lowest = if self.extent.embedding {
                    0
                } else {
                    self.extent.lowest_layer
                };
                events.extend(
                    (lowest..self.num_layers)
                        .rev()
                        .map(|i| (Part::Layer(i), Pass::Backward)),
                );
                if self.extent.embedding {
                    events.push((Part::Embed, Pass::Backward));
                }
            }
        }
        self.events = events;
        self.cursor = 0;
        Ok(())
    }

    fn enter(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> WalkResult<()> {
        let k = self.check_event(part, pass)?;
        let u = self.unit_of[&part];
        if self.units[u].installed.is_none() {
            self.gather(model, u)?;
        }
        let prefetch = match pass {
            Pass::Forward => self.forward_prefetch,
            Pass::Backward => self.backward_prefetch == BackwardPrefetch::BackwardPre,
        };
        if prefetch {
            self.prefetch_after(k)?;
        }
        Ok(())
    }

    fn add_grads(&mut self, part: Part, grads: &GradStore) -> WalkResult<()> {
        Ok(self.add_unit_grads(self.unit_of[&part], grads)?)
    }

    fn leave(&mut self, model: &mut CausalLm, part: Part, pass: Pass) -> WalkResult<()> {
        let k = self.check_event(part, pass)?;
        self.cursor += 1;
        let u = self.unit_of[&part];
        if pass == Pass::Backward {
            if self.backward_prefetch == BackwardPrefetch::BackwardPost {
                self.prefetch_after(k)?;
            }
            if self.next_use(k, u, Some(Pass::Backward)).is_none() {
                self.reduce_grads(u)?;
            }
        }
        let release = match self.next_use(k, u, None) {
            None => true,
            Some(j) => match self.strategy {
                ShardingStrategy::ShardGradOp => false,
                _ => j != k + 1,
            },
        };
        if release {
            self.release(model, u)?;
        }
        Ok(())
    }

    fn end(&mut self, model: &mut CausalLm) -> WalkResult<()> {
        self.drain_prefetch()?;
        self.add_reduced_grads()?;
        for u in 0..self.units.len() {
            self.units[u].grad_sum = None;
            self.release(model, u)?;
        }
        self.events.clear();
        self.cursor = 0;
        Ok(())
    }
}

/// The group a rank shards with, and for HYBRID_SHARD the group of its replicas on other
/// nodes (`local` ranks a node).
#[allow(clippy::type_complexity)]
fn shard_groups(
    strategy: ShardingStrategy,
    global: &dyn ProcessGroup,
    local: usize,
) -> FsdpResult<(Box<dyn ProcessGroup>, Option<Box<dyn ProcessGroup>>)> {
    Ok(if strategy == ShardingStrategy::HybridShard {
        let node = global.rank() / local;
        let local_rank = global.rank() % local;
        let nodes = global.world_size() / local;
        let intra: Vec<usize> = (node * local..(node + 1) * local).collect();
        let inter: Vec<usize> = (0..nodes).map(|n| n * local + local_rank).collect();
        (
            global.subgroup(&format!("fsdp-shard-node{node}"), &intra)?,
            Some(global.subgroup(&format!("fsdp-replicas-local{local_rank}"), &inter)?),
        )
    } else {
        let all: Vec<usize> = (0..global.world_size()).collect();
        (global.subgroup("fsdp-shard", &all)?, None)
    })
}

/// A tensor of a unit as its layout lists it: name, shape, dtype, whether it trains.
type EntryMeta = (String, Vec<usize>, DType, bool);

/// The entries and slot layouts of a unit of `parts`, adding to `trained_parts` each part with
/// a trained tensor.
fn describe_unit(
    model: &mut CausalLm,
    parts: &[Part],
    trained_parts: &mut Vec<Part>,
) -> FsdpResult<(Vec<EntryMeta>, Vec<SlotLayout>)> {
    let mut meta = Vec::new();
    let mut slot_layouts = Vec::new();
    for &part in parts {
        for (name, slot) in slots_of(model, part) {
            if let Some(q) = slot.quantized() {
                let mut buffers = Vec::new();
                for (buffer, raw) in q.buffers()? {
                    let (len, dtype) = match &raw {
                        RawBuffer::U8(v) => (v.len(), DType::U8),
                        RawBuffer::F32(v) => (v.len(), DType::F32),
                    };
                    buffers.push((buffer.to_string(), meta.len()));
                    meta.push((format!("{name}.{buffer}"), vec![len], dtype, false));
                }
                slot_layouts.push(SlotLayout::Quantized {
                    format: q.format(),
                    dims: q.dims(),
                    buffers,
                });
                continue;
            }
            slot_layouts.push(SlotLayout::Tensor(meta.len()));
            let t = slot.tensor();
            if slot.is_trainable() {
                trained_parts.push(part);
            }
            meta.push((name, t.dims().to_vec(), t.dtype(), slot.is_trainable()));
        }
    }
    Ok((meta, slot_layouts))
}

/// Hands the pages of what wrapping freed (the model's unsharded tensors, and the private
/// frozen shards once published) back to the system. An allocator that keeps freed memory for
/// reuse, as the `ferrofactory` binary asks glibc's to, would otherwise keep the whole model
/// resident on every rank.
fn return_freed_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only gives free pages of the heap back to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Unit `parts`' tensors from the model, as the bytes of its padded trained buffer (float32)
/// followed by its padded frozen buffer.
fn flatten_unit(
    model: &mut CausalLm,
    parts: &[Part],
    slot_layouts: &[SlotLayout],
    layout: &UnitLayout,
) -> FsdpResult<Vec<u8>> {
    let world = layout.world_size;
    let mut trained = vec![0f32; layout.trained_shard * world];
    let mut frozen = vec![0u8; layout.frozen_shard * world];
    let mut slot_layouts = slot_layouts.iter();
    for &part in parts {
        for (_, slot) in slots_of(model, part) {
            match slot_layouts.next().expect("one layout per slot") {
                SlotLayout::Tensor(index) => {
                    let entry = &layout.entries[*index];
                    let t = slot.tensor();
                    if entry.trainable {
                        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        trained[entry.offset..entry.offset + values.len()].copy_from_slice(&values);
                    } else {
                        let range: Range<usize> = entry.offset..entry.offset + entry.num_bytes();
                        frozen[range].copy_from_slice(&tensor_bytes(t)?);
                    }
                }
                SlotLayout::Quantized { buffers, .. } => {
                    let q = slot.quantized().ok_or_else(|| {
                        FsdpError::Config("a quantized weight changed kind while sharding".into())
                    })?;
                    for ((_, raw), (_, index)) in q.buffers()?.into_iter().zip(buffers) {
                        let entry = &layout.entries[*index];
                        let bytes: Vec<u8> = match raw {
                            RawBuffer::U8(v) => v,
                            RawBuffer::F32(v) => bytemuck::cast_slice(&v).to_vec(),
                        };
                        frozen[entry.offset..entry.offset + bytes.len()].copy_from_slice(&bytes);
                    }
                }
            }
        }
    }
    let mut out: Vec<u8> = bytemuck::cast_slice(&trained).to_vec();
    out.extend_from_slice(&frozen);
    Ok(out)
}

/// The raw little-endian bytes of a tensor's elements.
fn tensor_bytes(t: &Tensor) -> FsdpResult<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => bytemuck::cast_slice(&flat.to_vec1::<f32>()?).to_vec(),
        DType::F64 => bytemuck::cast_slice(&flat.to_vec1::<f64>()?).to_vec(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => bytemuck::cast_slice(&flat.to_vec1::<u32>()?).to_vec(),
        DType::I64 => bytemuck::cast_slice(&flat.to_vec1::<i64>()?).to_vec(),
        other => {
            return Err(FsdpError::Config(format!(
                "FSDP cannot shard {other:?} tensors"
            )))
        }
    })
}
