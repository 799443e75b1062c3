//! What a rank does in each scenario. A rank drives the engine as the training walk does
//! (begin, enter and leave each part in the walk's order, hand in gradients in backward, end),
//! checks what it sees exactly against the unsharded model it built itself, and reports
//! through its exit code and stderr, which the parent test asserts on. Gradients handed in are
//! small integers, so every sum over contributions and ranks is exact in any order.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use ff_config::{AutoWrapPolicy, BackwardPrefetch, FsdpConfig, ShardingStrategy};
use ff_dist::{init_from_env, ProcessGroup};
use ff_fsdp::plan::plan_units;
use ff_fsdp::{Sharded, ShardedSetup};
use ff_kernels::weight_grads::store_of;
use ff_model::CausalLm;
use ff_walk::{BackwardExtent, Part, Pass, Residency, Walk};

use crate::model::{
    all_bits, build, fnv, part_bits, snapshot, trained_slots, Bits, Kind, Outcome, Weights, LAYERS,
};
use crate::recording::{Call, Log, Op, Recording};

/// What a rank prints once every check of its scenario passed.
pub const CHECKED: &str = "every check of the scenario passed";

const LORA_SEED: u64 = 7;

/// Runs `scenario` and returns the process exit code.
pub fn run(scenario: &str) -> i32 {
    let result = init_from_env(Duration::from_secs(20))
        .map_err(Into::into)
        .and_then(|group| match scenario {
            "gather" => gather(group.as_ref()),
            "reduce_scatter" => reduce_scatter(group.as_ref()),
            "prefetch" => prefetch(group.as_ref()),
            "state_dict" => state_dict(group.as_ref()),
            other => Err(format!("unknown scenario {other}").into()),
        });
    match result {
        Ok(()) => {
            eprintln!("{CHECKED}");
            0
        }
        Err(error) => {
            eprintln!("WORKER FAILED: {error}");
            1
        }
    }
}

fn settings(
    strategy: ShardingStrategy,
    forward_prefetch: bool,
    backward_prefetch: BackwardPrefetch,
    sync_module_states: bool,
) -> FsdpConfig {
    FsdpConfig {
        sharding_strategy: strategy,
        forward_prefetch,
        backward_prefetch,
        sync_module_states,
        cpu_ram_efficient_loading: sync_module_states,
        ..FsdpConfig::default()
    }
}

/// Wraps `model` with one unit per decoder layer; `local_world_size` below the world keeps
/// frozen shards out of shared memory, so they travel through the group.
fn wrap(
    model: &mut CausalLm,
    config: &FsdpConfig,
    group: &dyn ProcessGroup,
    local_world_size: usize,
) -> Outcome<Sharded> {
    Ok(Sharded::wrap(
        model,
        ShardedSetup {
            config,
            group,
            local_world_size,
        },
    )?)
}

/// The parts a walk enters and leaves, in the order [`Walk`] documents (and ff-train's step
/// follows).
fn events(walk: Walk, extent: BackwardExtent) -> Vec<(Part, Pass)> {
    let mut events = vec![(Part::Embed, Pass::Forward)];
    events.extend((0..LAYERS).map(|i| (Part::Layer(i), Pass::Forward)));
    match walk {
        Walk::Eval => events.push((Part::Head, Pass::Forward)),
        Walk::Train => {
            events.push((Part::Head, Pass::Backward));
            let lowest = if extent.embedding {
                0
            } else {
                extent.lowest_layer
            };
            events.extend(
                (lowest..LAYERS)
                    .rev()
                    .map(|i| (Part::Layer(i), Pass::Backward)),
            );
            if extent.embedding {
                events.push((Part::Embed, Pass::Backward));
            }
        }
    }
    events
}

/// A part as the walk saw it: its tensors while entered, and after it was left.
#[derive(Debug, PartialEq)]
struct Visit {
    part: Part,
    pass: Pass,
    inside: Vec<(String, Bits)>,
    after: Vec<(String, Bits)>,
}

struct WalkRecord {
    visits: Vec<Visit>,
    /// Everything this rank handed in, summed by tensor.
    handed: HashMap<String, Vec<f32>>,
}

