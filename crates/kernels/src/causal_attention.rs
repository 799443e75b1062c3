//! Attention's core (scores, mask, softmax, weighted sum) as one op with its own backward, that
//! multiplies only the keys a causal mask lets each block of queries see.
//!
//! Built from candle's ops (a batched product, a fused masked softmax, a second product and the
//! transposing copies around them) the core ran far below the products' speed: every product
//! covered the whole square that the mask then zeroes, and every head's small product paid the
//! batched product's setup. Here each head is one task on rayon's pool, its products
//! go to `gemm` directly over strided views, and a block of queries multiplies the keys up to
//! its last unmasked one only.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cast::{to_dtype, to_f32};
use crate::fast_exp::exp_shifted;
use crate::lanes;
use crate::strided::{product, Operand, Threads};
use crate::values::{contiguous, cpu_values, kept_values};

/// Queries whose scores are computed together: small enough that the keys a block needs are
/// close to the causal triangle, large enough for the products to run at speed.
const QUERY_BLOCK: usize = 64;

/// `q` is `[batch, heads, seq, head_dim]`, `k` is `[batch, kv_heads, seq, head_dim]` (any
/// strides; query head `h` uses key-value head `h / (heads / kv_heads)`), `v` the same or
/// `[batch, seq, kv_heads · head_dim]` as its projection leaves it, `mask` the additive float32
/// `[batch, 1, 1, seq, seq]` (0 where a query may attend, float32's lowest value elsewhere).
/// Returns `softmax(q kᵀ / √head_dim + mask) v` as `[batch, seq, heads · head_dim]` (positions
/// before heads, as the output projection reads them) in `q`'s dtype, computed in float32.
/// Taking and giving the projections' shapes keeps reshapes out of the graph, each of which
/// would cost a zeroed buffer and an add in backward. `None` off the CPU, where the op has no
/// kernel.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
) -> Result<Option<Tensor>> {
    attention_op(q, k, v, mask, None)
}

/// What an earlier pass of [`causal_attention`] read and gave: its rotated queries and keys,
/// its values and its result, in the shapes it takes and gives.
#[derive(Clone, Debug)]
pub struct AttentionValues {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub out: Tensor,
}

