//! A padded batch of token sequences as the step consumes it.

use candle_core::{Device, Result, Tensor};

/// The label value that marks a position the loss ignores, as in PyTorch and Hugging Face.
pub const IGNORE_INDEX: i64 = -100;

/// Rows of equal length. `attention_mask` is 1 on real tokens and 0 on padding. `labels` are
/// unshifted, as Hugging Face stores them: the label at position `t` is the target of the
/// prediction made at position `t - 1`.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u8>>,
    pub labels: Vec<Vec<i64>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Number of positions that contribute to the loss (labels shifted by one).
    pub fn num_label_tokens(&self) -> usize {
        self.labels
            .iter()
            .map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count())
            .sum()
    }

    pub fn input_ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<u32> = self.input_ids.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (self.len(), self.seq_len()), device)
    }

    /// Rows `start..start + len`, for splitting a batch into micro-batches or across ranks.
    pub fn rows(&self, start: usize, len: usize) -> Batch {
        let end = (start + len).min(self.len());
        Batch {
            input_ids: self.input_ids[start..end].to_vec(),
            attention_mask: self.attention_mask[start..end].to_vec(),
            labels: self.labels[start..end].to_vec(),
        }
    }
}
