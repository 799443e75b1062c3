//! `x Wᵀ + s · (x Aᵀ) Bᵀ`, a frozen Linear with its LoRA adapter, as one op with its own
//! backward.
//!
//! From candle's ops the adapter added two products, a scale and an add to the frozen product,
//! and in backward a zero-filled gradient and an add per operand of each, several passes over
//! `[tokens, out]` per Linear. Here the adapter's product accumulates into the frozen product's
//! output, and the backward computes the input's gradient and the two adapter gradients from
//! the output's gradient and nothing else (the frozen weight's gradient is never formed).

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, CustomOp3, DType, Error, Layout, Result, Shape, Storage, Tensor, D};

use crate::bf16_product::{self, LowRank};
use crate::cast::{rounded_to_bf16, to_dtype, to_f32};
use crate::strided::{
    overwritten, product, readable_as_matrix, rows_and_width, with_width, Operand, Threads,
};
use crate::values::{contiguous, cpu_values, float32_values, kept_values};
use crate::Output;

/// `x` is `[..., k]`, `w` the frozen `[n, k]`, `a` the adapter's float32 `[r, k]` and `b` its
/// `[n, r]`; returns `x wᵀ + scale · (x aᵀ) bᵀ` as `[..., n]` in `x`'s dtype. The leading
/// dimensions are rows read in place: a `[batch, seq, k]` input needs no reshape, a node whose
/// backward would cost a zeroed buffer and an add over the whole gradient. The products run in
/// float32: half-precision `x` is converted (its gradient converted back by autograd) and a
/// half-precision `w` is converted for each product into a buffer freed right after, so the
/// frozen weights stay in their dtype. `None` when the op has no kernel for these tensors (not on
/// the CPU, or another dtype), and the caller uses candle's ops. With [`Output::Unread`] the
/// result is zeros and only the backward works.
pub fn lora_product(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    output: Output,
) -> Result<Option<Tensor>> {
    let float = |t: &Tensor| matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16);
    if !x.device().is_cpu()
        || !float(x)
        || !float(w)
        || a.dtype() != DType::F32
        || b.dtype() != DType::F32
    {
        return Ok(None);
    }
    if x.rank() < 2 {
        return Err(Error::Msg(format!(
            "LoRA product of an input of shape {:?}: it needs rows",
            x.shape()
        )));
    }
    let k = x.dim(D::Minus1)?;
    let (n, w_k) = w.dims2()?;
    let (r, a_k) = a.dims2()?;
    if w_k != k || a_k != k || b.dims2()? != (n, r) {
        return Err(Error::Msg(format!(
            "LoRA product of x {:?} with weight {:?}, A {:?} and B {:?}",
            x.shape(),
            w.shape(),
            a.shape(),
            b.shape()
        )));
    }
    let op = LoraProduct {
        w: w.detach(),
        scale: scale as f32,
        on_bf16_product: bf16_product::suits(x.elem_count() / k, w),
        output,
        down: OnceLock::new(),
    };
    let x_in = readable_as_matrix(to_f32(x)?)?;
    let y = x_in.apply_op3_arc(a, b, Arc::new(Box::new(op)))?;
    Ok(Some(to_dtype(&y, x.dtype())?))
}

struct LoraProduct {
    /// Frozen: read in forward and backward, never given a gradient.
    w: Tensor,
    scale: f32,
    /// The frozen products run on the bf16 product, their float32 operands rounded to
    /// bfloat16 (as a bfloat16 model's activations and gradients are).
    on_bf16_product: bool,
    output: Output,
    /// `x aᵀ` as the forward computed it, for the backward (`m × r`, small at a LoRA rank);
    /// absent when the forward handed on other values.
    down: OnceLock<Vec<f32>>,
}

/// The frozen weight's values in float32.
fn weight_values(storage: &Storage) -> Result<Cow<'_, [f32]>> {
    match storage {
        Storage::Cpu(cpu) => float32_values(cpu),
        _ => Err(Error::Msg("the LoRA product runs on the CPU only".into())),
    }
}

