//! The causal-LM loss and its gradient, computed a chunk of positions at a time.
//!
//! Only positions whose next token is a label enter the head at all, and at most
//! `CHUNK_ELEMENTS` logits exist at once: a 49k or 128k vocabulary would otherwise make the
//! float32 logits of a batch the largest tensor of the whole step.

use candle_core::{backprop::GradStore, DType, Result, Tensor, Var, D};
use ff_kernels::bf16_product::{self, PackedWeight};
use ff_kernels::cross_entropy::nll_and_grad;
use ff_kernels::frozen_product::{frozen_input_grad, matmul_frozen_t, matmul_frozen_t_values};
use ff_kernels::transposed_product::{add_transposed_product, transposed_product};
use ff_model::CausalLm;

use crate::backward::backward_from;
use crate::batch::{Batch, IGNORE_INDEX};

/// The bound for [`HeadMemory::Peak`] on logits held at once (rows × vocabulary) by one walk:
/// row groups running side by side each hold a chunk, so where the head is the step's peak a
/// larger bound (tried at 1 << 23) cost their sum in peak memory.
const CHUNK_ELEMENTS: usize = 1 << 22;

/// The bound for [`HeadMemory::BelowPeak`].
const LONG_CHUNK_ELEMENTS: usize = 1 << 23;

/// Whether the head's backward is the step's peak in memory, which decides what it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadMemory {
    /// Chunks of the loss's rows hold at most `CHUNK_ELEMENTS` logits, and a trained head's
    /// gradient is handed on as soon as it is summed.
    Peak,
    /// The head trains and every gradient and AdamW moment of the step is in memory: the
    /// step's peak comes later, with every gradient and both moments. So:
    ///
    /// - Chunks hold twice the logits. Every chunk also reads and writes the head's whole
    ///   gradient (`vocab × width`), and twice the rows halve those passes without moving the
    ///   step's peak; where the head is the peak, long chunks would raise it.
    /// - A head tied to the embedding keeps its gradient through the layers' backward and
    ///   hands it on with the embedding's rows (`ff_model::table_grad`), instead of a table of
    ///   the rows alone, zeroed, filled and added whole, beside the head's (where the head is
    ///   the peak, the kept gradient would raise it by its size).
    BelowPeak,
}

impl HeadMemory {
    /// Rows of `vocab` logits a chunk of the loss holds.
    fn rows(self, vocab: usize) -> usize {
        let elements = match self {
            Self::Peak => CHUNK_ELEMENTS,
            Self::BelowPeak => LONG_CHUNK_ELEMENTS,
        };
        (elements / vocab).max(1)
    }
}

/// Positions `b * seq + t` whose prediction is scored, and the token each must predict.
pub struct LabelPositions {
    pub rows: Vec<u32>,
    pub targets: Vec<u32>,
}

impl LabelPositions {
    pub fn of(batch: &Batch) -> Self {
        let seq = batch.seq_len();
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (b, labels) in batch.labels.iter().enumerate() {
            for t in 0..seq.saturating_sub(1) {
                let label = labels[t + 1];
                if label != IGNORE_INDEX {
                    rows.push((b * seq + t) as u32);
                    targets.push(label as u32);
                }
            }
        }
        Self { rows, targets }
    }
}

/// Result of the head's forward and backward on one micro-batch.
pub struct HeadOutput {
    /// Sum of negative log-likelihoods over the micro-batch's label tokens (not divided).
    pub nll_sum: f64,
    /// Gradient of the step loss with respect to the last layer's output, `[batch, seq, hidden]`.
    pub grad_hidden: Tensor,
    /// The trained head's gradient, `[vocab, hidden]` row-major, for the caller to hand on
    /// (a tied head's may wait for the embedding's rows).
    pub head_grad: Option<Vec<f32>>,
}