/// Runs one walk over the model, handing in gradients in backward.
fn walk(
    engine: &mut Sharded,
    model: &mut CausalLm,
    walk: Walk,
    rank: usize,
) -> Outcome<WalkRecord> {
    engine.begin(walk)?;
    let mut visits = Vec::new();
    let mut handed = HashMap::new();
    for (part, pass) in events(walk, engine.backward_extent()) {
        engine.enter(model, part, pass)?;
        let inside = part_bits(model, part)?;
        if pass == Pass::Backward {
            for store in backward_grads(model, part, rank, &mut handed)? {
                engine.add_grads(part, &store)?;
            }
        }
        engine.leave(model, part, pass)?;
        visits.push(Visit {
            part,
            pass,
            inside,
            after: part_bits(model, part)?,
        });
    }
    engine.end(model)?;
    Ok(WalkRecord { visits, handed })
}

/// Element `i` of the gradient rank `rank` hands in for `name`: rank + 1 times a small integer
/// of the tensor and element.
fn grad_value(rank: usize, name: &str, i: usize) -> f32 {
    ((rank as u64 + 1) * (fnv(name) % 1000 + 1 + (i % 13) as u64)) as f32
}

/// The stores `part`'s backward hands in: one over its trained tensors; the head gives two, as
/// it does for a loss in chunks, the second also reaching a tied embedding.
fn backward_grads(
    model: &mut CausalLm,
    part: Part,
    rank: usize,
    handed: &mut HashMap<String, Vec<f32>>,
) -> Outcome<Vec<GradStore>> {
    let mut tensors = trained_slots(model, part);
    let mut stores = vec![grads_of(&tensors, rank, handed)?];
    if part == Part::Head {
        if let (None, Some(table)) = (&model.lm_head, model.embed_tokens.var()) {
            tensors.push(("model.embed_tokens.weight".into(), table.clone()));
        }
        stores.push(grads_of(&tensors, rank, handed)?);
    }
    Ok(stores.into_iter().flatten().collect())
}

fn grads_of(
    tensors: &[(String, Var)],
    rank: usize,
    handed: &mut HashMap<String, Vec<f32>>,
) -> Outcome<Option<GradStore>> {
    let mut store: Option<GradStore> = None;
    for (name, var) in tensors {
        let values: Vec<f32> = (0..var.elem_count())
            .map(|i| grad_value(rank, name, i))
            .collect();
        let sum = handed
            .entry(name.clone())
            .or_insert_with(|| vec![0.0; values.len()]);
        sum.iter_mut().zip(&values).for_each(|(s, v)| *s += v);
        let grad = Tensor::from_vec(values, var.shape(), var.device())?;
        match &mut store {
            Some(store) => {
                store.insert(var.as_tensor(), grad);
            }
            None => store = Some(store_of(var.as_tensor(), grad)?),
        }
    }
    Ok(store)
}

/// `name[start:end]`, as [`Sharded::piece_labels`] writes a piece.
fn parse_label(label: &str) -> Outcome<(&str, Range<usize>)> {
    let bad = || format!("a piece label `{label}` is not name[start:end]");
    let (name, rest) = label.split_once('[').ok_or_else(bad)?;
    let (start, end) = rest
        .strip_suffix(']')
        .and_then(|r| r.split_once(':'))
        .ok_or_else(bad)?;
    Ok((name, start.parse()?..end.parse()?))
}

fn first_difference(got: &[f32], want: &[f32]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, expected {}", got.len(), want.len()));
    }
    got.iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
        .map(|i| format!("value {i} is {}, expected {}", got[i], want[i]))
}

/// Every tensor in `seen` equals the unsharded model's, bit for bit.
fn expect_unsharded(
    what: &str,
    seen: &[(String, Bits)],
    reference: &HashMap<String, Bits>,
) -> Outcome {
    for (name, bits) in seen {
        let want = reference
            .get(name)
            .ok_or_else(|| format!("{what}: `{name}` is no tensor of the model"))?;
        if bits != want {
            let detail = if (bits.dtype, &bits.shape) != (want.dtype, &want.shape) {
                format!(
                    "{:?} {:?}, expected {:?} {:?}",
                    bits.dtype, bits.shape, want.dtype, want.shape
                )
            } else if bits.dtype == DType::F32 {
                first_difference(&bits.f32s(), &want.f32s())
                    .unwrap_or_else(|| "its bits differ".into())
            } else {
                let byte = bits.bytes.iter().zip(&want.bytes).position(|(g, w)| g != w);
                format!("byte {byte:?} differs")
            };
            return Err(
                format!("{what}: `{name}` differs from the unsharded model's: {detail}").into(),
            );
        }
    }
    Ok(())
}

fn expect_empty(what: &str, seen: &[(String, Bits)]) -> Outcome {
    match seen.iter().find(|(_, bits)| !bits.is_empty()) {
        None => Ok(()),
        Some((name, bits)) => Err(format!("{what}: `{name}` still holds {:?}", bits.shape).into()),
    }
}