/// `x aᵀ`, `[m, r]`: the adapter's narrow middle. On the calling thread: a product this narrow
/// ran faster there than shared.
fn down_projection(x: Operand, a: Operand, m: usize, r: usize, k: usize) -> Vec<f32> {
    // SAFETY: x is m × k and a is r × k as their views say; the product writes all m × r.
    unsafe {
        overwritten(m * r, |xa| {
            product((m, r, k), xa, r, false, x, a.t(), 1.0, Threads::Caller)
        })
    }
}

impl LoraProduct {
    /// `lhs · W' + scale · left · right` as a new row-major `[m, cols]`, where `W'` is the frozen
    /// weight transposed (forward) or as it is (the input's gradient), `lhs` is `[m, inner]`,
    /// `left` the adapter's narrow `[m, r]` and `right` its `[r, cols]`. On the bf16 product
    /// `lhs` is rounded to bfloat16 and the adapter's term added in float32 as the product's
    /// tiles are stored; otherwise both are float32 products.
    fn frozen_plus_adapter(
        &self,
        (lhs_values, lhs_layout): (&[f32], &Layout),
        transposed: bool,
        (m, cols, inner, r): (usize, usize, usize, usize),
        left: &[f32],
        right: Operand,
    ) -> Result<Vec<f32>> {
        if self.on_bf16_product {
            let lhs = rounded_to_bf16(contiguous(lhs_values, lhs_layout)?);
            // SAFETY: right is r × cols as its view says.
            let right = unsafe { right.scaled_copy((r, cols), self.scale) };
            let adapter = Some(LowRank {
                left,
                right: &right,
                rank: r,
            });
            return if transposed {
                bf16_product::times_transposed(&lhs, m, &self.w, adapter)
            } else {
                bf16_product::times(&lhs, m, &self.w, adapter)
            };
        }
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let w_values = weight_values(&w_storage)?;
        let w = Operand::matrix(&w_values, w_layout)?;
        let lhs = Operand::matrix(lhs_values, lhs_layout)?;
        let w = if transposed { w.t() } else { w };
        // SAFETY: lhs, w and right are read through their layouts, left is m × r; the first
        // product writes all m × cols of out, the second adds to it.
        let out = unsafe {
            overwritten(m * cols, |out| {
                product(
                    (m, cols, inner),
                    out,
                    cols,
                    false,
                    lhs,
                    w,
                    1.0,
                    Threads::Pool,
                );
                product(
                    (m, cols, r),
                    out,
                    cols,
                    true,
                    Operand::rows(left, r),
                    right,
                    self.scale,
                    Threads::Pool,
                );
            })
        };
        Ok(out)
    }
}

