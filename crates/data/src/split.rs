//! The evaluation split of `val_size`, as `datasets`' `train_test_split(test_size, seed=seed)`
//! draws it: a NumPy PCG64 permutation whose first rows are the test rows.

use crate::args::ValSize;
use crate::error::{DataError, Result};
use crate::numpy_rng::{BitGenerator, Pcg64};

/// Row indices of the training and evaluation parts of `n` rows.
pub(crate) fn train_test_split(
    n: usize,
    val_size: ValSize,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_test = match val_size {
        ValSize::None => return Ok(((0..n).collect(), Vec::new())),
        // `datasets` hands an empty table back unchanged as both parts.
        _ if n == 0 => return Ok((Vec::new(), Vec::new())),
        ValSize::Fraction(f) if f >= 1.0 => {
            return Err(DataError::Args(format!(
                "val_size {f} must be a fraction below 1 or a row count above 1"
            )))
        }
        ValSize::Fraction(f) => (f * n as f64).ceil() as usize,
        ValSize::Count(count) => count,
    };
    if n_test >= n {
        return Err(DataError::Args(format!(
            "val_size takes {n_test} of the {n} training rows and leaves none to train on; make it smaller"
        )));
    }
    let order = Pcg64::from_seed(seed).permutation(n);
    let (test, train) = order.split_at(n_test);
    Ok((train.to_vec(), test.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_rounds_up_and_count_is_exact() {
        let (train, test) = train_test_split(10, ValSize::Fraction(0.15), 42).unwrap();
        assert_eq!((train.len(), test.len()), (8, 2));
        // np.random.default_rng(42).permutation(10) starts with 5, 6.
        assert_eq!(test, vec![5, 6]);
        let (train, test) = train_test_split(10, ValSize::Count(3), 42).unwrap();
        assert_eq!((train.len(), test.len()), (7, 3));
        let mut all: Vec<usize> = train.into_iter().chain(test).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn a_split_that_leaves_nothing_to_train_is_an_error() {
        let message = train_test_split(5, ValSize::Count(5), 0)
            .unwrap_err()
            .to_string();
        assert!(message.contains("leaves none to train on"), "{message}");
        assert!(train_test_split(5, ValSize::Fraction(1.0), 0).is_err());
    }
}
