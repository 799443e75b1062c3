//! 8-bit weights: each row scaled by its absmax to [-127, 127] and rounded (bitsandbytes'
//! `int8_vectorwise_quant` without a threshold, on weights rounded to float16 first, as its
//! `Int8Params` does). This is plain row-wise absmax int8, not LLM.int8()'s mixed-precision
//! decomposition: no outlier columns are kept in 16 bits, and the product runs on dequantized
//! rows in the compute dtype.

/// The scales of `[rows, cols]` int8 codes (kept apart, as bytes in two's complement).
#[derive(Clone, Debug, PartialEq)]
pub struct RowwiseInt8 {
    pub cols: usize,
    pub row_absmax: Vec<f32>,
}

impl RowwiseInt8 {
    /// The codes (row-major, as bytes) and their scales.
    pub fn quantize(values: &[f32], cols: usize) -> (Vec<u8>, Self) {
        let mut codes = Vec::with_capacity(values.len());
        let mut row_absmax = Vec::with_capacity(values.len() / cols.max(1));
        let values: Vec<f32> = values
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        for row in values.chunks(cols.max(1)) {
            let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            row_absmax.push(amax);
            let scale = 127.0 / amax;
            codes.extend(row.iter().map(|&v| {
                let code = if amax == 0.0 {
                    0
                } else {
                    // torch.round: halves to even.
                    (v * scale).round_ties_even().clamp(-127.0, 127.0) as i8
                };
                code as u8
            }));
        }
        (codes, Self { cols, row_absmax })
    }

    /// Values `start..end` (flat, row-major) as float32: `code · absmax · (1/127)`.
    pub fn dequantize_range(&self, codes: &[u8], start: usize, end: usize, out: &mut Vec<f32>) {
        let range = start..end;
        ff_kernels::dequantize::int8_rowwise(codes, &self.row_absmax, self.cols, range, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_scale_to_127_and_round_half_to_even() {
        let (codes, q) = RowwiseInt8::quantize(&[127.0, 0.5, -1.5, 0.0, 0.0, 0.0], 3);
        assert_eq!(codes, vec![127, 0, (-2i8) as u8, 0, 0, 0]);
        assert_eq!(q.row_absmax, vec![127.0, 0.0]);
    }
}
