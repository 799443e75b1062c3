//! `x · Wᵀ` for a frozen `W`, whose backward computes only the input gradient, in float32 even
//! when `W` is stored in half precision.
//!
//! candle's matmul backward always computes both operands' gradients; for a frozen weight the
//! weight gradient `xᵀ · dy` costs as much as the forward product and is thrown away. LoRA
//! training multiplies by frozen weights everywhere (every Linear and the LM head), so that
//! waste was a large share of a step's matrix products. candle's bfloat16 product ran far below
//! its float32 speed here; converting `W` a block of rows at a time keeps the float32 product's
//! speed without a float32 copy of the weight, and where the CPU has AVX512_BF16 a bfloat16 `W`
//! times enough rows runs on [`crate::bf16_product`] instead.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Error, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::bf16_product;
use crate::cast::{rounded_to_bf16, to_dtype, to_f32};
use crate::strided::{product, Operand, Threads};
use crate::values::{contiguous, convert, cpu_values};

/// Rows of a half-precision `W` converted to float32 at a time: a block's float32 copy stays a
/// small fraction of a large weight.
const BLOCK_ROWS: usize = 4096;

/// `x` is `[m, k]`, `w` is `[n, k]` and never trains; returns `[m, n]` in `x`'s dtype. On the
/// CPU, float32, bfloat16 and float16 run the op; anything else is candle's product.
pub fn matmul_frozen_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !on_kernel(x, w) {
        return x.matmul(&w.t()?);
    }
    check_shapes(x.dims2()?.1, w)?;
    let op: Box<dyn CustomOp1 + Send + Sync> = if bf16_product::suits(x.dim(0)?, w) {
        Box::new(FrozenMatmulBf16 { w: w.detach() })
    } else {
        Box::new(FrozenMatmulT {
            w: w.detach().contiguous()?,
        })
    };
    let y = to_f32(x)?.contiguous()?.apply_op1_arc(Arc::new(op))?;
    to_dtype(&y, x.dtype())
}

/// `dy · W` for `dy` `[m, n]` and the frozen `w` `[n, k]`, without a graph: what the backward
/// of [`matmul_frozen_t`] hands `x`, for callers that hold `dy` themselves. Float32 `[m, k]`.
pub fn frozen_input_grad(dy: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !on_kernel(dy, w) {
        return dy.to_dtype(w.dtype())?.matmul(w)?.to_dtype(DType::F32);
    }
    let (m, n) = dy.dims2()?;
    if w.dim(0)? != n {
        return Err(Error::Msg(format!(
            "gradient {:?} does not fit the weight {:?}",
            dy.shape(),
            w.shape()
        )));
    }
    let dy = dy.to_dtype(DType::F32)?.contiguous()?;
    let w = w.contiguous()?;
    let (dy_storage, dy_layout) = dy.storage_and_layout();
    let dy_values = &cpu_values(&dy_storage)?[dy_layout.start_offset()..];
    let k = w.dim(1)?;
    let (w_storage, w_layout) = w.storage_and_layout();
    let weight = WeightRows::of(&w_storage, w_layout, k)?;
    // The sum runs over W's n rows, split among the threads, each summing its share of
    // `dy[:, rows] · W[rows]` into a [m, k] of its own: the output is small when m is (the
    // loss's chunks of rows times the LM head), too few tiles for gemm to share among threads,
    // while its inner dimension (the vocabulary) is long.
    let parts = rayon::current_num_threads().max(n.div_ceil(BLOCK_ROWS));
    let part_rows = n.div_ceil(parts).max(1);
    let sums = (0..n)
        .step_by(part_rows)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|first| -> Result<Vec<f32>> {
            let mut dx = vec![0f32; m * k];
            let rows = part_rows.min(n - first);
            let block = weight.block(first, rows)?;
            // SAFETY: dy is m × n row-major; the block is `rows` rows of W; dx is m × k.
            unsafe {
                product(
                    (m, k, rows),
                    dx.as_mut_ptr(),
                    k,
                    false,
                    Operand::rows(&dy_values[first..], n),
                    Operand::rows(&block, k),
                    1.0,
                    Threads::Caller,
                );
            }
            Ok(dx)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut sums = sums.into_iter();
    let mut dx = sums.next().unwrap_or_else(|| vec![0f32; m * k]);
    for part in sums {
        dx.iter_mut().zip(&part).for_each(|(d, p)| *d += p);
    }
    Tensor::from_vec(dx, (m, k), dy.device())
}

/// `x · Wᵀ` without a graph, as the float32 values of `[m, n]`, row-major: for a caller that
/// works on the values in place (the loss turns the logits into their gradient).
pub fn matmul_frozen_t_values(x: &Tensor, w: &Tensor) -> Result<Vec<f32>> {
    if !on_kernel(x, w) {
        return x
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1();
    }
    let (m, k) = x.dims2()?;
    check_shapes(k, w)?;
    let x = to_f32(x)?.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    times_transposed(
        contiguous(cpu_values(&storage)?, layout)?,
        m,
        &w.contiguous()?,
    )
}

/// `x · wᵀ` for `x` float32 `[m, k]` row-major and the contiguous `w` `[n, k]`: `[m, n]`.
fn times_transposed(x: &[f32], m: usize, w: &Tensor) -> Result<Vec<f32>> {
    let (n, k) = w.dims2()?;
    let mut y = vec![0f32; m * n];
    for_row_blocks(w, |first, rows| {
        // SAFETY: x is m × k row-major; the block is `rows` rows of W; the product writes
        // columns first.. of y, which is m × n.
        unsafe {
            product(
                (m, rows.len() / k, k),
                y.as_mut_ptr().add(first),
                n,
                false,
                Operand::rows(x, k),
                Operand::rows(rows, k).t(),
                1.0,
                Threads::Pool,
            );
        }
    })?;
    Ok(y)
}

fn on_kernel(x: &Tensor, w: &Tensor) -> bool {
    let float = |t: &Tensor| matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16);
    x.device().is_cpu() && float(x) && float(w)
}

