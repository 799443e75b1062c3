//! 4-bit blockwise quantization in bitsandbytes' layout (`quantize_4bit`, CPU), and the 8-bit
//! blockwise coding of its absmax that bitsandbytes calls double quantization.
//!
//! Layout: the weight is read flat (row-major) in blocks of [`BLOCKSIZE`] values; each block keeps
//! its largest magnitude (absmax, float32), and each value the index of the code nearest to
//! `value · (1/absmax)` (clamped to [-1, 1]; ties go to the lower index, as `torch.argmin` picks
//! the first minimum). Two codes share a byte, the first in the high nibble.

use super::codes::{DYNAMIC_8BIT, FP4, NF4};

/// Values per absmax block of the 4-bit codes.
pub const BLOCKSIZE: usize = 64;
/// Absmax values per second-level block under double quantization.
pub const ABSMAX_BLOCKSIZE: usize = 256;

/// The 4-bit code table: normal-float or floating-point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FourBitType {
    Nf4,
    Fp4,
}

impl FourBitType {
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            FourBitType::Nf4 => &NF4,
            FourBitType::Fp4 => &FP4,
        }
    }

    /// The name `quantization_type` uses.
    pub fn name(self) -> &'static str {
        match self {
            FourBitType::Nf4 => "nf4",
            FourBitType::Fp4 => "fp4",
        }
    }
}

/// The absmax of every block: as float32, or itself quantized (double quantization).
#[derive(Clone, Debug, PartialEq)]
pub enum BlockScales {
    Plain(Vec<f32>),
    Double(DoubleQuantized),
}

/// Absmax minus its mean (`offset`), coded with [`DYNAMIC_8BIT`] in blocks of
/// [`ABSMAX_BLOCKSIZE`], each with its own float32 absmax (`absmax2`).
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantized {
    pub codes: Vec<u8>,
    pub absmax2: Vec<f32>,
    pub offset: f32,
}

/// What it takes besides the packed codes to decode `len` values quantized to 4 bits. The packed
/// codes are `ceil(len / 2)` bytes; an odd last code is paired with a zero low nibble.
#[derive(Clone, Debug, PartialEq)]
pub struct FourBit {
    pub kind: FourBitType,
    pub len: usize,
    pub scales: BlockScales,
}

impl FourBit {
    /// The packed codes and their scales.
    pub fn quantize(values: &[f32], kind: FourBitType, double_quant: bool) -> (Vec<u8>, Self) {
        let code = kind.code();
        let absmax: Vec<f32> = values.chunks(BLOCKSIZE).map(abs_max).collect();
        let mut packed = vec![0u8; values.len().div_ceil(2)];
        for (block, (chunk, &amax)) in values.chunks(BLOCKSIZE).zip(&absmax).enumerate() {
            let inv = 1.0 / amax;
            for (j, &v) in chunk.iter().enumerate() {
                // An all-zero block has no scale; its values are coded as the code nearest 0.
                let scaled = if amax == 0.0 {
                    0.0
                } else {
                    (v * inv).clamp(-1.0, 1.0)
                };
                let q = nearest(code, scaled) as u8;
                let i = block * BLOCKSIZE + j;
                packed[i / 2] |= if i.is_multiple_of(2) { q << 4 } else { q };
            }
        }
        let scales = if double_quant {
            BlockScales::Double(DoubleQuantized::quantize(&absmax))
        } else {
            BlockScales::Plain(absmax)
        };
        let scales = Self {
            kind,
            len: values.len(),
            scales,
        };
        (packed, scales)
    }

    /// The absmax of block `b`, decoded when double-quantized.
    pub fn block_absmax(&self, b: usize) -> f32 {
        match &self.scales {
            BlockScales::Plain(absmax) => absmax[b],
            BlockScales::Double(d) => d.decode(b),
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.len.div_ceil(BLOCKSIZE)
    }

    /// Values `start..end` as float32: `code[index] · absmax`, as bitsandbytes dequantizes.
    pub fn dequantize_range(&self, packed: &[u8], start: usize, end: usize, out: &mut Vec<f32>) {
        let absmax = |block| self.block_absmax(block);
        let code = self.kind.code();
        ff_kernels::dequantize::four_bit(packed, code, BLOCKSIZE, absmax, start..end, out);
    }
}

impl DoubleQuantized {
    /// bitsandbytes' `quantize_blockwise` on CPU: each value divided by its block's absmax, then
    /// the nearest entry of the dynamic map.
    pub fn quantize(absmax: &[f32]) -> Self {
        let offset = mean(absmax);
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let mut codes = Vec::with_capacity(centred.len());
        let mut absmax2 = Vec::with_capacity(centred.len().div_ceil(ABSMAX_BLOCKSIZE));
        for chunk in centred.chunks(ABSMAX_BLOCKSIZE) {
            let amax = abs_max(chunk);
            absmax2.push(amax);
            codes.extend(chunk.iter().map(|&v| {
                let normed = if amax == 0.0 { 0.0 } else { v / amax };
                nearest(&DYNAMIC_8BIT, normed) as u8
            }));
        }
        Self {
            codes,
            absmax2,
            offset,
        }
    }

    /// The absmax of 4-bit block `b`: `code[q] · absmax2 + offset`, in that order, in float32.
    pub fn decode(&self, b: usize) -> f32 {
        DYNAMIC_8BIT[self.codes[b] as usize] * self.absmax2[b / ABSMAX_BLOCKSIZE] + self.offset
    }
}

fn abs_max(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// The mean in float32 of a sum accumulated in float64: within an ulp of torch's float32 mean,
/// which is all the offset needs (it is stored, never recomputed from the codes).
fn mean(values: &[f32]) -> f32 {
    if values.is_empty() {
        return 0.0;
    }
    (values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64) as f32
}

/// Index of the entry of `code` nearest `x`; the first one on ties.
fn nearest(code: &[f32], x: f32) -> usize {
    let mut best = 0;
    let mut best_dist = f32::INFINITY;
    for (i, &c) in code.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_dist {
            best = i;
            best_dist = d;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_pack_first_value_into_the_high_nibble() {
        let (packed, q) = FourBit::quantize(&[-1.0, 1.0, 0.0], FourBitType::Nf4, false);
        assert_eq!(packed, vec![0x0F, 0x70]);
        let mut out = Vec::new();
        q.dequantize_range(&packed, 0, 3, &mut out);
        assert_eq!(out, vec![-1.0, 1.0, 0.0]);
    }

    #[test]
    fn ties_go_to_the_lower_code() {
        assert_eq!(nearest(&[0.0, 1.0], 0.5), 0);
    }

    #[test]
    fn zero_blocks_stay_zero() {
        let (packed, q) = FourBit::quantize(&[0.0; 64], FourBitType::Fp4, true);
        let mut out = Vec::new();
        q.dequantize_range(&packed, 0, 64, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