/// Runs final norm, LM head and cross-entropy on `hidden` (the last decoder layer's output,
/// `[batch, seq, hidden]`), and back-propagates `nll_sum / loss_denominator` into `hidden`, the
/// norm's weight when it trains (added to `on_grads`) and the head's (returned).
pub fn head_forward_backward(
    model: &CausalLm,
    hidden: &Tensor,
    positions: &LabelPositions,
    loss_denominator: f64,
    memory: HeadMemory,
    on_grads: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<HeadOutput> {
    let chunk = memory.rows(model.config.vocab_size);
    head_in_chunks(model, hidden, positions, loss_denominator, chunk, on_grads)
}

/// [`head_forward_backward`] over `chunk` label positions at a time.
fn head_in_chunks(
    model: &CausalLm,
    hidden: &Tensor,
    positions: &LabelPositions,
    loss_denominator: f64,
    chunk: usize,
    on_grads: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<HeadOutput> {
    let (batch, seq, width) = hidden.dims3()?;
    let device = hidden.device();
    let flat = hidden.reshape((batch * seq, width))?;
    let n = positions.rows.len();
    if n == 0 {
        return Ok(HeadOutput {
            nll_sum: 0.0,
            grad_hidden: hidden.zeros_like()?,
            head_grad: None,
        });
    }
    let rows = Tensor::new(positions.rows.as_slice(), device)?;
    let selected = flat.index_select(&rows, 0)?;
    let head = model.lm_head_weight().in_dtype(model.dtype)?.detach();
    let head_trains = model.lm_head_weight().is_trainable();
    let vocab = model.config.vocab_size;
    let mut nll_sum = 0.0;
    let mut grad_chunks = Vec::with_capacity(n.div_ceil(chunk));
    // The trained head's gradient, summed over chunks in float32 in one buffer that the first
    // chunk's product fills.
    let mut head_grad: Option<Vec<f32>> = None;
    // A bfloat16 head is packed once for the bf16 product of every chunk, when there are rows
    // enough to pay for it.
    let packed_head = if !head_trains && bf16_product::suits(n, &head) {
        Some(PackedWeight::new(&head)?)
    } else {
        None
    };
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let x = Var::from_tensor(&selected.narrow(0, start, len)?)?;
        let targets = &positions.targets[start..start + len];
        let normed = model.norm.forward(x.as_tensor())?;
        // The head's product needs no graph: the gradient of the normed states is
        // d(loss)/d(logits) · head, carried into x and the norm from there, and the head's own
        // is d(loss)/d(logits)ᵀ · normed.
        let logits = match &packed_head {
            Some(packed) => packed.times_transposed(&normed.detach())?,
            None => matmul_frozen_t_values(&normed.detach(), &head)?,
        };
        let (nll, grad_logits) = nll_and_grad(logits, vocab, targets, loss_denominator, device)?;
        nll_sum += nll;
        if head_trains {
            let normed = normed.detach().to_dtype(DType::F32)?;
            match head_grad.as_mut() {
                Some(sum) => add_transposed_product(sum, &grad_logits, &normed)?,
                None => head_grad = Some(transposed_product(&grad_logits, &normed)?),
            }
        }
        let grad_normed = match &packed_head {
            Some(packed) => packed.times(&grad_logits)?,
            None => frozen_input_grad(&grad_logits, &head)?,
        }
        .to_dtype(normed.dtype())?;
        let grads = backward_from(&normed, &grad_normed)?;
        on_grads(&grads)?;
        let gx = grads
            .get(x.as_tensor())
            .cloned()
            .unwrap_or(x.as_tensor().zeros_like()?);
        grad_chunks.push(gx);
    }
    let grad_selected = Tensor::cat(&grad_chunks, 0)?.to_dtype(hidden.dtype())?;
    let grad_hidden = flat
        .zeros_like()?
        .index_add(&rows, &grad_selected, 0)?
        .reshape((batch, seq, width))?;
    Ok(HeadOutput {
        nll_sum,
        grad_hidden,
        head_grad,
    })
}

/// Sum of NLLs over the label tokens of `hidden` without any gradient (evaluation).
pub fn head_nll(model: &CausalLm, hidden: &Tensor, positions: &LabelPositions) -> Result<f64> {
    let (batch, seq, width) = hidden.dims3()?;
    let n = positions.rows.len();
    if n == 0 {
        return Ok(0.0);
    }
    let device = hidden.device();
    let rows = Tensor::new(positions.rows.as_slice(), device)?;
    let selected = hidden
        .reshape((batch * seq, width))?
        .index_select(&rows, 0)?;
    let head = model.lm_head_weight().in_dtype(model.dtype)?.detach();
    let chunk = HeadMemory::Peak.rows(model.config.vocab_size);
    let mut nll_sum = 0.0;
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let targets = Tensor::new(&positions.targets[start..start + len], device)?.unsqueeze(1)?;
        let normed = model.norm.forward(&selected.narrow(0, start, len)?)?;
        let logits = matmul_frozen_t(&normed, &head)?
            .to_dtype(DType::F32)?
            .detach();
        let max = logits.max_keepdim(D::Minus1)?;
        let lse = (logits
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        nll_sum += (&lse - logits.gather(&targets, 1)?)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(nll_sum)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use ff_model::load::load_model_dir;

    fn tiny_model(trained: bool) -> CausalLm {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/tiny-llama");
        let mut model = load_model_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        if trained {
            ff_model::finetune::make_all_trainable(&mut model).unwrap();
        }
        model
    }

    /// The loss, the hidden states' gradient and the trained weights' gradients: the norm's
    /// summed over the stores the head hands on, then the head's.
    fn head_results(
        model: &CausalLm,
        hidden: &Tensor,
        positions: &LabelPositions,
        chunk: usize,
    ) -> (f64, Vec<f32>, Vec<Vec<f32>>) {
        let vars: Vec<&Var> = model.norm.weight.var().into_iter().collect();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let output = head_in_chunks(model, hidden, positions, 7.0, chunk, &mut |grads| {
            for (sum, var) in sums.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        })
        .unwrap();
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut grads: Vec<Vec<f32>> = sums.iter().map(|s| flat(s.as_ref().unwrap())).collect();
        grads.extend(output.head_grad);
        (output.nll_sum, flat(&output.grad_hidden), grads)
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        let worst = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let scale = b.iter().map(|y| y.abs()).fold(0f32, f32::max);
        assert!(
            worst <= 1e-5 * scale,
            "{what}: {worst} apart at scale {scale}"
        );
    }

    #[test]
    fn long_chunks_hold_twice_the_rows() {
        assert_eq!(HeadMemory::Peak.rows(49152), 85);
        assert_eq!(HeadMemory::BelowPeak.rows(49152), 170);
        assert_eq!(HeadMemory::BelowPeak.rows(usize::MAX), 1);
    }

    /// Chunks change only the order of sums: 3 positions a chunk (the last one short) give what
    /// one chunk of all 8 gives, frozen head or trained.
    #[test]
    fn chunks_of_positions_give_the_whole_batch_results() {
        for trained in [false, true] {
            let model = tiny_model(trained);
            let width = model.config.hidden_size;
            let hidden = Tensor::randn(0f32, 1.0, (2, 6, width), &Device::Cpu).unwrap();
            let mut labels = vec![vec![3i64; 6], vec![5i64; 6]];
            labels[1][..3].fill(IGNORE_INDEX);
            let batch = Batch {
                input_ids: vec![vec![1; 6]; 2],
                attention_mask: vec![vec![1; 6]; 2],
                labels,
            };
            let positions = LabelPositions::of(&batch);
            assert_eq!(positions.rows.len(), 8);
            let (nll, grad_hidden, grads) = head_results(&model, &hidden, &positions, 8);
            let (chunked_nll, chunked_hidden, chunked_grads) =
                head_results(&model, &hidden, &positions, 3);
            assert!(
                (nll - chunked_nll).abs() < 1e-6 * nll,
                "{nll} vs {chunked_nll}"
            );
            assert_close(&chunked_hidden, &grad_hidden, "hidden states' gradient");
            assert_eq!(grads.len(), if trained { 2 } else { 0 });
            for (chunked, whole) in chunked_grads.iter().zip(&grads) {
                assert_close(chunked, whole, "trained weight's gradient");
            }
        }
    }
}
