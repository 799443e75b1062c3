//! Frozen weights kept quantized in memory (QLoRA): bitsandbytes' 4-bit NF4/FP4 blockwise layout
//! with optional double quantization, and row-wise absmax int8. The formats live here (code
//! tables, encoding, the arrays a weight is stored as); decoding and the matrix product, which
//! dequantizes a chunk of rows at a time in the forward pass and again in the backward pass, are
//! kernels (`ff_kernels::dequantize`, `ff_kernels::quantized_product`).

pub mod blockwise;
pub mod codes;
pub mod int8;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Error, Result, Storage, Tensor};
use ff_kernels::quantized_product::DequantizeRows;

pub use blockwise::{BlockScales, DoubleQuantized, FourBit, FourBitType, BLOCKSIZE};
pub use int8::RowwiseInt8;

/// How a weight is quantized: `quantization_bit` 4 (with its type and double quantization) or 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    FourBit {
        kind: FourBitType,
        double_quant: bool,
    },
    Int8Rowwise,
}

/// A plain-data array holding part of a quantized weight, for code that moves weights around as
/// bytes (sharding, checkpoints) without knowing the format.
#[derive(Clone, Debug, PartialEq)]
pub enum RawBuffer {
    U8(Vec<u8>),
    F32(Vec<f32>),
}

impl RawBuffer {
    pub fn byte_len(&self) -> usize {
        match self {
            RawBuffer::U8(v) => v.len(),
            RawBuffer::F32(v) => 4 * v.len(),
        }
    }

    fn len(&self) -> usize {
        match self {
            RawBuffer::U8(v) => v.len(),
            RawBuffer::F32(v) => v.len(),
        }
    }
}

/// What decodes the codes.
#[derive(Debug, PartialEq)]
enum Scales {
    FourBit(FourBit),
    Int8(RowwiseInt8),
}

/// A frozen `[rows, cols]` weight matrix in a quantized format. The codes (packed 4-bit codes, or
/// int8 codes as bytes) are a plain u8 tensor, the bulk of the bytes; the scales sit beside them.
/// Cloning shares both.
#[derive(Clone, Debug)]
pub struct QuantizedWeight {
    rows: usize,
    cols: usize,
    codes: Tensor,
    scales: Arc<Scales>,
}

