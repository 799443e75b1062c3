//! Float32 matrix products over views of tensors in place, for the fused ops' CPU kernels: they
//! call `gemm` (the crate candle's own product uses) with each operand's strides, so transposes
//! and heads cost no copies and a product can add into a result already there.

use candle_core::{Error, Layout, Result, Storage};
use gemm::{gemm, Parallelism};

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

    /// The 2-D tensor of `layout` over `values` (its storage's whole slice).
    pub fn matrix(values: &[f32], layout: &Layout) -> Result<Self> {
        let &[row_stride, col_stride] = layout.stride() else {
            return Err(Error::Msg(format!(
                "expected a matrix, got shape {:?}",
                layout.shape()
            )));
        };
        Ok(Self {
            ptr: values[layout.start_offset()..].as_ptr(),
            row_stride: row_stride as isize,
            col_stride: col_stride as isize,
        })
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

/// The float32 values of a CPU storage (all of them: layouts index into it).
pub(crate) fn cpu_values(storage: &Storage) -> Result<&[f32]> {
    match storage {
        Storage::Cpu(cpu) => cpu.as_slice::<f32>(),
        _ => Err(Error::Msg("this kernel runs on the CPU only".into())),
    }
}
