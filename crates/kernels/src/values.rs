//! Reading and writing the values of CPU tensors in place, for the fused ops' CPU kernels.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Error, Layout, Result, Storage, Tensor};
use rayon::prelude::*;

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

/// `values` converted one by one by `f`, in parallel runs of a plain loop (which the compiler
/// vectorizes; an element-wise parallel collect was much slower).
pub(crate) fn convert<T: Copy + Sync, U: Copy + Default + Send>(
    values: &[T],
    f: impl Fn(T) -> U + Sync,
) -> Vec<U> {
    const RUN: usize = 1 << 15;
    let mut out = vec![U::default(); values.len()];
    out.par_chunks_mut(RUN)
        .zip(values.par_chunks(RUN))
        .for_each(|(out, values)| {
            for (o, &v) in out.iter_mut().zip(values) {
                *o = f(v);
            }
        });
    out
}
