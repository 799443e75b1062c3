//! Float32 matrix products over views of tensors in place, for the fused ops' CPU kernels: they
//! call `gemm` (the crate candle's own product uses) with each operand's strides, so transposes
//! and heads cost no copies and a product can add into a result already there.

use candle_core::{Error, Layout, Result, Shape, Tensor};
use gemm::{gemm, Parallelism};

use crate::values::written;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::normal;
    use crate::values::cpu_values;

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
