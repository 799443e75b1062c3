//! `x Wᵀ` for a frozen `W` kept quantized in memory (QLoRA), chunk by chunk of `W`'s rows, so a
//! whole float copy of the weight never exists. Autograd would keep every float chunk alive until
//! backward; instead the product is computed on a detached `x` and joined to the graph by a
//! custom op whose backward dequantizes the chunks again for `∂L/∂x = ∂L/∂y · W`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Error, Layout, Result, Shape, Tensor};

/// Weight values dequantized together inside a product: about 1 MiB of float32 scratch per chunk.
const CHUNK_ELEMENTS: usize = 1 << 18;

/// A frozen `[rows, cols]` weight stored in a compressed format, whose rows the product reads a
/// chunk at a time. Cloning should be cheap (shared storage): the backward keeps a clone.
pub trait DequantizeRows: Clone + Send + Sync + 'static {
    /// `[rows, cols]`.
    fn dims(&self) -> [usize; 2];

    /// Rows `start..end` as a `[end - start, cols]` tensor in `dtype` on `device`.
    fn dequantize_rows(
        &self,
        start: usize,
        end: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;
}

/// `x Wᵀ` for `x` `[n, cols]`, in `x`'s dtype; differentiable with respect to `x`. Any device
/// candle multiplies on: the rows are dequantized where `x` lives.
pub fn quantized_matmul_t<W: DequantizeRows>(weight: &W, x: &Tensor) -> Result<Tensor> {
    let y = forward(weight, &x.detach())?;
    if !x.track_op() {
        return Ok(y);
    }
    x.apply_op2(&y, GradThroughQuantized(weight.clone()))
}

/// Row ranges of `weight` dequantized together.
fn row_chunks(weight: &impl DequantizeRows) -> impl Iterator<Item = (usize, usize)> {
    let [rows, cols] = weight.dims();
    let step = (CHUNK_ELEMENTS / cols.max(1)).max(1);
    (0..rows)
        .step_by(step)
        .map(move |start| (start, (start + step).min(rows)))
}

fn forward(weight: &impl DequantizeRows, x: &Tensor) -> Result<Tensor> {
    let mut parts = Vec::new();
    for (start, end) in row_chunks(weight) {
        let w = weight.dequantize_rows(start, end, x.dtype(), x.device())?;
        parts.push(x.matmul(&w.t()?)?);
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 1)
}

/// Takes `x` and the already computed `y = x Wᵀ`; returns `y`, with `W`'s backward.
struct GradThroughQuantized<W>(W);

impl<W: DequantizeRows> CustomOp2 for GradThroughQuantized<W> {
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
        for (start, end) in row_chunks(weight) {
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
    use std::sync::Arc;

    use super::*;
    use crate::test_util::{max_abs_diff, normal};
    use candle_core::Var;

    /// A weight in row-wise int8 (each row scaled by its absmax to ±127), decoded by
    /// [`crate::dequantize::int8_rowwise`].
    #[derive(Clone)]
    struct Int8Rows {
        rows: usize,
        cols: usize,
        codes: Arc<Vec<u8>>,
        row_absmax: Arc<Vec<f32>>,
    }

    impl Int8Rows {
        fn quantize(w: &Tensor) -> Self {
            let (rows, cols) = w.dims2().unwrap();
            let values: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
            let mut codes = Vec::with_capacity(values.len());
            let mut row_absmax = Vec::with_capacity(rows);
            for row in values.chunks(cols) {
                let absmax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                row_absmax.push(absmax);
                codes.extend(row.iter().map(|v| (v * 127.0 / absmax).round() as i8 as u8));
            }
            Self {
                rows,
                cols,
                codes: Arc::new(codes),
                row_absmax: Arc::new(row_absmax),
            }
        }
    }

    impl DequantizeRows for Int8Rows {
        fn dims(&self) -> [usize; 2] {
            [self.rows, self.cols]
        }

        fn dequantize_rows(
            &self,
            start: usize,
            end: usize,
            dtype: DType,
            device: &Device,
        ) -> Result<Tensor> {
            let mut values = Vec::new();
            let range = start * self.cols..end * self.cols;
            crate::dequantize::int8_rowwise(
                &self.codes,
                &self.row_absmax,
                self.cols,
                range,
                &mut values,
            );
            Tensor::from_vec(values, (end - start, self.cols), device)?.to_dtype(dtype)
        }
    }

    /// A weight of several chunks: the chunked product and its gradient equal the dense ones
    /// computed from the dequantized matrix.
    #[test]
    fn chunked_product_and_input_gradient_match_the_dense_ones() {
        let device = Device::Cpu;
        let cols = 4096;
        let rows = 3 * CHUNK_ELEMENTS / cols + 5;
        let q = Int8Rows::quantize(&normal((rows, cols), 0.0, 0.02, 1));
        assert!(row_chunks(&q).count() > 3);
        let dense = q.dequantize_rows(0, rows, DType::F32, &device).unwrap();
        let x = Var::from_tensor(&normal((3, cols), 0.0, 1.0, 2)).unwrap();
        let up = normal((3, rows), 0.0, 1.0, 3);

        let y = quantized_matmul_t(&q, x.as_tensor()).unwrap();
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
        assert!(max_abs_diff(&y, &y_dense) < 1e-4);
        let (g, gd) = (grad.get(&x).unwrap(), grad_dense.get(&x).unwrap());
        assert!(max_abs_diff(g, gd) < 1e-4, "{}", max_abs_diff(g, gd));
    }

    #[test]
    fn half_precision_compute_follows_the_input_dtype() {
        let q = Int8Rows::quantize(&normal((96, 128), 0.0, 0.02, 4));
        let x32 = normal((5, 128), 0.0, 1.0, 5);
        let y32 = quantized_matmul_t(&q, &x32).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
            let y = quantized_matmul_t(&q, x.as_tensor()).unwrap();
            assert_eq!(y.dtype(), dtype);
            let grads = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(grads.get(&x).unwrap().dtype(), dtype);
            let err = max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &y32);
            assert!(err < 0.05, "{dtype:?}: {err}");
        }
    }
}
