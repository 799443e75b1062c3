//! Cross-entropy of a chunk of logits and its gradient, one pass per row.
//!
//! Written with candle's ops this took about a dozen passes over the `[rows, vocabulary]` logits
//! (max, subtract, exp, sum, log, gather, divide, scatter, scale, and the autograd of a
//! surrogate product), a large share of a LoRA step. Here each row is read and written once more
//! after the logits exist, rows in parallel.

use candle_core::{Device, Error, Result, Tensor};
use rayon::prelude::*;

use crate::fast_exp::exp_shifted;
use crate::lanes;

/// For `logits`, float32 rows of `vocab` values, and each row's target: the sum over rows of
/// `logsumexp(row) − row[target]`, and the gradient of that sum divided by `denominator` with
/// respect to the logits, `(softmax(row) − onehot(target)) / denominator`, `[rows, vocab]`. The
/// gradient is written over the logits' values, so a chunk's logits and gradient never exist
/// side by side.
pub fn nll_and_grad(
    mut logits: Vec<f32>,
    vocab: usize,
    targets: &[u32],
    denominator: f64,
    device: &Device,
) -> Result<(f64, Tensor)> {
    let rows = targets.len();
    if logits.len() != rows * vocab {
        return Err(Error::Msg(format!(
            "{} logits are not {rows} rows of {vocab}",
            logits.len()
        )));
    }
    let nll_sum = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &target)| {
            let target = target as usize;
            let target_logit = row[target];
            let max = lanes::max(row);
            exp_shifted(row, max);
            let sum = lanes::sum_f64(row);
            let scale = (1.0 / (sum * denominator)) as f32;
            row.iter_mut().for_each(|g| *g *= scale);
            row[target] -= (1.0 / denominator) as f32;
            max as f64 + sum.ln() - target_logit as f64
        })
        .sum();
    Ok((nll_sum, Tensor::from_vec(logits, (rows, vocab), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::D;

    #[test]
    fn matches_log_softmax_and_its_gradient() {
        let logits = Tensor::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 4.0]], &Device::Cpu).unwrap();
        let values = logits.flatten_all().unwrap().to_vec1().unwrap();
        let (nll, grad) = nll_and_grad(values, 3, &[2, 0], 4.0, &Device::Cpu).unwrap();
        let log_probs = log_softmax(&logits);
        let expected_nll = -(log_probs[0][2] + log_probs[1][0]);
        assert!((nll - expected_nll).abs() < 1e-6, "{nll} vs {expected_nll}");
        let grad: Vec<Vec<f32>> = grad.to_vec2().unwrap();
        for (r, target) in [(0, 2), (1, 0)] {
            for c in 0..3 {
                let onehot = if c == target { 1.0 } else { 0.0 };
                let expected = (log_probs[r][c].exp() - onehot) / 4.0;
                assert!((grad[r][c] as f64 - expected).abs() < 1e-7);
            }
        }
    }

    fn log_softmax(logits: &Tensor) -> Vec<Vec<f64>> {
        let lse = logits
            .exp()
            .unwrap()
            .sum_keepdim(D::Minus1)
            .unwrap()
            .log()
            .unwrap();
        let lp = logits.broadcast_sub(&lse).unwrap();
        lp.to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec2()
            .unwrap()
    }
}
