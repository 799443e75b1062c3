//! A bfloat16 matrix product on the CPU's bf16 dot-product instruction (AVX512_BF16's
//! `vdpbf16ps`), accumulating in float32.
//!
//! candle multiplies bfloat16 far below its float32 speed here; converting to float32 and using
//! the float32 product reaches float32's speed. `vdpbf16ps` multiplies two pairs of bfloat16
//! into each float32 lane per instruction, twice float32's rate, and the product runs well
//! above gemm's float32 product.
//!
//! `c = a · bᵀ` where each row of `a` and each row of `b` is contiguous along the summed axis:
//! a pair of neighbouring bfloat16 is then one 32-bit word, broadcast from `a`'s row or packed
//! from 32 of `b`'s rows into one 512-bit register. Tasks on rayon's pool take panels of 32
//! columns of `c`; a tile is 8 rows × 32 columns in 16 accumulators.

use candle_core::{CpuStorage, DType, Error, Result, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Columns of `c` per packed panel (two 16-lane registers).
const PANEL: usize = 32;
/// Rows of `c` per tile.
const TILE_ROWS: usize = 8;

/// Whether this CPU has the instruction (checked once).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of the left operand below which packing `w` for every product costs more than the
/// instruction saves (the LM head's short chunks of logit rows against a whole vocabulary ran
/// slower than converting the head to float32 block by block).
const MIN_ROWS: usize = 256;

/// Whether a product of `rows` rows by the frozen weight `w` (as `times_transposed` and
/// `times` take it) should run here: a bfloat16 matrix on the CPU with both sides even, enough
/// rows to pay for packing `w`, and the instruction present.
pub fn suits(rows: usize, w: &Tensor) -> bool {
    rows >= MIN_ROWS
        && w.dtype() == DType::BF16
        && w.device().is_cpu()
        && w.rank() == 2
        && w.dims().iter().all(|d| d % 2 == 0)
        && available()
}

/// Runs `f` on the contiguous bfloat16 values of a CPU tensor.
pub(crate) fn with_values<T>(t: &Tensor, f: impl FnOnce(&[bf16]) -> Result<T>) -> Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match (&*storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(values)), Some((start, end))) => f(&values[start..end]),
        _ => Err(Error::Msg(format!(
            "the bf16 product needs bfloat16 values on the CPU, got {:?}",
            t.dtype()
        ))),
    }
}

/// `x · wᵀ [+ low_rank]` for `x` `[m, k]` row-major and `w` `[n, k]` that [`suits`]: float32
/// `[m, n]`.
pub(crate) fn times_transposed(
    x: &[bf16],
    m: usize,
    w: &Tensor,
    low_rank: Option<LowRank>,
) -> Result<Vec<f32>> {
    let (n, k) = w.dims2()?;
    with_values(w, |w| {
        Ok(product(x, m, &Packed::transposed(w, n, k), low_rank))
    })
}

/// `dy · w [+ low_rank]` for `dy` `[m, n]` row-major and `w` `[n, k]` that [`suits`]: float32
/// `[m, k]`.
pub(crate) fn times(
    dy: &[bf16],
    m: usize,
    w: &Tensor,
    low_rank: Option<LowRank>,
) -> Result<Vec<f32>> {
    let (n, k) = w.dims2()?;
    with_values(w, |w| Ok(product(dy, m, &Packed::plain(w, n, k), low_rank)))
}

/// A term `left · right` of low rank added to a product's result as its tiles are stored,
/// `left` `[m, rank]` and `right` `[rank, n]`, float32 row-major: a LoRA adapter's
/// `s · (x Aᵀ) Bᵀ` this way costs a few multiply-adds per tile instead of a pass over the
/// whole result, and keeps float32 precision.
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub left: &'a [f32],
    pub right: &'a [f32],
    pub rank: usize,
}

/// A frozen bfloat16 weight `[n, k]` packed once for many products by it, both ways: the LM
/// head multiplies every chunk of logit rows, too few rows each to pay for packing per product.
pub struct PackedWeight {
    transposed: Packed,
    plain: Packed,
}

