//! `exp` over a slice of float32 as a plain loop the compiler vectorizes.
//!
//! Softmax rows (attention's scores, the 49k logits of every label position) and SiLU call
//! `exp` for every element; the C library's `expf` is a call per element, which no loop can
//! vectorize. This is Cephes' single-precision exp: a degree-7 polynomial on the remainder after
//! taking out powers of two, within two units in the last place of `f32::exp`, branch-free so
//! that it runs 4 or more lanes at a time.

/// `values[i] = exp(values[i] − shift)`, exactly 0 where that is below float32's smallest
/// normal exponent (as for masked scores).
pub fn exp_shifted(values: &mut [f32], shift: f32) {
    for v in values.iter_mut() {
        *v = exp(*v - shift);
    }
}

/// `exp(x)`, 0 below −87; inlined so that loops calling it vectorize.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n · LN2_HIGH is exact.
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer in float arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let n = (clamped * LOG2E + ROUND) - ROUND;
    let r = clamped - n * LN2_HIGH - n * LN2_LOW;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let poly = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        poly * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_two_ulps_of_std_and_zero_far_below() {
        let inputs: Vec<f32> = (0..200_001)
            .map(|i| -87.0 + i as f32 * (175.0 / 200_000.0))
            .collect();
        let mut ours = inputs.clone();
        exp_shifted(&mut ours, 0.0);
        for (&x, &got) in inputs.iter().zip(&ours) {
            let want = x.exp();
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 2, "exp({x}) = {got}, std {want}");
        }
        let mut masked = [f32::MIN, -1e30, -100.0, 0.5];
        exp_shifted(&mut masked, 0.5);
        assert_eq!(&masked[..3], &[0.0, 0.0, 0.0]);
        assert_eq!(masked[3], 1.0);
    }
}