fn check_shapes(k: usize, w: &Tensor) -> Result<()> {
    if w.dims2()?.1 != k {
        return Err(Error::Msg(format!(
            "matmul-frozen-t: input width {k} does not fit the weight {:?}",
            w.shape()
        )));
    }
    Ok(())
}

/// Calls `f(first_row, rows)` for consecutive blocks of the contiguous `[n, k]` weight `w`,
/// `rows` its values in float32 (converted for half precision, borrowed for float32).
fn for_row_blocks(w: &Tensor, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
    let n = w.dim(0)?;
    let (storage, layout) = w.storage_and_layout();
    let weight = WeightRows::of(&storage, layout, w.dim(1)?)?;
    for first in (0..n).step_by(BLOCK_ROWS) {
        f(first, &weight.block(first, BLOCK_ROWS.min(n - first))?);
    }
    Ok(())
}

/// The rows of a contiguous `[n, k]` weight in a CPU storage.
#[derive(Clone, Copy)]
struct WeightRows<'a> {
    values: &'a CpuStorage,
    start: usize,
    k: usize,
}

impl<'a> WeightRows<'a> {
    fn of(storage: &'a Storage, layout: &Layout, k: usize) -> Result<Self> {
        match storage {
            Storage::Cpu(values) => Ok(Self {
                values,
                start: layout.start_offset(),
                k,
            }),
            _ => Err(Error::Msg("matmul-frozen-t runs on the CPU only".into())),
        }
    }

    /// Rows `first..first + rows` in float32: borrowed for float32, converted for half
    /// precision.
    fn block(self, first: usize, rows: usize) -> Result<Cow<'a, [f32]>> {
        let range = self.start + first * self.k..self.start + (first + rows) * self.k;
        Ok(match self.values {
            CpuStorage::F32(values) => Cow::Borrowed(&values[range]),
            CpuStorage::BF16(values) => Cow::Owned(convert(&values[range], |v| v.to_f32())),
            CpuStorage::F16(values) => Cow::Owned(convert(&values[range], |v| v.to_f32())),
            _ => return Err(Error::Msg("matmul-frozen-t needs a float weight".into())),
        })
    }
}

struct FrozenMatmulT {
    /// Contiguous `[n, k]`, in its stored dtype.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "matmul-frozen-t"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = x_layout.shape().dims2()?.0;
        let x = contiguous(x.as_slice::<f32>()?, x_layout)?;
        let y = times_transposed(x, m, &self.w)?;
        Ok((CpuStorage::F32(y), Shape::from((m, self.w.dim(0)?))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(frozen_input_grad(grad_y, &self.w)?))
    }
}