impl PackedWeight {
    /// `w` must [`suit`](suits) the bf16 product for some row count.
    pub fn new(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        with_values(w, |values| {
            Ok(Self {
                transposed: Packed::transposed(values, n, k),
                plain: Packed::plain(values, n, k),
            })
        })
    }

    /// `x · wᵀ` for float32 `x` `[m, k]` (rounded to bfloat16 for the product), without a
    /// graph: the float32 values of `[m, n]`, row-major.
    pub fn times_transposed(&self, x: &Tensor) -> Result<Vec<f32>> {
        self.apply(x, &self.transposed)
    }

    /// `dy · w` for float32 `dy` `[m, n]` (rounded to bfloat16), without a graph: float32
    /// `[m, k]`.
    pub fn times(&self, dy: &Tensor) -> Result<Tensor> {
        let product = self.apply(dy, &self.plain)?;
        Tensor::from_vec(product, (dy.dim(0)?, self.plain.n), dy.device())
    }

    fn apply(&self, a: &Tensor, packed: &Packed) -> Result<Vec<f32>> {
        let m = a.dim(0)?;
        if a.dims2()?.1 != 2 * packed.pairs {
            return Err(Error::Msg(format!(
                "{:?} does not fit the packed weight",
                a.shape()
            )));
        }
        let a16 = crate::cast::to_dtype(a, DType::BF16)?;
        with_values(&a16, |a| Ok(product(a, m, packed, None)))
    }
}

/// The right operand packed for [`product`]: `n` columns of `c`, `pairs` pairs along the summed
/// axis, panel by panel.
pub(crate) struct Packed {
    words: Vec<u32>,
    n: usize,
    pairs: usize,
}

impl Packed {
    /// `n` columns of `c` and `pairs` pairs along the summed axis; `fill(panel, words)` writes
    /// each panel's words, on rayon's pool (words past the last column stay zero).
    fn build(n: usize, pairs: usize, fill: impl Fn(usize, &mut [u32]) + Sync) -> Self {
        let mut words = vec![0u32; n.div_ceil(PANEL) * pairs * PANEL];
        words
            .par_chunks_mut((pairs * PANEL).max(1))
            .enumerate()
            .for_each(|(panel, words)| fill(panel, words));
        Self { words, n, pairs }
    }

    /// `w` `[n, k]` row-major as the right operand of `a · wᵀ` (`k` even): column `j` of `c`
    /// is row `j` of `w`, whose neighbouring values are already the pairs. Call only where
    /// [`available`] says so.
    pub fn transposed(w: &[bf16], n: usize, k: usize) -> Self {
        assert!(available(), "the bf16 product needs AVX512_BF16");
        assert_eq!(w.len(), n * k, "operand of the bf16 product");
        Self::build(n, k / 2, |panel, words| {
            let rows = &w[panel * PANEL * k..((panel + 1) * PANEL).min(n) * k];
            // SAFETY: the CPU has AVX-512 (asserted above); rows holds whole rows of k values,
            // words one panel of k / 2 × PANEL.
            unsafe { gather_panel(rows, k, words) }
        })
    }

    /// `w` `[n, k]` row-major as the right operand of `a · w` (`n` even): columns of `c` are
    /// `w`'s columns, the summed axis its rows, so a pair interleaves two rows.
    pub fn plain(w: &[bf16], n: usize, k: usize) -> Self {
        Self::build(k, n / 2, |panel, words| {
            let columns = panel * PANEL..((panel + 1) * PANEL).min(k);
            for (words, rows) in words.chunks_exact_mut(PANEL).zip(w.chunks_exact(2 * k)) {
                let (even, odd) = rows.split_at(k);
                let pairs = even[columns.clone()].iter().zip(&odd[columns.clone()]);
                for (word_out, (&low, &high)) in words.iter_mut().zip(pairs) {
                    *word_out = word(low, high);
                }
            }
        })
    }
}