/// Each unit's trained elements, unsharded.
fn trained_unit_sizes(model: &mut CausalLm) -> Outcome<Vec<usize>> {
    let units = plan_units(&model.config, AutoWrapPolicy::TransformerBased, &[], 0)?;
    Ok(units
        .into_iter()
        .map(|parts| {
            parts
                .into_iter()
                .flat_map(|part| trained_slots(model, part))
                .map(|(_, var)| var.elem_count())
                .sum()
        })
        .collect())
}

/// Gathering: while a part is entered its slots hold exactly the unsharded model's tensors on
/// every rank; FULL_SHARD empties them when the part is left, SHARD_GRAD_OP keeps a unit until
/// the walk has no more use for it; the walk's end empties everything.
fn gather(group: &dyn ProcessGroup) -> Outcome {
    let (rank, world) = (group.rank(), group.world_size());
    // Trained tensors only (one with a tied head); a frozen bf16 base from shared memory, and
    // with rank 0's values sent to ranks that built zeros; the base through the group.
    let cases = [
        (Kind::Full, world, false),
        (Kind::FullTied, world, false),
        (Kind::Lora, world, true),
        (Kind::Lora, 1, false),
    ];
    for (kind, local_world_size, sync) in cases {
        let case = format!("{kind:?} (local world {local_world_size}, sync {sync})");
        let mut unsharded = build(kind, Weights::Waves, LORA_SEED)?;
        let reference = snapshot(&mut unsharded)?;
        let sizes = trained_unit_sizes(&mut unsharded)?;
        let units = plan_units(&unsharded.config, AutoWrapPolicy::TransformerBased, &[], 0)?;
        let unit_of_part = |part: Part| units.iter().position(|parts| parts.contains(&part));
        if kind == Kind::Full && sizes.iter().any(|trained| trained % world == 0) {
            return Err(
                format!("{case}: a unit's {sizes:?} needs no padding on {world} ranks").into(),
            );
        }
        let weights = if sync && rank > 0 {
            Weights::Zeros
        } else {
            Weights::Waves
        };
        let built = build(kind, weights, LORA_SEED)?;
        for strategy in [ShardingStrategy::FullShard, ShardingStrategy::ShardGradOp] {
            let case = format!("{case} {strategy:?}");
            let config = settings(strategy, false, BackwardPrefetch::NoPrefetch, sync);
            // Wrapping replaces the slots' tensors, so each engine gets its own copy.
            let mut model = built.clone();
            let mut engine = wrap(&mut model, &config, group, local_world_size)?;
            expect_empty(&format!("{case}: after wrapping"), &all_bits(&mut model)?)?;
            for kind_of_walk in [Walk::Eval, Walk::Train] {
                let record = walk(&mut engine, &mut model, kind_of_walk, rank)?;
                for (k, visit) in record.visits.iter().enumerate() {
                    let what = format!("{case} {kind_of_walk:?} {:?} {:?}", visit.part, visit.pass);
                    expect_unsharded(&format!("{what}, entered"), &visit.inside, &reference)?;
                    let used_again = record.visits[k + 1..]
                        .iter()
                        .any(|later| unit_of_part(later.part) == unit_of_part(visit.part));
                    let kept = strategy == ShardingStrategy::ShardGradOp && used_again;
                    if kept {
                        expect_unsharded(&format!("{what}, left"), &visit.after, &reference)?;
                    } else {
                        expect_empty(&format!("{what}, left"), &visit.after)?;
                    }
                }
                expect_empty(
                    &format!("{case} {kind_of_walk:?}: after the walk"),
                    &all_bits(&mut model)?,
                )?;
            }
        }
    }
    Ok(())
}

