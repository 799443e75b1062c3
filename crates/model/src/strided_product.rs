//! Float32 matrix products over views of tensors in place, for the fused ops' CPU kernels: they
//! call `gemm` (the crate candle's own product uses) with each operand's strides, so transposes
//! and heads cost no copies and a product can add into a result already there.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Error, Layout, Result, Shape, Storage, Tensor};
use gemm::{gemm, Parallelism};

use crate::narrow::convert;

/// A matrix read in place: its first element and the steps between rows and between columns.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl Operand {
    /// A row-major `rows × row_stride` block starting at `values[0]`.
    pub fn rows(values: &[f32], row_stride: usize) -> Self {
        Self {
            ptr: values.as_ptr(),
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The 2-D tensor of `layout` over `values` (its storage's whole slice), or a contiguous
    /// tensor of higher rank read as rows of its last dimension (`[batch, seq, width]` as
    /// `[batch · seq, width]`, with no reshape in the graph).
    pub fn matrix(values: &[f32], layout: &Layout) -> Result<Self> {
        if let &[row_stride, col_stride] = layout.stride() {
            return Ok(Self {
                ptr: values[layout.start_offset()..].as_ptr(),
                row_stride: row_stride as isize,
                col_stride: col_stride as isize,
            });
        }
        match layout.dims() {
            [_, _, .., width] if layout.is_contiguous() => {
                Ok(Self::rows(&values[layout.start_offset()..], *width))
            }
            _ => Err(Error::Msg(format!(
                "expected a matrix or a contiguous tensor, got shape {:?} with strides {:?}",
                layout.shape(),
                layout.stride()
            ))),
        }
    }

    /// `scale` times the view's first `rows × cols` values, copied row-major.
    ///
    /// # Safety
    /// Every element the strides reach must lie inside the allocation `ptr` points into.
    pub unsafe fn scaled_copy(self, (rows, cols): (usize, usize), scale: f32) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * cols);
        for i in 0..rows as isize {
            for j in 0..cols as isize {
                out.push(scale * *self.ptr.offset(i * self.row_stride + j * self.col_stride));
            }
        }
        out
    }

    /// The same matrix transposed, still in place.
    pub fn t(self) -> Self {
        Self {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }
}

/// Whether one product runs on rayon's pool or on the calling thread alone (when the caller
/// already spreads its products over the pool).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Threads {
    Pool,
    Caller,
}

/// `dst (m × n) = [dst +] scale · lhs (m × k) · rhs (k × n)`; `dst` is row-major with rows
/// `dst_row_stride` apart; `accumulate` keeps what `dst` holds and adds to it.
///
/// # Safety
/// Every element the strides reach must lie inside the allocation its pointer points into, and
/// no other thread may touch the elements of `dst` written.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: usize,
    accumulate: bool,
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    threads: Threads,
) {
    let parallelism = match threads {
        Threads::Pool => match rayon::current_num_threads() {
            1 => Parallelism::None,
            n => Parallelism::Rayon(n),
        },
        Threads::Caller => Parallelism::None,
    };
    gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride as isize,
        accumulate,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        parallelism,
    )
}

/// `t` as [`Operand::matrix`] can read it: a 2-D tensor with any strides as it is, one of higher
/// rank made contiguous (a copy only when it is not already).
pub(crate) fn readable_as_matrix(t: Tensor) -> Result<Tensor> {
    match t.rank() {
        2 => Ok(t),
        _ => t.contiguous(),
    }
}

/// `(rows, width)` of a tensor read as rows of its last dimension.
pub(crate) fn rows_and_width(shape: &Shape) -> (usize, usize) {
    let width = shape.dims().last().copied().unwrap_or(1).max(1);
    (shape.elem_count() / width, width)
}

/// `shape` with its last dimension replaced by `width`: a product's output for rows of `shape`.
pub(crate) fn with_width(shape: &Shape, width: usize) -> Shape {
    let mut dims = shape.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = width;
    }
    Shape::from(dims)
}

/// A buffer of `len` values filled by `fill`, which gets its first element and must write every
/// one: typically a product that does not accumulate (`gemm` never reads such a destination), so
/// the buffer is not zeroed first, a pass over it that the product makes anyway.
///
/// # Safety
/// `fill` must write all `len` values.
pub(crate) unsafe fn overwritten(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    // SAFETY: the caller's promise, passed on.
    unsafe { written(len, |out| fill(out.as_mut_ptr().cast())) }
}

