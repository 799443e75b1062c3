//! A unit gathered from every rank's shard. Its trained values and its frozen bytes travel in
//! two collectives, so each arrives as the flat buffer the unit's layout describes (a rank's
//! shard is one contiguous slice of it). The frozen bytes land in the element type their
//! tensors share, so every frozen tensor can be a view of the one buffer: a gathered weight
//! reaches the model without another copy, and a rank's shard is sent from where it is kept.

use std::mem::MaybeUninit;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use ff_dist::ProcessGroup;
use half::{bf16, f16};

use crate::error::FsdpResult;
use crate::peer_shards::PeerShards;

/// What this rank sends to gather a unit.
pub struct Shard {
    /// The rank's trained shard, padded.
    pub trained: Vec<f32>,
    /// Where the frozen shards come from, and the dtype every frozen tensor of the unit has
    /// (`None` when they differ); absent when the frozen tensors are not wanted.
    pub frozen: Option<(FrozenSource, Option<DType>)>,
}

/// How a unit's frozen shards are gathered.
pub enum FrozenSource {
    /// This rank's shard (padded), sent through the group's all-gather.
    Own(Arc<Vec<u8>>),
    /// Unit `.1` of the shards every rank published in shared memory.
    Published(Arc<PeerShards>, usize),
}

impl Shard {
    /// Runs the collectives; every rank of `group` must call it for the same unit.
    pub fn gather(&self, group: &dyn ProcessGroup) -> FsdpResult<Gathered> {
        let world = group.world_size();
        let mut trained = vec![0f32; self.trained.len() * world];
        group.all_gather(&self.trained, &mut trained)?;
        let frozen = match &self.frozen {
            Some((FrozenSource::Own(shard), dtype)) => {
                let mut values = FrozenValues::zeroed(*dtype, shard.len() * world);
                group.all_gather_bytes(shard, values.bytes_mut())?;
                Some(values)
            }
            Some((FrozenSource::Published(peers, unit), dtype)) => Some(FrozenValues::filled(
                *dtype,
                peers.shard_len(*unit) * world,
                |out| peers.read(*unit, out),
            )?),
            None => None,
        };
        Ok(Gathered { trained, frozen })
    }
}

/// A gathered unit: the flat trained buffer (float32 elements) and the flat frozen buffer.
pub struct Gathered {
    pub trained: Vec<f32>,
    pub frozen: Option<FrozenValues>,
}

/// A unit's flat frozen buffer, typed by the dtype its tensors share or as bytes.
pub enum FrozenValues {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F16(Vec<f16>),
    Bytes(Vec<u8>),
}

impl FrozenValues {
    /// `bytes` (a multiple of 8, as frozen shards are) of zeros.
    fn zeroed(dtype: Option<DType>, bytes: usize) -> Self {
        match dtype {
            Some(DType::F32) => Self::F32(vec![0.0; bytes / 4]),
            Some(DType::BF16) => Self::BF16(vec![bf16::ZERO; bytes / 2]),
            Some(DType::F16) => Self::F16(vec![f16::ZERO; bytes / 2]),
            _ => Self::Bytes(vec![0; bytes]),
        }
    }

    /// `bytes` (a multiple of 8) written by `fill`, which must write every byte when it
    /// succeeds: a unit is gathered twice a step, and zeroing its buffer first had cost a rank
    /// as much time as reading the peers' shards into it.
    fn filled(
        dtype: Option<DType>,
        bytes: usize,
        fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> std::io::Result<()>,
    ) -> std::io::Result<Self> {
        fn typed<T: bytemuck::Pod>(
            bytes: usize,
            fill: impl FnOnce(&mut [MaybeUninit<u8>]) -> std::io::Result<()>,
        ) -> std::io::Result<Vec<T>> {
            let len = bytes / std::mem::size_of::<T>();
            let mut values = Vec::<T>::with_capacity(len);
            let spare = &mut values.spare_capacity_mut()[..len];
            // SAFETY: the same memory, viewed as its (uninitialized) bytes.
            let spare_bytes = unsafe {
                std::slice::from_raw_parts_mut(
                    spare.as_mut_ptr().cast::<MaybeUninit<u8>>(),
                    len * std::mem::size_of::<T>(),
                )
            };
            fill(spare_bytes)?;
            // SAFETY: `fill` wrote all `len` elements' bytes, and any bytes are a valid `T`.
            unsafe { values.set_len(len) };
            Ok(values)
        }
        Ok(match dtype {
            Some(DType::F32) => Self::F32(typed(bytes, fill)?),
            Some(DType::BF16) => Self::BF16(typed(bytes, fill)?),
            Some(DType::F16) => Self::F16(typed(bytes, fill)?),
            _ => Self::Bytes(typed(bytes, fill)?),
        })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Self::F32(v) => bytemuck::cast_slice_mut(v),
            Self::BF16(v) => bytemuck::cast_slice_mut(v),
            Self::F16(v) => bytemuck::cast_slice_mut(v),
            Self::Bytes(v) => v,
        }
    }

    /// The typed buffer as one 1-D tensor, whose views are the unit's frozen tensors, or the
    /// bytes back when they have no single type.
    pub fn into_tensor(self, device: &Device) -> candle_core::Result<Result<Tensor, Vec<u8>>> {
        fn flat<T: candle_core::WithDType>(
            v: Vec<T>,
            device: &Device,
        ) -> candle_core::Result<Tensor> {
            let len = v.len();
            Tensor::from_vec(v, len, device)
        }
        Ok(Ok(match self {
            Self::F32(v) => flat(v, device)?,
            Self::BF16(v) => flat(v, device)?,
            Self::F16(v) => flat(v, device)?,
            Self::Bytes(v) => return Ok(Err(v)),
        }))
    }
}