/// Reduce-scattering: after a training walk each rank's pieces hold its shard of the gradients
/// every rank handed in, summed over ranks (and over the stores a part handed in).
fn reduce_scatter(group: &dyn ProcessGroup) -> Outcome {
    let (rank, world) = (group.rank(), group.world_size());
    // FULL_SHARD over every rank; HYBRID_SHARD with one rank per node, where each rank holds
    // whole tensors and `finish_grads` sums them over the other nodes' replicas.
    let strategies = [
        (ShardingStrategy::FullShard, world),
        (ShardingStrategy::HybridShard, 1),
    ];
    for (strategy, local_world_size) in strategies {
        for kind in [Kind::Full, Kind::FullTied, Kind::Lora] {
            let mut model = build(kind, Weights::Waves, LORA_SEED)?;
            let reference = snapshot(&mut model)?;
            let config = settings(strategy, false, BackwardPrefetch::NoPrefetch, false);
            let mut engine = wrap(&mut model, &config, group, local_world_size)?;
            for step in 0..2 {
                let what = format!("{strategy:?} {kind:?} step {step}");
                let record = walk(&mut engine, &mut model, Walk::Train, rank)?;
                engine.finish_grads()?;
                for visit in &record.visits {
                    expect_unsharded(&what, &visit.inside, &reference)?;
                }
                expect_reduced(&what, &engine, &record.handed, rank, world)?;
                engine.zero_grads();
            }
        }
    }
    Ok(())
}

/// Each piece's gradient is its elements of what every rank handed in, summed: rank r handed
/// (r + 1) times what rank 0 did.
fn expect_reduced(
    what: &str,
    engine: &Sharded,
    handed: &HashMap<String, Vec<f32>>,
    rank: usize,
    world: usize,
) -> Outcome {
    let ranks = (world * (world + 1) / 2) as f32;
    let labels = engine.piece_labels();
    if labels.is_empty() {
        return Err(format!("{what}: this rank holds no piece").into());
    }
    for (label, grad) in labels.iter().zip(&engine.grads) {
        let (name, range) = parse_label(label)?;
        let mine = handed
            .get(name)
            .ok_or_else(|| format!("{what}: no gradient was handed in for `{name}`"))?;
        let want: Vec<f32> = mine[range]
            .iter()
            .map(|v| v / (rank + 1) as f32 * ranks)
            .collect();
        let got = grad
            .as_ref()
            .ok_or_else(|| format!("{what}: `{label}` has no gradient"))?
            .to_vec1::<f32>()?;
        if let Some(difference) = first_difference(&got, &want) {
            return Err(format!("{what}: the gradient of `{label}`: {difference}").into());
        }
    }
    Ok(())
}

/// Which unit a collective's data belongs to: the one whose first trained tensor it starts with.
fn unit_of(data: &[f32], firsts: &[Vec<f32>]) -> Option<usize> {
    firsts
        .iter()
        .position(|first| data.len() >= first.len() && data[..first.len()] == first[..])
}

