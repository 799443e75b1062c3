//! Sums, dot products and maxima of float32 rows, in sixteen independent lanes.
//!
//! A plain fold is one chain of dependent operations, which the compiler must keep in order
//! (float addition does not reassociate): one element per add's latency, about 4 cycles. With
//! sixteen lanes, one AVX-512 register or four SSE ones, the loop runs as wide as the CPU
//! allows. A lane sum rounds differently from a fold, as every vectorized sum (PyTorch's
//! among them) does; a maximum is the same either way.

const LANES: usize = 16;

/// `Σ values`.
pub fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// `Σ values` accumulated in float64 (a row of a 49k or 128k vocabulary).
pub fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0f64; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64;
        }
    }
    lanes.iter().sum::<f64>() + tail.iter().map(|&v| v as f64).sum::<f64>()
}

/// `Σ a[i] · b[i]` over the shorter of the two.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for ((lane, a), b) in lanes.iter_mut().zip(a).zip(b) {
            *lane += a * b;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a[i] · b[i] · c[i]` over the shortest of the three.
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let len = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..len], &b[..len], &c[..len]);
    let mut lanes = [0f32; LANES];
    let (a_chunks, b_chunks, c_chunks) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .zip(c_chunks.remainder())
        .map(|((a, b), c)| a * b * c)
        .sum();
    for ((a, b), c) in a_chunks.zip(b_chunks).zip(c_chunks) {
        for (((lane, a), b), c) in lanes.iter_mut().zip(a).zip(b).zip(c) {
            *lane += a * b * c;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest of `values` (−∞ for none; NaNs are passed over, as by `f32::max`).
pub fn max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(v);
        }
    }
    lanes
        .iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agree_with_plain_folds_at_every_length_around_the_lanes() {
        for len in [0, 1, 15, 16, 17, 33, 100] {
            let a: Vec<f32> = (0..len).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let b: Vec<f32> = (0..len).map(|i| ((i * 3) % 5) as f32 * 0.5).collect();
            let c: Vec<f32> = (0..len).map(|i| 1.0 + (i % 4) as f32).collect();
            // Small integers and halves: every sum is exact, whatever the order.
            assert_eq!(sum(&a), a.iter().sum::<f32>(), "{len}");
            assert_eq!(sum_f64(&a), a.iter().map(|&v| v as f64).sum::<f64>());
            let want: f32 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            assert_eq!(dot(&a, &b), want, "{len}");
            let want: f32 = a.iter().zip(&b).zip(&c).map(|((a, b), c)| a * b * c).sum();
            assert_eq!(dot3(&a, &b, &c), want, "{len}");
            let want = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&a), want, "{len}");
        }
        assert_eq!(max(&[f32::NAN, 2.0, -1.0]), 2.0);
    }
}
