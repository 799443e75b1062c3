//! How a unit's tensors are laid out in its flat buffers and cut into per-rank shards.
//!
//! A unit has two flat buffers: trained tensors as float32 (the master weights, whose gradients
//! are reduce-scattered) and frozen tensors as raw bytes in their own dtype (only ever
//! gathered). Each is padded to a multiple of the world size; rank r owns the r-th equal slice.
//! A trained tensor cut by a shard boundary becomes one *piece* on each rank that holds part of
//! it; pieces are what the optimizer updates.

use std::ops::Range;

use candle_core::DType;

/// One tensor of a unit.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub trainable: bool,
    /// Start in the trained buffer (elements) or the frozen buffer (bytes).
    pub offset: usize,
}

impl Entry {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn num_bytes(&self) -> usize {
        self.numel() * self.dtype.size_in_bytes()
    }
}

/// The part of a trained tensor that one rank owns.
#[derive(Clone, Debug, PartialEq)]
pub struct Piece {
    /// Index into [`UnitLayout::entries`].
    pub entry: usize,
    /// Elements of the tensor (flattened) that the piece holds.
    pub in_entry: Range<usize>,
    /// Where those elements sit in the rank's trained shard.
    pub in_shard: Range<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct UnitLayout {
    pub entries: Vec<Entry>,
    pub world_size: usize,
    /// Trained elements, before padding.
    pub trained_len: usize,
    /// Trained elements per rank.
    pub trained_shard: usize,
    /// Frozen bytes, before padding.
    pub frozen_len: usize,
    /// Frozen bytes per rank (a multiple of 8, so any dtype's elements stay aligned).
    pub frozen_shard: usize,
}

impl UnitLayout {
    /// Lays out `tensors` (name, shape, dtype, trained) for `world_size` ranks, in the given order.
    pub fn new(tensors: Vec<(String, Vec<usize>, DType, bool)>, world_size: usize) -> Self {
        let mut entries = Vec::with_capacity(tensors.len());
        let (mut trained_len, mut frozen_len) = (0, 0);
        for (name, shape, dtype, trainable) in tensors {
            let mut entry = Entry {
                name,
                shape,
                dtype,
                trainable,
                offset: 0,
            };
            if trainable {
                entry.dtype = DType::F32;
                entry.offset = trained_len;
                trained_len += entry.numel();
            } else {
                entry.offset = frozen_len;
                frozen_len += entry.num_bytes();
            }
            entries.push(entry);
        }
        let trained_shard = trained_len.div_ceil(world_size);
        let frozen_shard = frozen_len.div_ceil(world_size).div_ceil(8) * 8;
        Self {
            entries,
            world_size,
            trained_len,
            trained_shard,
            frozen_len,
            frozen_shard,
        }
    }

    /// Bytes one rank sends in an all-gather: its trained shard as float32, then its frozen shard.
    pub fn shard_bytes(&self) -> usize {
        self.trained_shard * 4 + self.frozen_shard
    }

    /// Bytes of the whole unit, gathered.
    pub fn full_bytes(&self) -> usize {
        self.trained_len * 4 + self.frozen_len
    }

    /// The trained elements rank `rank` owns.
    pub fn trained_range(&self, rank: usize) -> Range<usize> {
        let start = (rank * self.trained_shard).min(self.trained_len);
        let end = ((rank + 1) * self.trained_shard).min(self.trained_len);
        start..end
    }

    /// The frozen bytes rank `rank` owns.
    pub fn frozen_range(&self, rank: usize) -> Range<usize> {
        let start = (rank * self.frozen_shard).min(self.frozen_len);
        let end = ((rank + 1) * self.frozen_shard).min(self.frozen_len);
        start..end
    }

    /// The pieces of trained tensors that rank `rank` owns, in buffer order.
    pub fn pieces(&self, rank: usize) -> Vec<Piece> {
        let owned = self.trained_range(rank);
        let shard_start = rank * self.trained_shard;
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.trainable)
            .filter_map(|(i, e)| {
                let start = e.offset.max(owned.start);
                let end = (e.offset + e.numel()).min(owned.end);
                (start < end).then(|| Piece {
                    entry: i,
                    in_entry: start - e.offset..end - e.offset,
                    in_shard: start - shard_start..end - shard_start,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(world: usize) -> UnitLayout {
        UnitLayout::new(
            vec![
                ("w".into(), vec![3, 4], DType::BF16, false),
                ("a".into(), vec![2, 3], DType::F32, true),
                ("n".into(), vec![5], DType::F32, false),
                ("b".into(), vec![7], DType::F32, true),
            ],
            world,
        )
    }

    #[test]
    fn trained_and_frozen_buffers_are_separate_and_padded() {
        let l = layout(3);
        assert_eq!(l.trained_len, 13);
        assert_eq!(l.trained_shard, 5);
        assert_eq!(l.frozen_len, 24 + 20);
        assert_eq!(l.frozen_shard, 16);
        assert_eq!(l.entries[3].offset, 6);
        assert_eq!(l.entries[2].offset, 24);
        assert_eq!(l.trained_range(2), 10..13);
        assert_eq!(l.frozen_range(2), 32..44);
    }

    #[test]
    fn pieces_cover_every_trained_element_once() {
        for world in 1..6 {
            let l = layout(world);
            let mut seen = vec![0u8; l.trained_len];
            for rank in 0..world {
                for p in l.pieces(rank) {
                    let e = &l.entries[p.entry];
                    assert_eq!(p.in_entry.len(), p.in_shard.len());
                    assert!(p.in_shard.end <= l.trained_shard);
                    for k in p.in_entry.clone() {
                        seen[e.offset + k] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&c| c == 1), "world {world}: {seen:?}");
        }
    }

    #[test]
    fn a_tensor_cut_by_a_boundary_gives_a_piece_on_each_side() {
        let l = layout(2);
        assert_eq!(l.trained_shard, 7);
        let r0 = l.pieces(0);
        let r1 = l.pieces(1);
        assert_eq!(r0.len(), 2);
        assert_eq!((r0[1].entry, r0[1].in_entry.clone()), (3, 0..1));
        assert_eq!(
            (r1[0].entry, r1[0].in_entry.clone(), r1[0].in_shard.clone()),
            (3, 1..7, 0..6)
        );
    }
}