/// Prefetching: with forward prefetch and either backward prefetch, a training walk sees the
/// same tensors and ends with the same gradients as without; the engine gathers the units in
/// the walk's order, prefetched ones on its communication thread, and reduce-scatters each
/// unit once, on that thread, as its backward ends.
fn prefetch(group: &dyn ProcessGroup) -> Outcome {
    let rank = group.rank();
    let mut unsharded = build(Kind::Full, Weights::Waves, LORA_SEED)?;
    let reference = snapshot(&mut unsharded)?;
    let units = plan_units(&unsharded.config, AutoWrapPolicy::TransformerBased, &[], 0)?;
    let first_trained: Vec<String> = units
        .iter()
        .map(|parts| trained_slots(&mut unsharded, parts[0])[0].0.clone())
        .collect();
    let unit_of_part = |part: Part| units.iter().position(|parts| parts.contains(&part));
    // The units a FULL_SHARD training walk gathers: each run of parts of one unit.
    let mut expected_gathers: Vec<usize> = Vec::new();
    // Everything trains: backward goes down to the embedding.
    let extent = BackwardExtent {
        lowest_layer: 0,
        embedding: true,
    };
    for (part, _) in events(Walk::Train, extent) {
        let u = unit_of_part(part).ok_or("a part in no unit")?;
        if expected_gathers.last() != Some(&u) {
            expected_gathers.push(u);
        }
    }
    // Each unit once, as its backward ends: the layers from the last, then the root.
    let expected_reductions: Vec<usize> = (0..LAYERS)
        .rev()
        .map(Part::Layer)
        .chain([Part::Embed])
        .map(|part| unit_of_part(part).ok_or("a part in no unit"))
        .collect::<Result<_, _>>()?;
    // Which group issued each gather: S the engine's (on the walk's thread), C its
    // communication thread's (prefetched).
    let settings_and_issuers = [
        (false, BackwardPrefetch::NoPrefetch, "SSSSSSSSS"),
        (true, BackwardPrefetch::BackwardPre, "SCCCCCCCC"),
        (false, BackwardPrefetch::BackwardPre, "SSSSSCCCC"),
        (false, BackwardPrefetch::BackwardPost, "SSSSSCCCC"),
        (true, BackwardPrefetch::BackwardPost, "SCCCCCCCC"),
        (true, BackwardPrefetch::NoPrefetch, "SCCCCSSSS"),
    ];
    let mut baseline: Option<(Vec<Visit>, Vec<Vec<f32>>)> = None;
    for (forward, backward, issuers) in settings_and_issuers {
        let case = format!("forward prefetch {forward}, {backward:?}");
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let recorded = Recording::new(
            group.subgroup("job", &all_ranks(group))?,
            "job",
            log.clone(),
        );
        let mut model = build(Kind::Full, Weights::Waves, LORA_SEED)?;
        let config = settings(ShardingStrategy::FullShard, forward, backward, false);
        let mut engine = wrap(&mut model, &config, &recorded, group.world_size())?;
        for step in 0..2 {
            let what = format!("{case}, step {step}");
            log.lock().map_err(|_| "the log's lock")?.clear();
            let record = walk(&mut engine, &mut model, Walk::Train, rank)?;
            engine.finish_grads()?;
            let calls: Vec<Call> = std::mem::take(&mut *log.lock().map_err(|_| "the log's lock")?);
            let handed_firsts: Vec<Vec<f32>> = first_trained
                .iter()
                .map(|name| record.handed.get(name).cloned().unwrap_or_default())
                .collect();
            let firsts: Vec<Vec<f32>> = first_trained
                .iter()
                .map(|name| reference[name].f32s())
                .collect();
            let mut gathers = Vec::new();
            let mut reductions = Vec::new();
            for call in &calls {
                let issuer = match call.group.as_str() {
                    "fsdp-shard" => 'S',
                    "fsdp-comm" => 'C',
                    other => return Err(format!("{what}: a collective on group `{other}`").into()),
                };
                match &call.op {
                    Op::AllGather(data) => gathers.push((
                        unit_of(data, &firsts)
                            .ok_or_else(|| format!("{what}: a gather of no unit"))?,
                        issuer,
                    )),
                    Op::ReduceScatter(data) => reductions.push((
                        unit_of(data, &handed_firsts)
                            .ok_or_else(|| format!("{what}: a reduce-scatter of no unit"))?,
                        issuer,
                    )),
                    Op::Other(op) => return Err(format!("{what}: an unexpected {op}").into()),
                }
            }
            let gathered: Vec<usize> = gathers.iter().map(|(u, _)| *u).collect();
            if gathered != expected_gathers {
                return Err(format!(
                    "{what}: units gathered in the order {gathered:?}, the walk's is {expected_gathers:?}"
                )
                .into());
            }
            let issued: String = gathers.iter().map(|(_, i)| *i).collect();
            if issued != issuers {
                return Err(
                    format!("{what}: gathers issued by {issued}, expected {issuers}").into(),
                );
            }
            let reduced: Vec<usize> = reductions.iter().map(|(u, _)| *u).collect();
            if reduced != expected_reductions || reductions.iter().any(|(_, i)| *i != 'C') {
                return Err(format!(
                    "{what}: reduce-scatters {reductions:?}, expected units {expected_reductions:?} on the communication thread"
                )
                .into());
            }
            for visit in &record.visits {
                expect_unsharded(&what, &visit.inside, &reference)?;
            }
            expect_reduced(&what, &engine, &record.handed, rank, group.world_size())?;
            let grads = engine
                .grads
                .iter()
                .map(|g| {
                    Ok(g.as_ref()
                        .ok_or("a piece without gradient")?
                        .to_vec1::<f32>()?)
                })
                .collect::<Outcome<Vec<Vec<f32>>>>()?;
            match &baseline {
                None => baseline = Some((record.visits, grads)),
                Some((visits, base_grads)) => {
                    if &record.visits != visits {
                        return Err(format!(
                            "{what}: the walk saw other tensors than without prefetch"
                        )
                        .into());
                    }
                    if &grads != base_grads {
                        return Err(format!("{what}: other gradients than without prefetch").into());
                    }
                }
            }
            engine.zero_grads();
        }
    }
    Ok(())
}

fn all_ranks(group: &dyn ProcessGroup) -> Vec<usize> {
    (0..group.world_size()).collect()
}

/// What a step moves element `i` of trained tensor `name` by, in the state-dict scenario.
fn delta(name: &str, i: usize) -> f32 {
    ((fnv(name) % 7 + (i % 5) as u64 + 1) as f32) * 0.25
}

