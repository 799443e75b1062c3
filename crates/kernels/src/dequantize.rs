//! The float32 values of quantized weights (QLoRA), decoded from their codes and scales as
//! bitsandbytes decodes them: the 4-bit blockwise layout (NF4 or FP4) and row-wise absmax int8.
//!
//! The formats themselves (the code tables, how values are encoded, how the arrays are stored)
//! belong to the model; these take the arrays as plain slices, so a device's decoder can sit
//! beside them and read the same arrays.

use std::ops::Range;

/// Values `range` of a flat 4-bit weight, appended to `out` as float32: `code[index] · absmax`
/// of the value's block of `block_size`, as bitsandbytes dequantizes. `packed` holds two codes a
/// byte, the first in the high nibble; `block_absmax(b)` is block `b`'s scale.
pub fn four_bit(
    packed: &[u8],
    code: &[f32; 16],
    block_size: usize,
    block_absmax: impl Fn(usize) -> f32,
    range: Range<usize>,
    out: &mut Vec<f32>,
) {
    let Range { start, end } = range;
    let mut i = start;
    while i < end {
        let block = i / block_size;
        let block_end = ((block + 1) * block_size).min(end);
        // The 16 products of this block, each the same float32 product as per value.
        let absmax = block_absmax(block);
        let value = code.map(|c| c * absmax);
        if i % 2 == 1 {
            out.push(value[(packed[i / 2] & 0x0F) as usize]);
            i += 1;
        }
        while i + 1 < block_end {
            let byte = packed[i / 2];
            out.push(value[(byte >> 4) as usize]);
            out.push(value[(byte & 0x0F) as usize]);
            i += 2;
        }
        if i < block_end {
            out.push(value[(packed[i / 2] >> 4) as usize]);
            i += 1;
        }
    }
}

/// Values `range` (flat, row-major) of a `[rows, cols]` int8 weight, appended to `out` as
/// float32: `code · absmax · (1/127)`, `codes` as bytes in two's complement and `row_absmax`
/// each row's scale.
pub fn int8_rowwise(
    codes: &[u8],
    row_absmax: &[f32],
    cols: usize,
    range: Range<usize>,
    out: &mut Vec<f32>,
) {
    const INV_127: f32 = 7.874_016e-3;
    out.extend(range.map(|i| codes[i] as i8 as f32 * row_absmax[i / cols] * INV_127));
}