/// [`causal_attention`] for a recomputation that needs only the graph: it hands on `kept.out`,
/// and its backward reads the kept queries, keys and values instead of `q`, `k` and `v`, whose
/// values may be anything of their shapes (the projections need not run again).
pub fn causal_attention_replayed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    kept: &AttentionValues,
) -> Result<Option<Tensor>> {
    let shapes_match = [(q, &kept.q), (k, &kept.k), (v, &kept.v)]
        .iter()
        .all(|(input, kept)| input.shape() == kept.shape());
    if !shapes_match {
        return Err(Error::Msg(format!(
            "kept attention values {:?}, {:?}, {:?} do not fit the inputs {:?}, {:?}, {:?}",
            kept.q.shape(),
            kept.k.shape(),
            kept.v.shape(),
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    attention_op(q, k, v, mask, Some(kept))
}

fn attention_op(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    kept: Option<&AttentionValues>,
) -> Result<Option<Tensor>> {
    if !q.device().is_cpu() {
        return Ok(None);
    }
    let (batch, heads, seq, head_dim) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let kv_shape = Shape::from((batch, kv_heads, seq, head_dim));
    let v_fits = v.shape() == &kv_shape || v.dims() == [batch, seq, kv_heads * head_dim];
    if k.shape() != &kv_shape || !v_fits || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Msg(format!(
            "attention of queries {:?} over keys {:?} and values {:?}",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    if mask.elem_count() != batch * seq * seq {
        return Err(Error::Msg(format!(
            "attention mask {:?} does not fit {batch} sequences of {seq} positions",
            mask.shape()
        )));
    }
    // Rows of positions are read in place only when contiguous.
    let values = |v: &Tensor| match v.rank() {
        3 => to_f32(v)?.contiguous(),
        _ => to_f32(v),
    };
    let kept = match kept {
        Some(kept) => Some(AttentionValues {
            q: to_f32(&kept.q)?,
            k: to_f32(&kept.k)?,
            v: values(&kept.v)?,
            out: kept.out.clone(),
        }),
        None => None,
    };
    let op = CausalAttention {
        mask: mask.to_dtype(DType::F32)?.contiguous()?,
        kept,
    };
    let out = to_f32(q)?.apply_op3_arc(&to_f32(k)?, &values(v)?, Arc::new(Box::new(op)))?;
    Ok(Some(to_dtype(&out, q.dtype())?))
}

/// The backward recomputes a block's probabilities instead of keeping `[batch, heads, seq,
/// seq]` of them from the forward: one more product of the six, and the largest tensor of a
/// layer's graph gone.
struct CausalAttention {
    mask: Tensor,
    /// A replay's values (float32), which the forward hands on and the backward reads.
    kept: Option<AttentionValues>,
}

/// A float32 `[batch, heads, seq, head_dim]` tensor's values and strides.
#[derive(Clone, Copy)]
struct Heads<'a> {
    values: &'a [f32],
    start: usize,
    strides: [usize; 4],
}

impl<'a> Heads<'a> {
    /// `layout` is `[batch, heads, seq, head_dim]` with any strides, or a contiguous `[batch,
    /// seq, heads · head_dim]` (heads side by side in each position's row).
    fn new(values: &'a [f32], layout: &Layout, head_dim: usize) -> Self {
        let strides = match (layout.dims(), layout.stride()) {
            (&[_, seq, width], _) => [seq * width, head_dim, width, 1],
            (_, strides) => [strides[0], strides[1], strides[2], strides[3]],
        };
        Self {
            values,
            start: layout.start_offset(),
            strides,
        }
    }

    /// Head `head` of example `b` from position `pos` on, as a `positions × head_dim` matrix.
    fn from(&self, b: usize, head: usize, pos: usize) -> Operand {
        let offset = self.start + b * self.strides[0] + head * self.strides[1];
        Operand {
            ptr: self.values[offset + pos * self.strides[2]..].as_ptr(),
            row_stride: self.strides[2] as isize,
            col_stride: self.strides[3] as isize,
        }
    }
}

/// The shape both passes work on.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
}

impl Dims {
    fn of(q: &Layout, k: &Layout) -> Result<Self> {
        let (batch, heads, seq, head_dim) = q.shape().dims4()?;
        Ok(Self {
            batch,
            heads,
            kv_heads: k.shape().dims4()?.1,
            seq,
            head_dim,
        })
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Offset of (example `b`, position `pos`, head `head`) in the `[batch, seq, heads,
    /// head_dim]` output.
    fn out_offset(&self, b: usize, pos: usize, head: usize) -> usize {
        ((b * self.seq + pos) * self.heads + head) * self.head_dim
    }
}

/// Per query row (`[batch, seq]`), one past the last key the mask lets it see; a row that may
/// see none gets every key, where the mask makes its softmax uniform as candle's softmax would.
fn key_limits(mask: &[f32], dims: &Dims) -> Vec<usize> {
    mask.chunks(dims.seq)
        .map(|row| {
            row.iter()
                .rposition(|&m| m > f32::MIN)
                .map_or(dims.seq, |last| last + 1)
        })
        .collect()
}

/// `(first row, end row, keys)` of each block of queries of one example: the block multiplies
/// keys `0..keys`.
fn query_blocks(limits: &[usize]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    (0..limits.len()).step_by(QUERY_BLOCK).map(|r0| {
        let r1 = (r0 + QUERY_BLOCK).min(limits.len());
        let keys = limits[r0..r1].iter().copied().max().unwrap_or(0);
        (r0, r1, keys)
    })
}

/// The output buffer, written by many tasks at once: each writes its own head's columns.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements (one head each) and the buffer outlives them.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The element `offset` places in (a method, so closures capture the whole wrapper).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(q_layout, k_layout)?;
        let out_shape = Shape::from((dims.batch, dims.seq, dims.heads * dims.head_dim));
        if let Some(kept) = &self.kept {
            let out = kept_values(&kept.out, out_shape.elem_count())?;
            return Ok((CpuStorage::F32(out), out_shape));
        }
        let q = Heads::new(q.as_slice()?, q_layout, dims.head_dim);
        let k = Heads::new(k.as_slice()?, k_layout, dims.head_dim);
        let v = Heads::new(v.as_slice()?, v_layout, dims.head_dim);
        let (mask_storage, _) = self.mask.storage_and_layout();
        let mask = contiguous(cpu_values(&mask_storage)?, self.mask.layout())?;
        let Dims {
            batch,
            heads,
            seq,
            head_dim,
            ..
        } = dims;
        let limits = key_limits(mask, &dims);
        let mut out = vec![0f32; batch * seq * heads * head_dim];
        let shared = SharedOut(out.as_mut_ptr());
        (0..batch * heads).into_par_iter().for_each(|task| {
            let (b, h) = (task / heads, task % heads);
            let g = h / dims.group();
            let scores = Scores {
                dims: &dims,
                limits: &limits[b * seq..(b + 1) * seq],
                mask: &mask[b * seq * seq..(b + 1) * seq * seq],
                q: q.from(b, h, 0),
                k: k.from(b, g, 0),
            };
            let mut p = vec![0f32; QUERY_BLOCK * seq];
            for (r0, r1, keys) in query_blocks(scores.limits) {
                scores.probabilities(&mut p, r0, r1, keys);
                // SAFETY: p holds the block's rows, v is read through its strides, and this
                // task alone writes head h's columns of the output.
                unsafe {
                    // out[rows] = p[rows, ..keys] · v[..keys]
                    product(
                        (r1 - r0, head_dim, keys),
                        shared.at(dims.out_offset(b, r0, h)),
                        heads * head_dim,
                        false,
                        Operand::rows(&p, seq),
                        v.from(b, g, 0),
                        1.0,
                        Threads::Caller,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), out_shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad_out = grad_out.to_dtype(DType::F32)?.contiguous()?;
        let (q, k, v) = match &self.kept {
            Some(kept) => (&kept.q, &kept.k, &kept.v),
            None => (q, k, v),
        };
        let (q_storage, q_layout) = q.storage_and_layout();
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        let (go_storage, _) = grad_out.storage_and_layout();
        let (mask_storage, _) = self.mask.storage_and_layout();
        let dims = Dims::of(q_layout, k_layout)?;
        let (dq, dk, dv) = backward(
            &dims,
            contiguous(cpu_values(&mask_storage)?, self.mask.layout())?,
            contiguous(cpu_values(&go_storage)?, grad_out.layout())?,
            Heads::new(cpu_values(&q_storage)?, q_layout, dims.head_dim),
            Heads::new(cpu_values(&k_storage)?, k_layout, dims.head_dim),
            Heads::new(cpu_values(&v_storage)?, v_layout, dims.head_dim),
        );
        // dv comes as `[batch, kv_heads, seq, head_dim]`; v as rows of positions wants its
        // gradient in the same rows.
        let dv = match v.rank() {
            3 => positions_before_heads(&dv, &dims),
            _ => dv,
        };
        let device = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), device)?),
            Some(Tensor::from_vec(dk, k.shape(), device)?),
            Some(Tensor::from_vec(dv, v.shape(), device)?),
        ))
    }
}

/// `[batch, kv_heads, seq, head_dim]` values reordered as `[batch, seq, kv_heads, head_dim]`.
fn positions_before_heads(values: &[f32], dims: &Dims) -> Vec<f32> {
    let Dims {
        kv_heads,
        seq,
        head_dim,
        ..
    } = *dims;
    let mut out = vec![0f32; values.len()];
    out.par_chunks_mut(head_dim)
        .enumerate()
        .for_each(|(row, dst)| {
            // Output row (b, pos, g) reads input row (b, g, pos).
            let (b, pos, g) = (
                row / (seq * kv_heads),
                (row / kv_heads) % seq,
                row % kv_heads,
            );
            let src = ((b * kv_heads + g) * seq + pos) * head_dim;
            dst.copy_from_slice(&values[src..src + head_dim]);
        });
    out
}

/// `row[..limit] = softmax(scale · scores + mask)` in place, `row[limit..] = 0`.
fn softmax_row(row: &mut [f32], limit: usize, mask: &[f32], scale: f32) {
    let (live, dead) = row.split_at_mut(limit);
    for (s, &m) in live.iter_mut().zip(mask) {
        *s = *s * scale + m;
    }
    exp_shifted(live, lanes::max(live));
    let inv = 1.0 / lanes::sum(live);
    live.iter_mut().for_each(|s| *s *= inv);
    dead.fill(0.0);
}

/// One head's scores against its key-value head, for one example.
struct Scores<'a> {
    dims: &'a Dims,
    /// Per query row, one past the last key it may see.
    limits: &'a [usize],
    /// The example's additive `[seq, seq]` mask.
    mask: &'a [f32],
    /// The head's queries and keys from position 0.
    q: Operand,
    k: Operand,
}

impl Scores<'_> {
    /// Rows `r0..r1` of the probabilities into `p` (rows `seq` apart, keys `0..keys`).
    fn probabilities(&self, p: &mut [f32], r0: usize, r1: usize, keys: usize) {
        let seq = self.dims.seq;
        let q = Operand {
            ptr: self.q.ptr.wrapping_offset(r0 as isize * self.q.row_stride),
            ..self.q
        };
        // SAFETY: rows r0..r1 of q and keys 0..keys of k lie inside their tensors, and p holds
        // r1 - r0 rows of seq values.
        unsafe {
            // scores[rows, ..keys] = q[rows] · k[..keys]ᵀ
            product(
                (r1 - r0, keys, self.dims.head_dim),
                p.as_mut_ptr(),
                seq,
                false,
                q,
                self.k.t(),
                1.0,
                Threads::Caller,
            );
        }
        for (i, row) in (r0..r1).zip(p.chunks_mut(seq)) {
            softmax_row(
                &mut row[..keys],
                self.limits[i],
                &self.mask[i * seq..],
                self.dims.scale(),
            );
        }
    }
}

