//! Random weights that every process draws alike, so data-parallel ranks start from one model
//! (as they would from a checkpoint) and a run's losses can be compared with another's.
//! candle's own random tensors cannot be seeded on the CPU.

use candle_core::{DType, Device, Tensor};
use ff_model::load::TensorSource;

/// Norm weights 1, biases 0, everything else uniform with standard deviation 0.02 (the usual
/// `initializer_range`), drawn from a generator seeded by the tensor's name.
pub(super) struct SeededInit;

const STD: f32 = 0.02;

impl TensorSource for SeededInit {
    fn tensor(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> ff_model::Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::ones(shape, DType::F32, device)?
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, device)?
        } else {
            let count = shape.iter().product();
            Tensor::from_vec(uniform(name_seed(name), count), shape, device)?
        };
        Ok(t.to_dtype(dtype)?)
    }
}

/// FNV-1a of the name.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `count` values uniform on [-a, a] with a = √3 · STD, which gives standard deviation STD.
fn uniform(seed: u64, count: usize) -> Vec<f32> {
    let half_width = 3f32.sqrt() * STD;
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = ff_model::dropout::derive_seed(state, 1);
            // The top 24 bits: a uniform float in [0, 1) with every step representable.
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * unit - 1.0) * half_width
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_same_values_with_the_intended_spread() {
        let a = uniform(name_seed("model.layers.0.mlp.up_proj.weight"), 100_000);
        assert_eq!(
            a,
            uniform(name_seed("model.layers.0.mlp.up_proj.weight"), 100_000)
        );
        assert_ne!(
            a,
            uniform(name_seed("model.layers.1.mlp.up_proj.weight"), 100_000)
        );
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let std = (a.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
        assert!(mean.abs() < 1e-3, "{mean}");
        assert!((std - STD).abs() < 1e-3, "{std}");
    }
}