impl QuantizedWeight {
    /// Quantizes a 2-D float tensor (any float dtype; read as float32).
    pub fn quantize(weight: &Tensor, format: QuantFormat) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let (codes, scales) = match format {
            QuantFormat::FourBit { kind, double_quant } => {
                let (codes, scales) = FourBit::quantize(&values, kind, double_quant);
                (codes, Scales::FourBit(scales))
            }
            QuantFormat::Int8Rowwise => {
                let (codes, scales) = RowwiseInt8::quantize(&values, cols);
                (codes, Scales::Int8(scales))
            }
        };
        Self::from_parts(rows, cols, codes, scales)
    }

    fn from_parts(rows: usize, cols: usize, codes: Vec<u8>, scales: Scales) -> Result<Self> {
        let n = codes.len();
        Ok(Self {
            rows,
            cols,
            codes: Tensor::from_vec(codes, n, &Device::Cpu)?,
            scales: Arc::new(scales),
        })
    }

    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn format(&self) -> QuantFormat {
        match &*self.scales {
            Scales::FourBit(q) => QuantFormat::FourBit {
                kind: q.kind,
                double_quant: matches!(q.scales, BlockScales::Double(_)),
            },
            Scales::Int8(_) => QuantFormat::Int8Rowwise,
        }
    }

    /// The codes as a 1-D u8 tensor: two 4-bit codes a byte (first in the high nibble), or one
    /// int8 code a byte.
    pub fn codes(&self) -> &Tensor {
        &self.codes
    }

    /// The scales of a 4-bit weight.
    pub fn four_bit(&self) -> Option<&FourBit> {
        match &*self.scales {
            Scales::FourBit(q) => Some(q),
            Scales::Int8(_) => None,
        }
    }

    /// The scales of an 8-bit weight.
    pub fn int8(&self) -> Option<&RowwiseInt8> {
        match &*self.scales {
            Scales::Int8(q) => Some(q),
            Scales::FourBit(_) => None,
        }
    }

    /// Runs `f` on the code bytes without copying them.
    fn with_code_bytes<T>(&self, f: impl FnOnce(&[u8]) -> T) -> Result<T> {
        let (storage, layout) = self.codes.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            return Err(Error::Msg(
                "quantized codes must live in host memory".into(),
            ));
        };
        let bytes = cpu.as_slice::<u8>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            return Err(Error::Msg("quantized codes must be contiguous".into()));
        };
        Ok(f(&bytes[start..end]))
    }

    /// Every array the weight is made of, by name: `codes` with `absmax` (4-bit), with
    /// `absmax_codes`, `absmax2` and `absmax_offset` (4-bit, double quantization), or with
    /// `row_absmax` (8-bit). [`QuantizedWeight::from_buffers`] rebuilds the weight.
    pub fn buffers(&self) -> Result<Vec<(&'static str, RawBuffer)>> {
        let mut out = vec![("codes", RawBuffer::U8(self.codes.to_vec1()?))];
        match &*self.scales {
            Scales::FourBit(q) => match &q.scales {
                BlockScales::Plain(absmax) => {
                    out.push(("absmax", RawBuffer::F32(absmax.clone())));
                }
                BlockScales::Double(d) => {
                    out.push(("absmax_codes", RawBuffer::U8(d.codes.clone())));
                    out.push(("absmax2", RawBuffer::F32(d.absmax2.clone())));
                    out.push(("absmax_offset", RawBuffer::F32(vec![d.offset])));
                }
            },
            Scales::Int8(q) => out.push(("row_absmax", RawBuffer::F32(q.row_absmax.clone()))),
        }
        Ok(out)
    }

    /// Bytes the quantized weight occupies: codes and scales.
    pub fn byte_len(&self) -> usize {
        let scales = match &*self.scales {
            Scales::FourBit(q) => match &q.scales {
                BlockScales::Plain(absmax) => 4 * absmax.len(),
                BlockScales::Double(d) => d.codes.len() + 4 * d.absmax2.len() + 4,
            },
            Scales::Int8(q) => 4 * q.row_absmax.len(),
        };
        self.codes.elem_count() + scales
    }

    /// The inverse of [`QuantizedWeight::buffers`]; every array must be there with its length.
    pub fn from_buffers(
        format: QuantFormat,
        dims: [usize; 2],
        buffers: Vec<(String, RawBuffer)>,
    ) -> Result<Self> {
        let [rows, cols] = dims;
        let len = rows * cols;
        let mut buffers: HashMap<String, RawBuffer> = buffers.into_iter().collect();
        let mut take = |name: &str, expected_len: usize| -> Result<RawBuffer> {
            let b = buffers.remove(name).ok_or_else(|| {
                Error::Msg(format!("quantized weight buffer `{name}` is missing"))
            })?;
            if b.len() != expected_len {
                return Err(Error::Msg(format!(
                    "quantized weight buffer `{name}` has {} elements, expected {expected_len}",
                    b.len()
                )));
            }
            Ok(b)
        };
        let bytes = |b: RawBuffer, name: &str| match b {
            RawBuffer::U8(v) => Ok(v),
            RawBuffer::F32(_) => Err(Error::Msg(format!(
                "quantized weight buffer `{name}` must hold bytes"
            ))),
        };
        let floats = |b: RawBuffer, name: &str| match b {
            RawBuffer::F32(v) => Ok(v),
            RawBuffer::U8(_) => Err(Error::Msg(format!(
                "quantized weight buffer `{name}` must hold float32 values"
            ))),
        };
        let (codes, scales) = match format {
            QuantFormat::FourBit { kind, double_quant } => {
                let blocks = len.div_ceil(BLOCKSIZE);
                let codes = bytes(take("codes", len.div_ceil(2))?, "codes")?;
                let scales = if double_quant {
                    BlockScales::Double(DoubleQuantized {
                        codes: bytes(take("absmax_codes", blocks)?, "absmax_codes")?,
                        absmax2: floats(
                            take("absmax2", blocks.div_ceil(blockwise::ABSMAX_BLOCKSIZE))?,
                            "absmax2",
                        )?,
                        offset: floats(take("absmax_offset", 1)?, "absmax_offset")?[0],
                    })
                } else {
                    BlockScales::Plain(floats(take("absmax", blocks)?, "absmax")?)
                };
                (codes, Scales::FourBit(FourBit { kind, len, scales }))
            }
            QuantFormat::Int8Rowwise => {
                let codes = bytes(take("codes", len)?, "codes")?;
                let row_absmax = floats(take("row_absmax", rows)?, "row_absmax")?;
                (codes, Scales::Int8(RowwiseInt8 { cols, row_absmax }))
            }
        };
        Self::from_parts(rows, cols, codes, scales)
    }

    /// Rows `start..end` as a `[end - start, cols]` tensor in `dtype` (via float32).
    pub fn dequantize_rows(
        &self,
        start: usize,
        end: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut values = Vec::with_capacity((end - start) * self.cols);
        let (from, to) = (start * self.cols, end * self.cols);
        self.with_code_bytes(|codes| match &*self.scales {
            Scales::FourBit(q) => q.dequantize_range(codes, from, to, &mut values),
            Scales::Int8(q) => q.dequantize_range(codes, from, to, &mut values),
        })?;
        Tensor::from_vec(values, (end - start, self.cols), device)?.to_dtype(dtype)
    }

    /// The whole matrix in `dtype`: for export and tests. The forward and backward passes never
    /// call it; the quantized product dequantizes a chunk of rows at a time.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        self.dequantize_rows(0, self.rows, dtype, device)
    }
}

/// What the quantized product reads: rows dequantized a chunk at a time.
impl DequantizeRows for QuantizedWeight {
    fn dims(&self) -> [usize; 2] {
        QuantizedWeight::dims(self)
    }

    fn dequantize_rows(
        &self,
        start: usize,
        end: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        QuantizedWeight::dequantize_rows(self, start, end, dtype, device)
    }
}
