//! `softmax(scale · scores + mask)` over the last axis, as one op with its own backward.
//!
//! Built from candle's ops, attention's softmax took a scale, a cast, a broadcast add, max,
//! subtract, exp, sum and divide, each a pass over `[batch, heads, seq, seq]` scores and each
//! with its own backward; attention ran at about 10 GFLOP/s. Here the forward is one pass per
//! row and the backward another, rows in parallel.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, DType, Error, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `scores` is `[batch, kv_heads, groups · seq, seq]` (the query heads sharing a key-value head
/// stacked along the sequence axis), `mask` the additive float32 `[batch, 1, 1, seq, seq]` of
/// [`crate::ForwardCtx`]. Returns float32 probabilities of the shape of `scores`.
pub fn masked_softmax(scores: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = scores.to_dtype(DType::F32)?.contiguous()?;
    let mask = mask.contiguous()?;
    if !scores.device().is_cpu() {
        // The op has only a CPU kernel; elsewhere candle's ops compute the same.
        let (b, h, rows, seq) = scores.dims4()?;
        let groups = rows / seq;
        let x = (scores
            .affine(scale, 0.0)?
            .reshape((b, h, groups, seq, seq))?)
        .broadcast_add(&mask)?;
        let max = x.max_keepdim(candle_core::D::Minus1)?.detach();
        let exp = x.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(candle_core::D::Minus1)?;
        return exp.broadcast_div(&sum)?.reshape((b, h, rows, seq));
    }
    scores.apply_op2_arc(&mask, Arc::new(Box::new(MaskedSoftmax { scale })))
}

struct MaskedSoftmax {
    scale: f64,
}

/// The contiguous float32 values of a storage.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg("masked softmax needs contiguous inputs".into()))?;
    Ok(&storage.as_slice::<f32>()?[start..end])
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        scores_layout: &Layout,
        mask: &CpuStorage,
        mask_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, _, _, seq) = scores_layout.shape().dims4()?;
        let scores = f32_slice(scores, scores_layout)?;
        let mask = f32_slice(mask, mask_layout)?;
        let rows_per_example = scores.len() / seq / batch;
        let scale = self.scale as f32;
        let mut probs = vec![0f32; scores.len()];
        probs
            .par_chunks_mut(seq)
            .zip(scores.par_chunks(seq))
            .enumerate()
            .for_each(|(row, (p, s))| {
                // Row `row` is query position `row % seq` of example `row / rows_per_example`.
                let m_start = ((row / rows_per_example) * seq + row % seq) * seq;
                let m = &mask[m_start..m_start + seq];
                let mut max = f32::NEG_INFINITY;
                for ((p, &s), &m) in p.iter_mut().zip(s).zip(m) {
                    *p = s * scale + m;
                    max = max.max(*p);
                }
                let mut sum = 0f32;
                for p in p.iter_mut() {
                    *p = (*p - max).exp();
                    sum += *p;
                }
                let inv = 1.0 / sum;
                p.iter_mut().for_each(|p| *p *= inv);
            });
        Ok((CpuStorage::F32(probs), scores_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _mask: &Tensor,
        probs: &Tensor,
        grad_probs: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad_probs = grad_probs.contiguous()?;
        let grad = probs.apply_op2_no_bwd(&grad_probs, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(grad), None))
    }
}

/// `scale · p ⊙ (dp − Σ dp ⊙ p)` per row: the gradient of the scores.
struct SoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        probs: &CpuStorage,
        probs_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let seq = probs_layout.shape().dims4()?.3;
        let probs = f32_slice(probs, probs_layout)?;
        let grad = f32_slice(grad, grad_layout)?;
        let scale = self.scale as f32;
        let mut out = vec![0f32; probs.len()];
        out.par_chunks_mut(seq)
            .zip(probs.par_chunks(seq).zip(grad.par_chunks(seq)))
            .for_each(|(o, (p, g))| {
                let dot: f32 = p.iter().zip(g).map(|(p, g)| p * g).sum();
                for ((o, &p), &g) in o.iter_mut().zip(p).zip(g) {
                    *o = scale * p * (g - dot);
                }
            });
        Ok((CpuStorage::F32(out), probs_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn equals_softmax_of_candle_ops_forward_and_backward() {
        let dev = Device::Cpu;
        let (b, h, groups, seq) = (2, 2, 3, 4);
        let scores =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, groups * seq, seq), &dev).unwrap())
                .unwrap();
        let mut mask = vec![0f32; b * seq * seq];
        for i in 0..seq {
            for j in i + 1..seq {
                mask[i * seq + j] = f32::MIN;
                mask[(seq + i) * seq + j] = f32::MIN;
            }
        }
        mask[seq * seq] = f32::MIN; // example 1, query 0 may not see key 0
        let mask = Tensor::from_vec(mask, (b, 1, 1, seq, seq), &dev).unwrap();
        let upstream = Tensor::randn(0f32, 1.0, (b, h, groups * seq, seq), &dev).unwrap();
        let scale = 0.125;

        let ours = masked_softmax(scores.as_tensor(), &mask, scale).unwrap();
        let x = scores
            .as_tensor()
            .affine(scale, 0.0)
            .unwrap()
            .reshape((b, h, groups, seq, seq))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let max = x.max_keepdim(D::Minus1).unwrap().detach();
        let exp = x.broadcast_sub(&max).unwrap().exp().unwrap();
        let sum = exp.sum_keepdim(D::Minus1).unwrap();
        let reference = exp
            .broadcast_div(&sum)
            .unwrap()
            .reshape((b, h, groups * seq, seq))
            .unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&ours, &reference) < 1e-6);
        let g_ours = crate::test_util::grads_of(ours, &upstream);
        let g_ref = crate::test_util::grads_of(reference, &upstream);
        assert!(diff(g_ours.get(&scores).unwrap(), g_ref.get(&scores).unwrap()) < 1e-6);
    }
}