/// A buffer of `len` values that `fill` writes into the uninitialised slice it gets: the fused
/// ops' outputs, each value computed once, which `vec![0.0; len]` would zero in a pass of its
/// own first.
///
/// # Safety
/// `fill` must write all `len` values.
pub(crate) unsafe fn written(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the caller's promise: every value is written.
    unsafe { out.set_len(len) };
    out
}

/// The part of `values` (a storage's whole slice) that the contiguous `layout` covers; the fused
/// ops make their inputs contiguous before they read them this way.
pub(crate) fn contiguous<'a, T>(values: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        Error::Msg(format!(
            "expected a contiguous tensor, got strides {:?} for shape {:?}",
            layout.stride(),
            layout.shape()
        ))
    })?;
    Ok(&values[start..end])
}

/// The float32 values of a CPU storage (all of them: layouts index into it).
pub(crate) fn cpu_values(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => Err(Error::Msg("this kernel runs on the CPU only".into())),
    }
}

/// `t`'s values as float32, row-major, which must number `len`: what an op hands on in place
/// of its result when an earlier pass kept that result.
pub(crate) fn kept_values(t: &Tensor, len: usize) -> Result<Vec<f32>> {
    if t.elem_count() != len {
        return Err(Error::Msg(format!(
            "kept values of shape {:?} do not fit a result of {len} values",
            t.shape()
        )));
    }
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// The values of a float32, bfloat16 or float16 CPU storage as float32 (all of them: layouts
/// index into it); half-precision values are converted into a new buffer.
pub(crate) fn float32_values(storage: &CpuStorage) -> Result<Cow<'_, [f32]>> {
    Ok(match storage {
        CpuStorage::F32(values) => Cow::Borrowed(values),
        CpuStorage::BF16(values) => Cow::Owned(convert(values, |v| v.to_f32())),
        CpuStorage::F16(values) => Cow::Owned(convert(values, |v| v.to_f32())),
        other => {
            return Err(Error::Msg(format!(
                "expected float32, bfloat16 or float16 values, got {:?}",
                other.dtype()
            )))
        }
    })
}

/// `aᵀ · b` for `a` `[rows, n]` and `b` `[rows, k]`, row-major `[n, k]`: the first chunk's
/// share of a weight's gradient summed over chunks of rows (see [`add_transposed_product`]),
/// written into a new buffer without zeroing it first.
pub fn transposed_product(a: &Tensor, b: &Tensor) -> Result<Vec<f32>> {
    let (n, k) = (a.dim(1)?, b.dim(1)?);
    let mut values = Vec::with_capacity(n * k);
    // SAFETY: the product writes all n × k values when it succeeds; on failure nothing is read.
    unsafe {
        transposed_product_to(values.as_mut_ptr(), n * k, false, a, b)?;
        values.set_len(n * k);
    }
    Ok(values)
}

/// `sum += aᵀ · b` for `a` `[rows, n]` and `b` `[rows, k]`, `sum` row-major `[n, k]`: a weight's
/// gradient summed over chunks of rows in one buffer, instead of a `[n, k]` product per chunk
/// and an add.
pub fn add_transposed_product(sum: &mut [f32], a: &Tensor, b: &Tensor) -> Result<()> {
    // SAFETY: sum holds sum.len() initialised values.
    unsafe { transposed_product_to(sum.as_mut_ptr(), sum.len(), true, a, b) }
}

