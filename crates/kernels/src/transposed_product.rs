//! `aᵀ · b` into a float32 buffer, or added to one: a weight's gradient summed over chunks of
//! rows (the LM head's, chunk by chunk of the loss's rows).

use candle_core::{DType, Error, Result, Tensor};

use crate::strided::{product, Operand, Threads};
use crate::values::cpu_values;

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
}