impl CustomOp3 for LoraProduct {
    fn name(&self) -> &'static str {
        "lora-product"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        a: &CpuStorage,
        a_layout: &Layout,
        b: &CpuStorage,
        b_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = rows_and_width(x_layout.shape());
        let (r, n) = (a_layout.dims()[0], b_layout.dims()[0]);
        let shape = with_width(x_layout.shape(), n);
        match &self.output {
            Output::Unread => return Ok((CpuStorage::F32(vec![0.0; m * n]), shape)),
            Output::Kept(y) => return Ok((CpuStorage::F32(kept_values(y, m * n)?), shape)),
            Output::Values => {}
        }
        // x is float32: lora_product widens it before the op.
        let x_values = x.as_slice::<f32>()?;
        let x_op = Operand::matrix(x_values, x_layout)?;
        let a = Operand::matrix(a.as_slice()?, a_layout)?;
        let b = Operand::matrix(b.as_slice()?, b_layout)?;
        let xa = self.down.get_or_init(|| down_projection(x_op, a, m, r, k));
        // y = x Wᵀ + s · (x Aᵀ) Bᵀ
        let y = self.frozen_plus_adapter((x_values, x_layout), true, (m, n, k, r), xa, b.t())?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, k) = rows_and_width(x.shape());
        let (r, n) = (a.dim(0)?, b.dim(0)?);
        let grad_y = grad_y.to_dtype(DType::F32)?.contiguous()?;
        let (x_storage, x_layout) = x.storage_and_layout();
        let (a_storage, a_layout) = a.storage_and_layout();
        let (b_storage, b_layout) = b.storage_and_layout();
        let (dy_storage, dy_layout) = grad_y.storage_and_layout();
        let x_op = Operand::matrix(cpu_values(&x_storage)?, x_layout)?;
        let a_op = Operand::matrix(cpu_values(&a_storage)?, a_layout)?;
        let b_op = Operand::matrix(cpu_values(&b_storage)?, b_layout)?;
        let dy_values = cpu_values(&dy_storage)?;
        let dy = Operand::matrix(dy_values, dy_layout)?;
        let s = self.scale;
        // The backward's own small products ran at a fraction of the frozen product's speed:
        // the forward's `x Aᵀ` spares one of them.
        let xa = match self.down.get() {
            Some(xa) => Cow::Borrowed(xa.as_slice()),
            None => Cow::Owned(down_projection(x_op, a_op, m, r, k)),
        };
        // SAFETY: every operand is read through its own layout; each product writes all of the
        // row-major result it fills.
        let (dy_b, da, db) = unsafe {
            // dy B, [m, r]
            let dy_b = overwritten(m * r, |out| {
                product((m, r, n), out, r, false, dy, b_op, 1.0, Threads::Pool)
            });
            // dA = s · (dy B)ᵀ x
            let da = overwritten(r * k, |out| {
                let dy_b = Operand::rows(&dy_b, r).t();
                product((r, k, m), out, k, false, dy_b, x_op, s, Threads::Pool)
            });
            // dB = s · dyᵀ (x Aᵀ), formed as its transpose s · (x Aᵀ)ᵀ dy: gemm reads dy by
            // rows that way, much faster here than down its columns.
            let db_t = overwritten(r * n, |out| {
                let xa = Operand::rows(&xa, r).t();
                product((r, n, m), out, n, false, xa, dy, s, Threads::Pool)
            });
            let db = Operand::rows(&db_t, n).t().scaled_copy((n, r), 1.0);
            (dy_b, da, db)
        };
        // dx = dy W + s · (dy B) A
        let dx =
            self.frozen_plus_adapter((dy_values, dy_layout), false, (m, k, n, r), &dy_b, a_op)?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(da, (r, k), device)?),
            Some(Tensor::from_vec(db, (n, r), device)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{grads_of, max_abs_diff, sine};
    use candle_core::{Device, Var};

    #[test]
    fn equals_candle_ops_forward_and_backward() {
        let (m, k, n, r) = (37, 24, 19, 4);
        // Fixed inputs: random ones of magnitude past 3 occasionally summed to a float32
        // rounding difference over the bound (1 CI run in a few).
        let var =
            |shape: (usize, usize), phase: f32| Var::from_tensor(&sine(shape, phase)).unwrap();
        let (x, a, b) = (var((m, k), 0.2), var((r, k), 1.1), var((n, r), 2.3));
        // W stored transposed, as a view: the op must read it through its strides.
        let w_stored = sine((k, n), 0.5);
        let w = w_stored.t().unwrap();
        let scale = 2.5;
        let upstream = sine((m, n), 1.7);

        let ours = lora_product(
            x.as_tensor(),
            &w,
            a.as_tensor(),
            b.as_tensor(),
            scale,
            Output::Values,
        )
        .unwrap()
        .unwrap();
        let t = |v: &Var| v.as_tensor().t().unwrap();
        let lora = x
            .as_tensor()
            .matmul(&t(&a))
            .unwrap()
            .matmul(&t(&b))
            .unwrap();
        let reference =
            (x.as_tensor().matmul(&w.t().unwrap()).unwrap() + (lora * scale).unwrap()).unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-4);
        let g_ours = grads_of(ours, &upstream);
        let g_ref = grads_of(reference, &upstream);
        // Unread: zeros, and the same gradients.
        let unread = lora_product(
            x.as_tensor(),
            &w,
            a.as_tensor(),
            b.as_tensor(),
            scale,
            Output::Unread,
        )
        .unwrap()
        .unwrap();
        assert_eq!(unread.dims(), &[m, n]);
        assert_eq!(max_abs_diff(&unread, &unread.zeros_like().unwrap()), 0.0);
        let g_unread = grads_of(unread, &upstream);
        for var in [&x, &a, &b] {
            let (got, want) = (g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(
                max_abs_diff(got, want) < 1e-4,
                "{}",
                max_abs_diff(got, want)
            );
            assert_eq!(max_abs_diff(g_unread.get(var).unwrap(), got), 0.0);
        }
    }

    /// Every element of `got` within one bfloat16 rounding of `want` (2⁻⁸ relative), with room
    /// for float32 summation order.
    fn within_bf16_rounding(got: &Tensor, want: &Tensor) -> bool {
        let got: Vec<f32> = got
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
        got.iter()
            .zip(&want)
            .all(|(g, w)| (g - w).abs() <= w.abs() / 256.0 + 1e-4)
    }

    #[test]
    fn half_precision_runs_in_float32_and_mismatched_adapters_are_refused() {
        let dev = Device::Cpu;
        // n odd: the float32 path after converting; 260 rows and n even: the bf16 product where
        // the CPU has it.
        for (m, k, n, r) in [(5, 6, 7, 2), (260, 6, 8, 2)] {
            let x = Var::from_tensor(&sine((m, k), 0.1)).unwrap();
            let w = sine((n, k), 1.3);
            let a = Var::from_tensor(&sine((r, k), 2.1)).unwrap();
            let b = Var::from_tensor(&sine((n, r), 0.7)).unwrap();
            let upstream = sine((m, n), 2.9);
            let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let x_half = Var::from_tensor(&bf16(x.as_tensor())).unwrap();
            let half = lora_product(&x_half, &bf16(&w), &a, &b, 0.5, Output::Values)
                .unwrap()
                .unwrap();
            assert_eq!(half.dtype(), DType::BF16);
            // The same product of the bfloat16-rounded inputs in float32, rounded once.
            let (x_wide, w_wide) = (f32(x_half.as_tensor()), f32(&bf16(&w)));
            let expected = lora_product(&x_wide, &w_wide, &a, &b, 0.5, Output::Values)
                .unwrap()
                .unwrap();
            assert!(within_bf16_rounding(&half, &expected), "n = {n}");
            let grads = grads_of(half, &bf16(&upstream));
            let dx = grads.get(&x_half).unwrap();
            assert_eq!(dx.dtype(), DType::BF16);
            let expected = f32(&bf16(&upstream))
                .matmul(&w_wide)
                .unwrap()
                .add(
                    &(f32(&bf16(&upstream))
                        .matmul(b.as_tensor())
                        .unwrap()
                        .matmul(a.as_tensor())
                        .unwrap()
                        * 0.5)
                        .unwrap(),
                )
                .unwrap();
            assert!(within_bf16_rounding(dx, &expected), "n = {n}");
        }
        let (x, w) = (
            Tensor::zeros((5, 6), DType::F32, &dev).unwrap(),
            Tensor::zeros((7, 6), DType::F32, &dev).unwrap(),
        );
        let (a, b) = (
            Tensor::zeros((2, 6), DType::F32, &dev).unwrap(),
            Tensor::zeros((7, 2), DType::F32, &dev).unwrap(),
        );
        let err = lora_product(&x, &w, &a, &b.t().unwrap(), 1.0, Output::Values).unwrap_err();
        assert!(err.to_string().contains("LoRA product"), "{err}");
    }
}
