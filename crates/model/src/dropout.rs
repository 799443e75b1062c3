//! Dropout whose mask is a pure function of a seed.
//!
//! Gradient checkpointing recomputes each layer's forward during backward; the recomputation must
//! drop exactly the same elements as the first pass, so masks are derived from (seed, site) with a
//! counter-based generator instead of a stateful one.

use candle_core::{Result, Tensor};

/// splitmix64: a small, well-mixed generator; good enough for dropout masks.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Mixes a site identifier into a seed so that each dropout call gets its own stream.
pub fn derive_seed(seed: u64, site: u64) -> u64 {
    let mut s = seed ^ site.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s)
}

/// Zeroes each element with probability `p` and scales survivors by 1/(1-p), as torch does.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let keep = 1.0 - p;
    let mut state = seed;
    let scale = 1.0 / keep;
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| {
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 24) as f32;
            if u < keep {
                scale
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn same_seed_same_mask_and_rate_close_to_p() {
        let x = Tensor::ones(10_000, candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = dropout(&x, 0.25, 7).unwrap().to_vec1::<f32>().unwrap();
        let b = dropout(&x, 0.25, 7).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b);
        let dropped = a.iter().filter(|&&v| v == 0.0).count() as f64 / a.len() as f64;
        assert!((dropped - 0.25).abs() < 0.02, "{dropped}");
        assert!(a.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
        let c = dropout(&x, 0.25, 8).unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(a, c);
    }
}
