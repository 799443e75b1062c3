//! Casts between the model's bfloat16 and the fused kernels' float32, both ways, with gradients.
//!
//! candle casts float32 to bfloat16 one element at a time through a call to the CPU's
//! conversion instruction that cannot be inlined; in a bfloat16 LoRA step that call showed in
//! profiles, most of it in the backward of casts into the kernels. Round-to-nearest-even on the
//! bits is a plain loop the compiler vectorizes, and widening is a shift.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::bf16;

use crate::values::{contiguous, convert};

/// `x` (float32) in `dtype`; bfloat16 on the CPU through the loop here, anything else through
/// candle's cast. The gradient is widened back to float32.
pub fn to_dtype(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::BF16 && x.dtype() == DType::F32 && x.device().is_cpu() {
        x.contiguous()?.apply_op1_arc(Arc::new(Box::new(ToBf16)))
    } else {
        x.to_dtype(dtype)
    }
}

/// `x` in float32; from bfloat16 on the CPU through the loop here, whose backward rounds the
/// gradient to bfloat16 with [`to_dtype`]; anything else through candle's cast.
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::BF16 && x.device().is_cpu() {
        x.contiguous()?.apply_op1_arc(Arc::new(Box::new(FromBf16)))
    } else {
        x.to_dtype(DType::F32)
    }
}

/// bfloat16 nearest to `value`, ties to even; NaN stays NaN (quieted).
fn round_to_bf16(value: f32) -> bf16 {
    let bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return bf16::from_bits((bits >> 16) as u16 | 0x0040);
    }
    let lsb = (bits >> 16) & 1;
    bf16::from_bits((bits.wrapping_add(0x7fff + lsb) >> 16) as u16)
}

/// `values` rounded to bfloat16.
pub(crate) fn rounded_to_bf16(values: &[f32]) -> Vec<bf16> {
    convert(values, round_to_bf16)
}

struct ToBf16;

impl CustomOp1 for ToBf16 {
    fn name(&self) -> &'static str {
        "to-bf16"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(x.as_slice::<f32>()?, layout)?;
        Ok((CpuStorage::BF16(rounded_to_bf16(x)), layout.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.to_dtype(DType::F32)?))
    }
}

struct FromBf16;

impl CustomOp1 for FromBf16 {
    fn name(&self) -> &'static str {
        "from-bf16"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(x.as_slice::<bf16>()?, layout)?;
        Ok((
            CpuStorage::F32(convert(x, |v| v.to_f32())),
            layout.shape().clone(),
        ))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(to_dtype(grad, DType::BF16)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{grads_of, normal};
    use candle_core::{Device, Var};

    #[test]
    fn rounds_as_candle_does_and_passes_the_gradient_back() {
        let dev = Device::Cpu;
        let mut values: Vec<f32> = normal(4096, 0.0, 10.0, 2).to_vec1().unwrap();
        // Ties (the lower half exactly 0x8000) both ways, infinities, a NaN, the largest finite.
        values.extend([
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -0.0,
        ]);
        let x = Var::from_tensor(&Tensor::new(values.as_slice(), &dev).unwrap()).unwrap();
        let ours = to_dtype(x.as_tensor(), DType::BF16).unwrap();
        let expected: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(ours.to_vec1::<bf16>().unwrap(), expected);
        assert!(round_to_bf16(f32::NAN).is_nan());

        let upstream = Tensor::new(values.as_slice(), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let grads = grads_of(ours, &upstream);
        let g = grads.get(&x).unwrap();
        assert_eq!(g.dtype(), DType::F32);
        assert_eq!(g.dims(), &[values.len()]);
    }

    #[test]
    fn casts_to_f32_exactly_and_rounds_the_gradient_to_bf16() {
        let values = normal(1000, 0.0, 10.0, 1);
        let x = Var::from_tensor(&values.to_dtype(DType::BF16).unwrap()).unwrap();
        let wide = to_f32(x.as_tensor()).unwrap();
        assert_eq!(
            wide.to_vec1::<f32>().unwrap(),
            x.as_tensor()
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let grads = grads_of(wide, &values);
        let g = grads.get(&x).unwrap();
        assert_eq!(g.dtype(), DType::BF16);
        assert_eq!(
            g.to_vec1::<bf16>().unwrap(),
            values
                .to_dtype(DType::BF16)
                .unwrap()
                .to_vec1::<bf16>()
                .unwrap()
        );
    }
}
