//! A table's gradient as dense values with a few rows added after them.
//!
//! An embedding's backward reaches only the rows of the batch's tokens, a few hundred of a
//! vocabulary of tens of thousands; as a table of its own it is zeroed, filled and added to the
//! sum whole each time. A head tied to the embedding has a dense gradient of that table already: the
//! rows go onto it instead. Whoever sums gradients adds the dense values first and the rows
//! after, so that the sum has the bits of two hand-overs, the head's and the embedding's.

use std::collections::HashMap;

use candle_core::{Error, Result};

/// Rows of a table's gradient by row index: each index's rows summed in the order they came.
#[derive(Clone, Debug, PartialEq)]
pub struct RowSums {
    width: usize,
    indices: Vec<u32>,
    sums: Vec<f32>,
}

impl RowSums {
    /// `rows` (`indices.len() × width` values, row-major) summed by index, skipping the rows
    /// whose index `skip` names.
    pub fn of(indices: &[u32], rows: &[f32], width: usize, skip: Option<u32>) -> Result<Self> {
        if rows.len() != indices.len() * width {
            return Err(Error::Msg(format!(
                "{} gradient values for {} rows of {width}",
                rows.len(),
                indices.len()
            )));
        }
        let mut slot_of = HashMap::new();
        let mut sums = Self {
            width,
            indices: Vec::new(),
            sums: Vec::new(),
        };
        for (&index, row) in indices.iter().zip(rows.chunks_exact(width)) {
            if Some(index) == skip {
                continue;
            }
            let slot = *slot_of.entry(index).or_insert_with(|| {
                sums.indices.push(index);
                sums.sums.resize(sums.sums.len() + width, 0.0);
                sums.indices.len() - 1
            });
            for (sum, &g) in sums.sums[slot * width..][..width].iter_mut().zip(row) {
                *sum += g;
            }
        }
        Ok(sums)
    }

    /// Adds every row's sum to its row of `table` (row-major, `width` values a row).
    pub fn add_to(&self, table: &mut [f32]) -> Result<()> {
        let table_rows = table.len() / self.width.max(1);
        for (&index, sum) in self.indices.iter().zip(self.sums.chunks_exact(self.width)) {
            if index as usize >= table_rows {
                return Err(Error::Msg(format!(
                    "row {index} is outside a table of {table_rows} rows"
                )));
            }
            let row = &mut table[index as usize * self.width..][..self.width];
            for (value, &s) in row.iter_mut().zip(sum) {
                *value += s;
            }
        }
        Ok(())
    }
}

/// A table's gradient: `dense`, all of the table's values (zeros when `None`), with `rows`
/// added after them.
#[derive(Clone, Debug, PartialEq)]
pub struct TableGrad {
    pub dense: Option<Vec<f32>>,
    pub rows: RowSums,
}

impl TableGrad {
    /// The gradient's values for a table of `len` values: the rows added to the dense values.
    pub fn into_values(self, len: usize) -> Result<Vec<f32>> {
        let mut values = self.dense.unwrap_or_else(|| vec![0.0; len]);
        if values.len() != len {
            return Err(Error::Msg(format!(
                "a gradient of {} values for a table of {len}",
                values.len()
            )));
        }
        self.rows.add_to(&mut values)?;
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_rows_by_index_in_order_and_adds_them_after_the_dense_values() {
        // Rows for indices 2, 0, 2 (and 1, skipped) of a 3 × 2 table.
        let rows = [1.0, 2.0, 10.0, 20.0, 0.5, 0.25, 7.0, 7.0];
        let sums = RowSums::of(&[2, 0, 2, 1], &rows, 2, Some(1)).unwrap();
        let grad = TableGrad {
            dense: Some(vec![100.0; 6]),
            rows: sums.clone(),
        };
        assert!(grad.clone().into_values(4).is_err());
        assert_eq!(
            grad.into_values(6).unwrap(),
            [110.0, 120.0, 100.0, 100.0, 101.5, 102.25]
        );
        let rows_alone = TableGrad {
            dense: None,
            rows: sums.clone(),
        };
        assert_eq!(
            rows_alone.into_values(6).unwrap(),
            [10.0, 20.0, 0.0, 0.0, 1.5, 2.25]
        );
        assert!(RowSums::of(&[0, 1], &rows, 2, None).is_err());
        assert!(sums.add_to(&mut [0.0; 4]).is_err());
    }
}