/// The state dicts: FULL_STATE_DICT gathers every tensor into the model (on every rank, rank
/// 0 included) as the shards hold them; SHARDED_STATE_DICT is each rank's pieces with their
/// labels, which loaded into an engine over a model built otherwise give the same shards and
/// the same whole model.
fn state_dict(group: &dyn ProcessGroup) -> Outcome {
    let world = group.world_size();
    for kind in [Kind::Full, Kind::Lora] {
        let mut model = build(kind, Weights::Waves, LORA_SEED)?;
        let reference = snapshot(&mut model)?;
        let config = settings(
            ShardingStrategy::FullShard,
            false,
            BackwardPrefetch::NoPrefetch,
            false,
        );
        let mut engine = wrap(&mut model, &config, group, world)?;
        engine.materialize(&mut model, true)?;
        expect_unsharded(
            &format!("{kind:?} full state"),
            &all_bits(&mut model)?,
            &reference,
        )?;
        engine.end(&mut model)?;
        expect_empty(&format!("{kind:?} after saving"), &all_bits(&mut model)?)?;

        // Move every piece as a step would, by known amounts.
        let labels = engine.piece_labels();
        for (label, var) in labels.iter().zip(&engine.vars) {
            let (name, range) = parse_label(label)?;
            let moved: Vec<f32> = var
                .to_vec1::<f32>()?
                .iter()
                .zip(range)
                .map(|(v, i)| v + delta(name, i))
                .collect();
            var.set(&Tensor::from_vec(moved, var.shape(), var.device())?)?;
        }
        let mut moved = reference.clone();
        let trained = engine.trained_shapes();
        for (name, _) in &trained {
            let bits = moved
                .get_mut(name)
                .ok_or_else(|| format!("`{name}` is no tensor of the model"))?;
            if bits.dtype != DType::F32 {
                return Err(format!("trained `{name}` is {:?}", bits.dtype).into());
            }
            bits.bytes = bits
                .f32s()
                .iter()
                .enumerate()
                .flat_map(|(i, v)| (v + delta(name, i)).to_le_bytes())
                .collect();
        }
        engine.materialize(&mut model, false)?;
        for (name, bits) in all_bits(&mut model)? {
            let what = format!("{kind:?} trained state after a step");
            if trained.iter().any(|(n, _)| *n == name) {
                expect_unsharded(&what, &[(name, bits)], &moved)?;
            } else {
                expect_empty(&what, &[(name, bits)])?;
            }
        }
        engine.end(&mut model)?;

        // Whole tensors from the pieces and back.
        let pieces = engine
            .vars
            .iter()
            .map(|v| v.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let whole = engine.gather_values(&pieces)?;
        let names: Vec<&String> = whole.iter().map(|(n, _)| n).collect();
        let trained_names: Vec<&String> = trained.iter().map(|(n, _)| n).collect();
        if names != trained_names {
            return Err(format!("{kind:?}: gathered {names:?}, trained {trained_names:?}").into());
        }
        for (name, values) in &whole {
            if let Some(difference) = first_difference(values, &moved[name].f32s()) {
                return Err(format!("{kind:?}: gathered `{name}`: {difference}").into());
            }
        }
        let scattered = engine.scatter_values(&whole.into_iter().collect())?;
        if scattered != pieces {
            return Err(format!("{kind:?}: scattering the whole tensors gave other pieces").into());
        }

        // This rank's sharded state, loaded by an engine over a model with other trained values
        // (the frozen base is the model's own, not part of the sharded state).
        let weights = match kind {
            Kind::Lora => Weights::Waves,
            Kind::Full | Kind::FullTied => Weights::Zeros,
        };
        let mut fresh = build(kind, weights, LORA_SEED + 1)?;
        let mut loaded = wrap(&mut fresh, &config, group, world)?;
        if loaded.piece_labels() != labels {
            return Err(
                format!("{kind:?}: the fresh engine's pieces are labelled otherwise").into(),
            );
        }
        for (var, values) in loaded.vars.iter().zip(&pieces) {
            var.set(&Tensor::from_vec(
                values.clone(),
                var.shape(),
                var.device(),
            )?)?;
        }
        loaded.materialize(&mut fresh, true)?;
        expect_unsharded(
            &format!("{kind:?} loaded sharded state"),
            &all_bits(&mut fresh)?,
            &moved,
        )?;
        loaded.end(&mut fresh)?;
        let reloaded = loaded
            .vars
            .iter()
            .map(|v| v.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        if reloaded != pieces {
            return Err(format!("{kind:?}: the loaded shards differ from the saved ones").into());
        }
    }
    Ok(())
}
