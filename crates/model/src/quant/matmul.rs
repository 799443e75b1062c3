//! `x Wᵀ` for a quantized `W`, chunk by chunk. Autograd would keep every float chunk alive until
//! backward; instead the product is computed on a detached `x` and joined to the graph by a
//! custom op whose backward dequantizes the chunks again for `∂L/∂x = ∂L/∂y · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, Error, Layout, Result, Shape, Tensor};

use super::QuantizedWeight;

pub(super) fn matmul_t(weight: &QuantizedWeight, x: &Tensor) -> Result<Tensor> {
    let y = forward(weight, &x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, GradThroughQuantized(weight.clone()))
}

fn forward(weight: &QuantizedWeight, x: &Tensor) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (start, end) in weight.row_chunks() {
        let w = weight.dequantize_rows(start, end, x.dtype(), x.device())?;
        parts.push(x.matmul(&w.t()?)?);
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 1)
}

/// Takes `x` and the already computed `y = x Wᵀ`; returns `y`, with `W`'s backward.
struct GradThroughQuantized(QuantizedWeight);

impl CustomOp2 for GradThroughQuantized {
    fn name(&self) -> &'static str {
        "quantized-matmul"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _x_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some((start, end)) = y_layout.contiguous_offsets() else {
            return Err(Error::Msg(
                "quantized matmul: the product is not contiguous".into(),
            ));
        };
        let out = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::BF16(v) => CpuStorage::BF16(v[start..end].to_vec()),
            CpuStorage::F16(v) => CpuStorage::F16(v[start..end].to_vec()),
            other => {
                return Err(Error::Msg(format!(
                    "quantized matmul: unsupported compute dtype {:?}",
                    other.dtype()
                )))
            }
        };
        Ok((out, y_layout.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let weight = &self.0;
        let mut grad_x: Option<Tensor> = None;
        for (start, end) in weight.row_chunks() {
            let w = weight.dequantize_rows(start, end, grad_res.dtype(), grad_res.device())?;
            let part = grad_res.narrow(1, start, end - start)?.matmul(&w)?;
            grad_x = Some(match grad_x {
                Some(acc) => (acc + part)?,
                None => part,
            });
        }
        Ok((grad_x, None))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FourBitType, QuantFormat};
    use super::*;
    use crate::test_util::normal;
    use candle_core::{DType, Device, Var};

    /// A weight of several chunks: the chunked product and its gradient equal the dense ones
    /// computed from the dequantized matrix.
    #[test]
    fn chunked_product_and_input_gradient_match_the_dense_ones() {
        let device = Device::Cpu;
        let cols = 4096;
        let rows = 3 * super::super::CHUNK_ELEMENTS / cols + 5;
        let w = normal((rows, cols), 0.0, 0.02, 1);
        let format = QuantFormat::FourBit {
            kind: FourBitType::Nf4,
            double_quant: true,
        };
        let q = QuantizedWeight::quantize(&w, format).unwrap();
        assert!(q.row_chunks().count() > 3);
        let dense = q.dequantize(DType::F32, &device).unwrap();
        let x = Var::from_tensor(&normal((3, cols), 0.0, 1.0, 2)).unwrap();
        let up = normal((3, rows), 0.0, 1.0, 3);

        let y = q.matmul_t(x.as_tensor()).unwrap();
        let y_dense = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
        let grad = (y.clone() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad_dense = (y_dense.clone() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = crate::test_util::max_abs_diff;
        assert!(diff(&y, &y_dense) < 1e-4);
        let (g, gd) = (grad.get(&x).unwrap(), grad_dense.get(&x).unwrap());
        assert!(diff(g, gd) < 1e-4, "{}", diff(g, gd));
    }

    #[test]
    fn half_precision_compute_follows_the_input_dtype() {
        let w = normal((96, 128), 0.0, 0.02, 4);
        let q = QuantizedWeight::quantize(&w, QuantFormat::Int8Rowwise).unwrap();
        let x32 = normal((5, 128), 0.0, 1.0, 5);
        let y32 = q.matmul_t(&x32).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
            let y = q.matmul_t(x.as_tensor()).unwrap();
            assert_eq!(y.dtype(), dtype);
            let grads = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(grads.get(&x).unwrap().dtype(), dtype);
            let err = crate::test_util::max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &y32);
            assert!(err < 0.05, "{dtype:?}: {err}");
        }
    }
}
