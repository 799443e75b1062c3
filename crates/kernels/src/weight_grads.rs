//! Weight gradients handed past candle's gradient store.
//!
//! candle's backward adds every gradient an op returns into a zeroed buffer of its own: one pass
//! to zero it and one to add, over every weight gradient of a layer in full fine-tuning. A weight
//! used once in a backward needs neither. While [`collect`] runs on a
//! thread, the trained product hands its weight's gradient here instead of to candle, and the
//! caller puts it into the store afterwards.

use std::cell::RefCell;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor};

thread_local! {
    /// The gradients offered on this thread while [`collect`] runs; `None` otherwise.
    static COLLECTED: RefCell<Option<Vec<(Tensor, Tensor)>>> = const { RefCell::new(None) };
}

/// Runs `f` (a backward, which candle runs on the calling thread) and returns its result with
/// the weight gradients offered meanwhile, as `(weight, gradient)` in the order offered (a
/// weight used twice is there twice; the caller sums what it puts into the store).
pub fn collect<T>(f: impl FnOnce() -> T) -> (T, Vec<(Tensor, Tensor)>) {
    let outer = COLLECTED.with(|c| c.replace(Some(Vec::new())));
    let result = f();
    let collected = COLLECTED.with(|c| c.replace(outer)).unwrap_or_default();
    (result, collected)
}

/// Takes `grad`, the gradient of `weight`, when [`collect`] runs on this thread (`None`); hands
/// it back otherwise, for the op to return to candle.
pub(crate) fn offer(weight: &Tensor, grad: Tensor) -> Option<Tensor> {
    COLLECTED.with(|c| match c.borrow_mut().as_mut() {
        Some(collected) => {
            collected.push((weight.clone(), grad));
            None
        }
        None => Some(grad),
    })
}

/// A store that holds `grad` for `tensor` alone. candle has no public constructor for a store;
/// the backward of a constant scalar gives one that holds only that scalar, unknown to anyone.
pub fn store_of(tensor: &Tensor, grad: Tensor) -> Result<GradStore> {
    let mut store = Tensor::zeros((), DType::F32, tensor.device())?.backward()?;
    store.insert(tensor, grad);
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn collects_only_inside_in_the_order_offered() {
        let dev = Device::Cpu;
        let (w, other) = (
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
            Tensor::zeros(2, DType::F32, &dev).unwrap(),
        );
        let ones = Tensor::ones(2, DType::F32, &dev).unwrap();
        assert!(offer(&w, ones.clone()).is_some());
        let ((), collected) = collect(|| {
            assert!(offer(&w, ones.clone()).is_none());
            assert!(offer(&other, ones.clone()).is_none());
            assert!(offer(&w, (&ones * 2.0).unwrap()).is_none());
        });
        let ids: Vec<_> = collected.iter().map(|(weight, _)| weight.id()).collect();
        assert_eq!(ids, [w.id(), other.id(), w.id()]);
        assert_eq!(collected[2].1.to_vec1::<f32>().unwrap(), [2.0, 2.0]);
        assert!(offer(&w, ones).is_some());
    }
}
