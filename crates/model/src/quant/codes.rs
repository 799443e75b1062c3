//! Code tables of bitsandbytes' 4-bit types and of its 8-bit dynamic map (facts, as bitsandbytes
//! 0.50 defines them).

/// NF4: quantiles of a standard normal, rescaled to [-1, 1], with an exact zero.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// FP4 (1 sign, 2 exponent, 1 mantissa bit), normalised to a maximum of 1, in bitsandbytes' code
/// order: the sign is the high bit of the code.
pub const FP4: [f32; 16] = [
    0.0, 0.0052, 0.6667, 1.0, 0.3333, 0.5, 0.1667, 0.25, 0.0, -0.0052, -0.6667, -1.0, -0.3333,
    -0.5, -0.1667, -0.25,
];

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`, sorted ascending; the values
/// of testdata/tiny-llama-nf4-q_proj0.safetensors `double_quant.absmax_code`). Double
/// quantization codes the per-block absmax with it.
pub const DYNAMIC_8BIT: [f32; 256] = include!("dynamic_8bit.in");