/// [`matmul_frozen_t`] by a bfloat16 `w` on the CPU's bf16 product: float32 in and out, the
/// input (and in backward the output's gradient) rounded to bfloat16 for the product, as a
/// bfloat16 model's activations and gradients are; sums in float32.
struct FrozenMatmulBf16 {
    /// `[n, k]`, bfloat16, suiting the bf16 product.
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulBf16 {
    fn name(&self) -> &'static str {
        "matmul-frozen-t-bf16"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let m = x_layout.shape().dims2()?.0;
        let x = rounded_to_bf16(contiguous(x.as_slice::<f32>()?, x_layout)?);
        let y = bf16_product::times_transposed(&x, m, &self.w, None)?;
        Ok((CpuStorage::F32(y), Shape::from((m, self.w.dim(0)?))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let m = x.dim(0)?;
        let grad_y = to_dtype(grad_y, DType::BF16)?;
        let dx =
            bf16_product::with_values(&grad_y, |dy| bf16_product::times(dy, m, &self.w, None))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{grads_of, max_abs_diff, normal};
    use candle_core::{Device, Var};

    #[test]
    fn equals_matmul_forward_and_input_gradient_in_every_float_dtype() {
        // More weight rows than a block, so the blocks' seams are crossed.
        let (m, k, n) = (5, 7, BLOCK_ROWS + 3);
        let x = Var::from_tensor(&normal((m, k), 0.0, 1.0, 1)).unwrap();
        let upstream = normal((m, n), 0.0, 1.0, 2);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let w = normal((n, k), 0.0, 1.0, 6).to_dtype(dtype).unwrap();
            // The reference multiplies the same (rounded) weight in float32.
            let w32 = w.to_dtype(DType::F32).unwrap();
            let ours = matmul_frozen_t(&x.as_tensor().to_dtype(dtype).unwrap(), &w)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let x_rounded = x
                .as_tensor()
                .to_dtype(dtype)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let reference = x_rounded.matmul(&w32.t().unwrap()).unwrap();
            // Half precision: one rounding of the result (an ulp is 1/32 at magnitudes 4 to 8).
            let tolerance = if dtype == DType::F32 { 1e-4 } else { 0.05 };
            assert!(max_abs_diff(&ours, &reference) < tolerance, "{dtype:?}");
            let values = matmul_frozen_t_values(x.as_tensor(), &w).unwrap();
            let values = Tensor::from_vec(values, (m, n), &Device::Cpu).unwrap();
            let reference = x.as_tensor().matmul(&w32.t().unwrap()).unwrap();
            assert!(max_abs_diff(&values, &reference) < 1e-4, "{dtype:?}");

            let ours = matmul_frozen_t(x.as_tensor(), &w).unwrap();
            let g_ours = grads_of(ours, &upstream);
            let expected = upstream.matmul(&w32).unwrap();
            let got = g_ours.get(&x).unwrap();
            assert!(max_abs_diff(got, &expected) < 1e-3, "{dtype:?}");
        }
    }

    /// Where the CPU has the bf16 product: bfloat16 in and out, within bfloat16's rounding of the
    /// float32 product of the same values.
    #[test]
    fn bfloat16_runs_on_the_bf16_product() {
        let (m, k, n) = (260, 64, 48);
        let bf = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let x = Var::from_tensor(&bf(normal((m, k), 0.0, 1.0, 3))).unwrap();
        let w = bf(normal((n, k), 0.0, 1.0, 4));
        assert_eq!(bf16_product::suits(m, &w), bf16_product::available());
        let upstream = bf(normal((m, n), 0.0, 1.0, 5));
        let wide = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let y = matmul_frozen_t(x.as_tensor(), &w).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let expected = wide(x.as_tensor()).matmul(&wide(&w).t().unwrap()).unwrap();
        // Magnitudes up to about 30: a bfloat16 step there is 0.125.
        assert!(max_abs_diff(&wide(&y), &expected) < 0.13);
        let grads = grads_of(y, &upstream);
        let dx = grads.get(&x).unwrap();
        assert_eq!(dx.dtype(), DType::BF16);
        let expected = wide(&upstream).matmul(&wide(&w)).unwrap();
        assert!(max_abs_diff(&wide(dx), &expected) < 0.13);
        let head_grad = frozen_input_grad(&wide(&upstream), &w).unwrap();
        assert_eq!(head_grad.dtype(), DType::F32);
        assert!(max_abs_diff(&head_grad, &expected) < 1e-3);
    }

    #[test]
    fn a_weight_of_another_width_is_refused() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
        let err = matmul_frozen_t(&x, &w).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}