/// Gradients of q, k and v (contiguous, in their shapes) from the output's gradient `go`
/// (`[batch, seq, heads, head_dim]`). One task per key-value head of an example, which sums the
/// key and value gradients of the query heads sharing it.
fn backward(
    dims: &Dims,
    mask: &[f32],
    go: &[f32],
    q: Heads,
    k: Heads,
    v: Heads,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let Dims {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
    } = *dims;
    let group = dims.group();
    let scale = dims.scale();
    let limits = key_limits(mask, dims);
    let mut dq = vec![0f32; batch * heads * seq * head_dim];
    let mut dk = vec![0f32; batch * kv_heads * seq * head_dim];
    let mut dv = vec![0f32; batch * kv_heads * seq * head_dim];
    let head_values = seq * head_dim;
    dq.par_chunks_mut(group * head_values)
        .zip(dk.par_chunks_mut(head_values))
        .zip(dv.par_chunks_mut(head_values))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let (b, g) = (task / kv_heads, task % kv_heads);
            // A block's probabilities and the gradient of its scores.
            let mut p = vec![0f32; QUERY_BLOCK * seq];
            let mut ds = vec![0f32; QUERY_BLOCK * seq];
            for j in 0..group {
                let h = g * group + j;
                let scores = Scores {
                    dims,
                    limits: &limits[b * seq..(b + 1) * seq],
                    mask: &mask[b * seq * seq..(b + 1) * seq * seq],
                    q: q.from(b, h, 0),
                    k: k.from(b, g, 0),
                };
                for (r0, r1, keys) in query_blocks(scores.limits) {
                    let rows = r1 - r0;
                    scores.probabilities(&mut p, r0, r1, keys);
                    let go_rows = Operand::rows(&go[dims.out_offset(b, r0, h)..], heads * head_dim);
                    let p_rows = Operand::rows(&p, seq);
                    // SAFETY: every view stays inside its buffer; this task alone writes `p`,
                    // `ds`, `dq`, `dk` and `dv`.
                    unsafe {
                        // dv[..keys] += p[rows, ..keys]ᵀ · go[rows]
                        product(
                            (keys, head_dim, rows),
                            dv.as_mut_ptr(),
                            head_dim,
                            true,
                            p_rows.t(),
                            go_rows,
                            1.0,
                            Threads::Caller,
                        );
                        // dp[rows, ..keys] = go[rows] · v[..keys]ᵀ
                        product(
                            (rows, keys, head_dim),
                            ds.as_mut_ptr(),
                            seq,
                            false,
                            go_rows,
                            v.from(b, g, 0).t(),
                            1.0,
                            Threads::Caller,
                        );
                    }
                    for ((p, d), i) in p.chunks(seq).zip(ds.chunks_mut(seq)).zip(r0..r1) {
                        let limit = scores.limits[i];
                        let (p, d) = (&p[..limit], &mut d[..keys]);
                        let dot = lanes::dot(p, d);
                        let (live, dead) = d.split_at_mut(limit);
                        for (d, &p) in live.iter_mut().zip(p) {
                            *d = scale * p * (*d - dot);
                        }
                        dead.fill(0.0);
                    }
                    let ds_rows = Operand::rows(&ds, seq);
                    unsafe {
                        // dq[rows] = ds[rows, ..keys] · k[..keys]
                        product(
                            (rows, head_dim, keys),
                            dq[(j * seq + r0) * head_dim..].as_mut_ptr(),
                            head_dim,
                            false,
                            ds_rows,
                            k.from(b, g, 0),
                            1.0,
                            Threads::Caller,
                        );
                        // dk[..keys] += ds[rows, ..keys]ᵀ · q[rows]
                        product(
                            (keys, head_dim, rows),
                            dk.as_mut_ptr(),
                            head_dim,
                            true,
                            ds_rows.t(),
                            q.from(b, h, r0),
                            1.0,
                            Threads::Caller,
                        );
                    }
                }
            }
        });
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{grads_of, max_abs_diff, normal};
    use candle_core::{Device, Var, D};

    /// The same attention from candle's ops: keys and values repeated per query head, the mask
    /// added, softmax, product, positions moved before heads.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
        let (b, h, s, d) = q.dims4().unwrap();
        let group = h / k.dim(1).unwrap();
        let repeat = |t: &Tensor| {
            let kv = t.dim(1).unwrap();
            t.unsqueeze(2)
                .unwrap()
                .broadcast_as((b, kv, group, s, d))
                .unwrap()
                .reshape((b, h, s, d))
                .unwrap()
        };
        let scores = (q.matmul(&repeat(k).t().unwrap()).unwrap() / (d as f64).sqrt())
            .unwrap()
            .broadcast_add(&mask.reshape((b, 1, s, s)).unwrap())
            .unwrap();
        let max = scores.max_keepdim(D::Minus1).unwrap().detach();
        let exp = scores.broadcast_sub(&max).unwrap().exp().unwrap();
        let probs = exp
            .broadcast_div(&exp.sum_keepdim(D::Minus1).unwrap())
            .unwrap();
        probs.matmul(&repeat(v)).unwrap().transpose(1, 2).unwrap()
    }

    #[test]
    fn equals_candle_ops_forward_and_backward_with_padding_and_grouped_heads() {
        let dev = Device::Cpu;
        // 70 positions: a full block of 64 queries and a partial one.
        let (b, h, kv, s, d) = (2, 6, 2, 70, 8);
        let var = |n: usize| Var::from_tensor(&normal((b, n, s, d), 0.0, 1.0, 1)).unwrap();
        let (q, k) = (var(h), var(kv));
        // Values stored positions-first, as the value projection leaves them.
        let v_stored = Var::from_tensor(&normal((b, s, kv, d), 0.0, 1.0, 2)).unwrap();
        let v = v_stored.as_tensor().transpose(1, 2).unwrap();
        // Example 0 causal; example 1 left-padded by 3, so its first 3 query rows see nothing.
        let mut mask = vec![0f32; b * s * s];
        for e in 0..b {
            for i in 0..s {
                for j in 0..s {
                    if j > i || (e == 1 && j < 3) {
                        mask[(e * s + i) * s + j] = f32::MIN;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, s, s), &dev).unwrap();
        let upstream = normal((b, s, h * d), 0.0, 1.0, 3);

        let expected = reference(q.as_tensor(), k.as_tensor(), &v, &mask)
            .reshape((b, s, h * d))
            .unwrap();
        let g_ref = grads_of(expected.clone(), &upstream);
        // Values as a transposed view of heads, and as the projection's rows themselves.
        let v_rows =
            Var::from_tensor(&v_stored.as_tensor().reshape((b, s, kv * d)).unwrap()).unwrap();
        for (v_in, v_var) in [
            (v.clone(), &v_stored),
            (v_rows.as_tensor().clone(), &v_rows),
        ] {
            let ours = causal_attention(q.as_tensor(), k.as_tensor(), &v_in, &mask)
                .unwrap()
                .unwrap();
            assert_eq!(ours.dims(), &[b, s, h * d]);
            assert!(max_abs_diff(&ours, &expected) < 1e-5);
            let g_ours = grads_of(ours, &upstream);
            for (var, reference) in [(&q, &q), (&k, &k), (v_var, &v_stored)] {
                let got = g_ours.get(var).unwrap();
                let want = g_ref.get(reference).unwrap().reshape(got.shape()).unwrap();
                assert!(
                    max_abs_diff(got, &want) < 1e-5,
                    "{}",
                    max_abs_diff(got, &want)
                );
            }
        }
    }

    #[test]
    fn a_replay_hands_on_the_kept_result_and_takes_gradients_from_the_kept_inputs() {
        let dev = Device::Cpu;
        let (b, h, kv, s, d) = (2, 4, 2, 70, 8);
        let var = |shape: (usize, usize, usize, usize), seed| {
            Var::from_tensor(&normal(shape, 0.0, 1.0, seed)).unwrap()
        };
        let (q, k) = (var((b, h, s, d), 1), var((b, kv, s, d), 2));
        let v = Var::from_tensor(&normal((b, s, kv * d), 0.0, 1.0, 3)).unwrap();
        // The causal mask of unpadded sequences, as the model builds it: query i sees keys 0..=i.
        let mask: Vec<f32> = (0..b * s * s)
            .map(|at| if at % s > (at / s) % s { f32::MIN } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (b, 1, 1, s, s), &dev).unwrap();
        let upstream = normal((b, s, h * d), 0.0, 1.0, 4);
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        let out = causal_attention(q, k, v, &mask).unwrap().unwrap();
        let expected = grads_of(out.clone(), &upstream);
        let kept = AttentionValues {
            q: q.detach(),
            k: k.detach(),
            v: v.detach(),
            out: out.detach(),
        };
        // Inputs whose values say nothing: the replay reads the kept ones.
        let zeros = |t: &Tensor| Var::from_tensor(&t.zeros_like().unwrap()).unwrap();
        let (zq, zk, zv) = (zeros(q), zeros(k), zeros(v));
        let replayed = causal_attention_replayed(&zq, &zk, &zv, &mask, &kept)
            .unwrap()
            .unwrap();
        assert_eq!(max_abs_diff(&replayed, &out), 0.0);
        let got = grads_of(replayed, &upstream);
        for (input, original) in [(&zq, q), (&zk, k), (&zv, v)] {
            let (got, want) = (got.get(input).unwrap(), expected.get(original).unwrap());
            assert_eq!(max_abs_diff(got, want), 0.0);
        }
        let err = causal_attention_replayed(&zk, &zk, &zv, &mask, &kept).unwrap_err();
        assert!(err.to_string().contains("do not fit"), "{err}");
    }

    #[test]
    fn rejects_keys_that_do_not_fit_the_queries() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 2), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 4, 2), DType::F32, &dev).unwrap();
        let mask = Tensor::zeros((1, 1, 1, 4, 4), DType::F32, &dev).unwrap();
        let err = causal_attention(&q, &k, &k, &mask).unwrap_err();
        assert!(err.to_string().contains("attention of queries"), "{err}");
        let short_mask = Tensor::zeros((1, 1, 1, 3, 3), DType::F32, &dev).unwrap();
        let err = causal_attention(&q, &q, &q, &short_mask).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
