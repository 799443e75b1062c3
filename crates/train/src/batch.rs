//! A padded batch of token sequences as the step consumes it.

use candle_core::{Device, Result, Tensor};

pub use ff_data::IGNORE_INDEX;

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

    /// One padding-free token with no label: a rank without examples walks it so that it
    /// joins every collective of a sharded step while adding nothing to the loss or gradient.
    pub fn placeholder() -> Self {
        Self {
            input_ids: vec![vec![0]],
            attention_mask: vec![vec![1]],
            labels: vec![vec![IGNORE_INDEX]],
        }
    }

    pub fn seq_len(&self) -> usize {
        self.input_ids.first().map_or(0, Vec::len)
    }

    /// Positions in the batch, padding included.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.iter().map(Vec::len).sum()
    }

    /// Number of positions that contribute to the loss.
    pub fn num_label_tokens(&self) -> usize {
        self.labels.iter().map(|row| label_tokens(row)).sum()
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

pub use ff_data::Example;

/// Pads examples on the right to the longest one: `pad_token_id` in the inputs, attention 0 and
/// label [`IGNORE_INDEX`] on the padding, as LLaMA-Factory's SFT collator does for training.
pub fn collate(examples: &[&Example], pad_token_id: u32) -> Batch {
    let seq = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut batch = Batch {
        input_ids: Vec::with_capacity(examples.len()),
        attention_mask: Vec::with_capacity(examples.len()),
        labels: Vec::with_capacity(examples.len()),
    };
    for e in examples {
        let mut ids = e.input_ids.clone();
        ids.resize(seq, pad_token_id);
        let mut mask = vec![1u8; e.input_ids.len()];
        mask.resize(seq, 0);
        let mut labels = e.labels.clone();
        labels.resize(seq, IGNORE_INDEX);
        batch.input_ids.push(ids);
        batch.attention_mask.push(mask);
        batch.labels.push(labels);
    }
    batch
}

/// Positions of one example's `labels` that contribute to the loss: labels are shifted by one,
/// so the first never does.
pub fn label_tokens(labels: &[i64]) -> usize {
    labels
        .iter()
        .skip(1)
        .filter(|&&l| l != IGNORE_INDEX)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collate_pads_right_and_masks_labels() {
        let a = Example {
            input_ids: vec![5, 6, 7],
            labels: vec![-100, 6, 7],
        };
        let b = Example {
            input_ids: vec![8],
            labels: vec![8],
        };
        let batch = collate(&[&a, &b], 2);
        assert_eq!(batch.input_ids, vec![vec![5, 6, 7], vec![8, 2, 2]]);
        assert_eq!(batch.attention_mask, vec![vec![1, 1, 1], vec![1, 0, 0]]);
        assert_eq!(batch.labels, vec![vec![-100, 6, 7], vec![8, -100, -100]]);
        assert_eq!(batch.num_label_tokens(), 2);
    }
}