/// `dst (+)= aᵀ · b` into `len` values at `dst`, read first only when `accumulate`.
///
/// # Safety
/// `dst` must be valid for writes of `len` values, and for reads when `accumulate`.
unsafe fn transposed_product_to(
    dst: *mut f32,
    len: usize,
    accumulate: bool,
    a: &Tensor,
    b: &Tensor,
) -> Result<()> {
    let ((rows, n), (b_rows, k)) = (a.dims2()?, b.dims2()?);
    if rows != b_rows || len != n * k {
        return Err(Error::Msg(format!(
            "cannot add {:?}ᵀ · {:?} to a sum of {len} values",
            a.shape(),
            b.shape(),
        )));
    }
    let on_kernel = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !on_kernel(a) || !on_kernel(b) {
        let product = a.t()?.matmul(b)?.to_dtype(DType::F32)?.flatten_all()?;
        for (i, p) in product.to_vec1::<f32>()?.into_iter().enumerate() {
            // SAFETY: i < n × k = len; dst is readable when accumulating.
            unsafe { *dst.add(i) = if accumulate { *dst.add(i) + p } else { p } };
        }
        return Ok(());
    }
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let a = Operand::matrix(cpu_values(&a_storage)?, a_layout)?;
    let b = Operand::matrix(cpu_values(&b_storage)?, b_layout)?;
    // SAFETY: a and b are read through their layouts; dst holds n × k values.
    unsafe {
        product(
            (n, k, rows),
            dst,
            k,
            accumulate,
            a.t(),
            b,
            1.0,
            Threads::Pool,
        )
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::normal;

    #[test]
    fn adds_transposed_products_into_the_sum() {
        let a = normal((6, 4), 0.0, 1.0, 1);
        let b = normal((6, 3), 0.0, 1.0, 2);
        // A second pair read through a transposed view.
        let c = normal((4, 5), 0.0, 1.0, 3).t().unwrap();
        let d = normal((5, 3), 0.0, 1.0, 4);
        let mut sum = vec![1f32; 12];
        add_transposed_product(&mut sum, &a, &b).unwrap();
        add_transposed_product(&mut sum, &c, &d).unwrap();
        let expected = ((a.t().unwrap().matmul(&b).unwrap() + c.t().unwrap().matmul(&d).unwrap())
            .unwrap()
            + 1.0)
            .unwrap();
        let expected: Vec<f32> = expected.flatten_all().unwrap().to_vec1().unwrap();
        for (got, want) in sum.iter().zip(&expected) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert!(add_transposed_product(&mut sum, &a, &d).is_err());
    }

    #[test]
    fn a_first_transposed_product_starts_the_sum() {
        let a = normal((6, 4), 0.0, 1.0, 1);
        let c = normal((4, 6), 0.0, 1.0, 3).t().unwrap();
        let b = normal((6, 3), 0.0, 1.0, 2);
        for a in [&a, &c] {
            let first = transposed_product(a, &b).unwrap();
            let mut sum = vec![0f32; 12];
            add_transposed_product(&mut sum, a, &b).unwrap();
            assert_eq!(first, sum);
            let expected: Vec<f32> = a
                .t()
                .unwrap()
                .matmul(&b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (got, want) in first.iter().zip(&expected) {
                assert!((got - want).abs() < 1e-5, "{got} vs {want}");
            }
        }
        assert!(transposed_product(&a, &normal((5, 3), 0.0, 1.0, 4)).is_err());
    }

    /// `overwritten` relies on a product that does not accumulate never reading its
    /// destination: garbage there (NaN here) must not reach the result.
    #[test]
    fn a_product_that_does_not_accumulate_never_reads_its_destination() {
        let (m, n, k) = (67, 35, 19);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 - 3.0).collect();
        let rhs: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut dst = vec![f32::NAN; m * n];
        // SAFETY: lhs is m × k and rhs k × n, row-major; dst is m × n.
        unsafe {
            product(
                (m, n, k),
                dst.as_mut_ptr(),
                n,
                false,
                Operand::rows(&lhs, k),
                Operand::rows(&rhs, n),
                1.0,
                Threads::Pool,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| lhs[i * k + l] * rhs[l * n + j]).sum();
                assert_eq!(dst[i * n + j], want, "({i}, {j})");
            }
        }
    }

    #[test]
    fn reads_a_contiguous_tensor_of_higher_rank_as_rows() {
        let t = normal((2, 3, 4), 0.0, 1.0, 5);
        let (storage, layout) = t.storage_and_layout();
        let values = cpu_values(&storage).unwrap();
        let op = Operand::matrix(values, layout).unwrap();
        assert_eq!((op.row_stride, op.col_stride), (4, 1));
        let strided = t.transpose(0, 1).unwrap();
        let (storage, layout) = strided.storage_and_layout();
        assert!(Operand::matrix(cpu_values(&storage).unwrap(), layout).is_err());
    }
}
