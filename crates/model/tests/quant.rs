//! 4-bit and 8-bit quantization against bitsandbytes: testdata/tiny-llama-nf4-q_proj0.safetensors
//! holds layer 0's q_proj weight as bitsandbytes 0.50.2 `quantize_4bit` (nf4, blocksize 64)
//! codes it, with and without double quantization.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ff_model::quant::codes::{DYNAMIC_8BIT, FP4, NF4};
use ff_model::quant::{BlockScales, FourBitType, QuantFormat, QuantizedWeight, RawBuffer};
use ff_model::safetensors_io::SafetensorsFiles;

fn fixture() -> SafetensorsFiles {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/tiny-llama-nf4-q_proj0.safetensors");
    SafetensorsFiles::open(&[path]).unwrap()
}

fn f32s(files: &SafetensorsFiles, name: &str) -> Vec<f32> {
    files
        .load(name, None, DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bytes(files: &SafetensorsFiles, name: &str) -> Vec<u8> {
    files
        .load(name, None, DType::U8, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn quantize(double_quant: bool) -> (QuantizedWeight, SafetensorsFiles) {
    let files = fixture();
    let weight = files
        .load("weight", None, DType::F32, &Device::Cpu)
        .unwrap();
    let format = QuantFormat::FourBit {
        kind: FourBitType::Nf4,
        double_quant,
    };
    (QuantizedWeight::quantize(&weight, format).unwrap(), files)
}

fn codes(q: &QuantizedWeight) -> Vec<u8> {
    q.codes().to_vec1().unwrap()
}

fn dequantized(q: &QuantizedWeight) -> Vec<f32> {
    q.dequantize(DType::F32, &Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn code_tables_are_bitsandbytes_ones() {
    let files = fixture();
    assert_eq!(f32s(&files, "nf4_code"), NF4.to_vec());
    assert_eq!(
        f32s(&files, "double_quant.absmax_code"),
        DYNAMIC_8BIT.to_vec()
    );
}

#[test]
fn nf4_packing_absmax_and_dequantization_equal_bitsandbytes() {
    let (q, files) = quantize(false);
    let four = q.four_bit().unwrap();
    assert_eq!(codes(&q), bytes(&files, "single.packed"));
    let BlockScales::Plain(absmax) = &four.scales else {
        panic!("expected plain absmax");
    };
    assert_eq!(*absmax, f32s(&files, "single.absmax"));
    assert_eq!(dequantized(&q), f32s(&files, "single.dequantized"));
}

#[test]
fn nf4_double_quantization_equals_bitsandbytes() {
    let (q, files) = quantize(true);
    let four = q.four_bit().unwrap();
    assert_eq!(codes(&q), bytes(&files, "double_quant.packed"));
    let BlockScales::Double(d) = &four.scales else {
        panic!("expected double quantization");
    };
    assert_eq!(d.codes, bytes(&files, "double_quant.absmax_quantized"));
    assert_eq!(d.absmax2, f32s(&files, "double_quant.absmax2"));
    assert_eq!(vec![d.offset], f32s(&files, "double_quant.absmax_offset"));
    assert_eq!(dequantized(&q), f32s(&files, "double_quant.dequantized"));
}

#[test]
fn fp4_codes_and_round_trip_error() {
    // FP4 with 2 exponent bits and 1 mantissa bit: magnitudes {0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}
    // (bitsandbytes rounds them to 4 decimals), the sign in the code's high bit.
    for (i, &c) in FP4.iter().enumerate().skip(1) {
        if i != 8 {
            assert_eq!(c.signum(), if i < 8 { 1.0 } else { -1.0 }, "code {i}");
        }
        assert_eq!(FP4[i % 8], c.abs(), "code {i}");
    }
    let weight = Tensor::randn(0f32, 0.02, (32, 128), &Device::Cpu).unwrap();
    let q = QuantizedWeight::quantize(
        &weight,
        QuantFormat::FourBit {
            kind: FourBitType::Fp4,
            double_quant: false,
        },
    )
    .unwrap();
    let back = dequantized(&q);
    let values: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
    for (block, (v, b)) in values.chunks(64).zip(back.chunks(64)).enumerate() {
        let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        // The widest gap between neighbouring FP4 magnitudes is 1/3 (2/3 to 1): an error of at
        // most half of it, times the block's absmax.
        for (x, y) in v.iter().zip(b) {
            assert!(
                (x - y).abs() <= absmax / 6.0 + 1e-7,
                "block {block}: {x} vs {y}"
            );
        }
        // The absmax itself is exact (code ±1).
        assert!(b.iter().any(|y| y.abs() == absmax));
    }
}

#[test]
fn int8_rows_round_trip_within_half_a_step() {
    let weight = Tensor::randn(0f32, 0.02, (16, 100), &Device::Cpu).unwrap();
    let q = QuantizedWeight::quantize(&weight, QuantFormat::Int8Rowwise).unwrap();
    assert_eq!(q.byte_len(), 16 * 100 + 16 * 4);
    let values: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
    let back = dequantized(&q);
    for (row, (v, b)) in values.chunks(100).zip(back.chunks(100)).enumerate() {
        let absmax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (x, y) in v.iter().zip(b) {
            // Half a step, plus float16's rounding of the weight before quantization.
            let bound = absmax / 127.0 * 0.5 + x.abs() / 2048.0 + 1e-7;
            assert!((x - y).abs() <= bound, "row {row}");
        }
    }
}

#[test]
fn buffers_rebuild_the_same_weight() {
    for format in [
        QuantFormat::FourBit {
            kind: FourBitType::Nf4,
            double_quant: true,
        },
        QuantFormat::FourBit {
            kind: FourBitType::Fp4,
            double_quant: false,
        },
        QuantFormat::Int8Rowwise,
    ] {
        let weight = Tensor::randn(0f32, 0.02, (24, 40), &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&weight, format).unwrap();
        let buffers: Vec<(String, RawBuffer)> = q
            .buffers()
            .unwrap()
            .into_iter()
            .map(|(n, b)| (n.to_string(), b))
            .collect();
        let rebuilt = QuantizedWeight::from_buffers(format, q.dims(), buffers.clone()).unwrap();
        assert_eq!(dequantized(&rebuilt), dequantized(&q));
        assert_eq!(rebuilt.format(), format);
        let missing = buffers[1..].to_vec();
        assert!(QuantizedWeight::from_buffers(format, q.dims(), missing).is_err());
    }
}