/// One panel of [`Packed::transposed`]: word `t` of each of up to 32 rows of `k` values, 16
/// rows per gather, a lane for each row (lanes past the last row stay zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn gather_panel(rows: &[bf16], k: usize, words: &mut [u32]) {
    use std::arch::x86_64::*;
    let lanes = rows.len() / k;
    let offsets: [i32; 16] = std::array::from_fn(|i| (i * k) as i32);
    let offsets = _mm512_loadu_si512(offsets.as_ptr().cast());
    for first in (0..lanes).step_by(16) {
        let mask = ((1u32 << (lanes - first).min(16)) - 1) as __mmask16;
        let base = rows.as_ptr().add(first * k);
        for (t, words) in words.chunks_exact_mut(PANEL).enumerate() {
            // Offsets count bfloat16 (scale 2) from pair t of row `first`.
            let pair = _mm512_mask_i32gather_epi32::<2>(
                _mm512_setzero_si512(),
                mask,
                offsets,
                base.add(2 * t).cast(),
            );
            _mm512_storeu_si512(words[first..].as_mut_ptr().cast(), pair);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn gather_panel(_: &[bf16], _: usize, _: &mut [u32]) {
    unreachable!("the bf16 product is only called where `available` is true")
}

fn word(low: bf16, high: bf16) -> u32 {
    u32::from(low.to_bits()) | (u32::from(high.to_bits()) << 16)
}

/// `c = a · b [+ low_rank]` for `a` `[m, 2 · b.pairs]` row-major and `b` packed; `c` is
/// `[m, b.n]` float32. Call only where [`available`] says so.
pub(crate) fn product(a: &[bf16], m: usize, b: &Packed, low_rank: Option<LowRank>) -> Vec<f32> {
    assert!(available(), "the bf16 product needs AVX512_BF16");
    let (n, pairs) = (b.n, b.pairs);
    assert_eq!(a.len(), m * 2 * pairs, "left operand of the bf16 product");
    let LowRank { left, right, rank } = low_rank.unwrap_or(LowRank {
        left: &[],
        right: &[],
        rank: 0,
    });
    assert_eq!(left.len(), m * rank, "left side of the low-rank term");
    assert_eq!(right.len(), rank * n, "right side of the low-rank term");
    // Every element is written by exactly one tile below before `set_len`.
    let mut c = Vec::<f32>::with_capacity(m * n);
    let c_addr = c.as_mut_ptr() as usize;
    (0..n.div_ceil(PANEL)).into_par_iter().for_each(|panel| {
        let first_col = panel * PANEL;
        for i in (0..m).step_by(TILE_ROWS) {
            let tile = Tile {
                a: a[i * 2 * pairs..].as_ptr().cast(),
                words: b.words[panel * pairs * PANEL..].as_ptr(),
                pairs,
                c: (c_addr as *mut f32).wrapping_add(i * n + first_col),
                c_row_stride: n,
                cols: PANEL.min(n - first_col),
                left: left.as_ptr().wrapping_add(i * rank),
                right: right.as_ptr().wrapping_add(first_col),
                rank,
            };
            // SAFETY: the CPU has the instructions (asserted above); from the tile's first row
            // and column, `a` and `left` hold its rows, `words` its panel, `right` the
            // low-rank term's rank rows n apart; the tile writes rows i.. and this panel's
            // columns of c, which no other task writes.
            unsafe { tile.run(TILE_ROWS.min(m - i)) }
        }
    });
    // SAFETY: the panels cover every column and the tiles every row of c, each written once.
    unsafe { c.set_len(m * n) };
    c
}

/// One tile of up to 8 rows × 32 columns of `c` and what it reads, as pointers at the tile's
/// first row and column (`a` as pairs of bfloat16, `2 · pairs` values a row).
#[derive(Clone, Copy)]
struct Tile {
    a: *const u32,
    words: *const u32,
    pairs: usize,
    c: *mut f32,
    c_row_stride: usize,
    cols: usize,
    left: *const f32,
    right: *const f32,
    rank: usize,
}

impl Tile {
    /// Runs the kernel with the row count fixed.
    unsafe fn run(self, rows: usize) {
        match rows {
            8 => kernel::<8>(self),
            7 => kernel::<7>(self),
            6 => kernel::<6>(self),
            5 => kernel::<5>(self),
            4 => kernel::<4>(self),
            3 => kernel::<3>(self),
            2 => kernel::<2>(self),
            _ => kernel::<1>(self),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel<const R: usize>(tile: Tile) {
    use std::arch::x86_64::*;
    let Tile {
        a,
        words,
        pairs,
        c,
        c_row_stride,
        cols,
        left,
        right,
        rank,
    } = tile;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for t in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(words.add(t * PANEL).cast()));
        let b1: __m512bh =
            std::mem::transmute(_mm512_loadu_si512(words.add(t * PANEL + 16).cast()));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = *a.add(r * pairs + t) as i32;
            let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            acc[0] = _mm512_dpbf16_ps(acc[0], a, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], a, b1);
        }
    }
    let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
    let (low, high) = (lanes(cols), lanes(cols.saturating_sub(16)));
    for q in 0..rank {
        let right = right.add(q * c_row_stride);
        let right = (
            _mm512_maskz_loadu_ps(low, right),
            _mm512_maskz_loadu_ps(high, right.add(16)),
        );
        for (r, acc) in acc.iter_mut().enumerate() {
            let left = _mm512_set1_ps(*left.add(r * rank + q));
            acc[0] = _mm512_fmadd_ps(left, right.0, acc[0]);
            acc[1] = _mm512_fmadd_ps(left, right.1, acc[1]);
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(c.add(r * c_row_stride), low, acc[0]);
        _mm512_mask_storeu_ps(c.add(r * c_row_stride + 16), high, acc[1]);
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel<const R: usize>(_: Tile) {
    unreachable!("the bf16 product is only called where `available` is true")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<bf16> {
        (0..len)
            .map(|i| bf16::from_f32(((i * 7919 + seed) % 1009) as f32 / 1009.0 - 0.5))
            .collect()
    }

    /// Both packings against a plain float32 sum over the same bfloat16 values, on shapes with
    /// partial tiles and panels, the first with a low-rank term.
    #[test]
    fn equals_float32_sums_of_the_same_values() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let (m, n, k) = (11, 45, 38);
        let a = values(m * k, 1);
        let w = values(n * k, 2);
        // With a low-rank term of rank 3.
        let rank = 3;
        let left: Vec<f32> = values(m * rank, 5).iter().map(|v| v.to_f32()).collect();
        let right: Vec<f32> = values(rank * n, 6).iter().map(|v| v.to_f32()).collect();
        let low_rank = LowRank {
            left: &left,
            right: &right,
            rank,
        };
        let c = product(&a, m, &Packed::transposed(&w, n, k), Some(low_rank));
        for i in 0..m {
            for j in 0..n {
                let product: f32 = (0..k)
                    .map(|t| a[i * k + t].to_f32() * w[j * k + t].to_f32())
                    .sum();
                let term: f32 = (0..rank)
                    .map(|q| left[i * rank + q] * right[q * n + j])
                    .sum();
                assert!((c[i * n + j] - product - term).abs() < 1e-5, "{i},{j}");
            }
        }
        // a · w with a [m, n], n even
        let (n_even, a_even) = (44, values(m * 44, 3));
        let w_even = values(n_even * k, 4);
        let c = product(&a_even, m, &Packed::plain(&w_even, n_even, k), None);
        for i in 0..m {
            for col in 0..k {
                let want: f32 = (0..n_even)
                    .map(|j| a_even[i * n_even + j].to_f32() * w_even[j * k + col].to_f32())
                    .sum();
                assert!((c[i * k + col] - want).abs() < 1e-5, "{i},{col}");
            }
        }
    }
}
