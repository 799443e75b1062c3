//! Where a training step's time goes, and how far it is from the float32 limit.
//!
//! The step times its own phases (embedding, layers forward, head, layers backward,
//! communication, optimizer). Inside the layers, the Linear products and the attention core are
//! timed apart here on one layer's shapes and scaled to every layer and pass; what is left of
//! the layers' time is elementwise work (norms, rotary embedding, activations, residuals, casts,
//! copies and autograd's bookkeeping). The float32 limit is the step's FLOP count at the speed
//! candle's float32 matrix product reaches on a 2048³ product in the same run.

use std::time::Instant;

use anyhow::{anyhow, Result};
use candle_core::{DType, Device, Tensor, Var};
use ff_kernels::lora_product::lora_product;
use ff_kernels::trained_product::trained_product;
use ff_kernels::Output;
use ff_model::layers::attention;
use ff_model::{ForwardCtx, ModelConfig};
use ff_train::{backward_from, Checkpointing, StepPhases};

use super::{median, Finetuning};

/// Repetitions of each separately timed piece; the median counts.
const REPEATS: usize = 3;

/// What the step is: its shape, precision and kind of fine-tuning.
pub struct StepShape<'a> {
    pub config: &'a ModelConfig,
    pub batch: usize,
    pub seq: usize,
    pub dtype: DType,
    pub finetuning: Finetuning,
    pub lora_rank: usize,
    pub checkpointing: Checkpointing,
    /// Groups of rows the step runs side by side, one per thread (`ff_train::MicroBatchPlan::row_groups`).
    pub row_groups: usize,
}

/// `(in, out)` of every Linear of one decoder layer.
fn linear_shapes(c: &ModelConfig) -> [(usize, usize); 7] {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
}

impl StepShape<'_> {
    fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// Rows of one row group.
    fn group_batch(&self) -> usize {
        self.batch.div_ceil(self.row_groups.max(1))
    }

    fn lora(&self) -> bool {
        self.finetuning == Finetuning::Lora
    }

    /// FLOPs per token of the Linears of all layers: forward and input gradient, plus the
    /// weight gradient when weights train; LoRA adds its adapters (forward, input and weight
    /// gradients). Recomputation is not counted: it is work the limit does not require.
    fn linear_flops_per_token(&self) -> f64 {
        let passes = if self.lora() { 2.0 } else { 3.0 };
        let per_layer: f64 = linear_shapes(self.config)
            .iter()
            .map(|&(i, o)| {
                let adapter = if self.lora() {
                    6.0 * (self.lora_rank * (i + o)) as f64
                } else {
                    0.0
                };
                passes * 2.0 * (i * o) as f64 + adapter
            })
            .sum();
        per_layer * self.config.num_hidden_layers as f64
    }

    /// Causal attention's products (half the square), forward and backward.
    fn attention_flops_per_token(&self) -> f64 {
        let c = self.config;
        let forward = 2.0 * (c.num_attention_heads * c.head_dim * self.seq) as f64;
        3.0 * forward * c.num_hidden_layers as f64
    }

    /// The LM head: forward and input gradient, and the weight gradient when it trains.
    fn head_flops_per_token(&self) -> f64 {
        let passes = if self.lora() { 2.0 } else { 3.0 };
        passes * 2.0 * (self.config.vocab_size * self.config.hidden_size) as f64
    }

    fn flops_per_token(&self) -> f64 {
        self.linear_flops_per_token()
            + self.attention_flops_per_token()
            + self.head_flops_per_token()
    }

    /// Layers whose recomputation runs each of [`linear_shapes`]: none without checkpointing;
    /// the down projection never (nothing reads its value); the attention projections, or the
    /// gate and up projections, not in layers that kept their values.
    fn layers_recomputing_linears(&self) -> [usize; 7] {
        let layers = self.config.num_hidden_layers;
        let Checkpointing::Layers(keeping) = self.checkpointing else {
            return [0; 7];
        };
        let attention = layers - keeping.attention_layers.min(layers);
        let mlp = layers - keeping.mlp_layers.min(layers);
        [attention, attention, attention, attention, mlp, mlp, 0]
    }

    /// Layers whose recomputation runs the attention core.
    fn layers_recomputing_attention(&self) -> usize {
        self.layers_recomputing_linears()[0]
    }
}

fn time<T>(f: impl Fn() -> Result<T>) -> Result<f64> {
    let mut seconds = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let start = Instant::now();
        f()?;
        seconds.push(start.elapsed().as_secs_f64());
    }
    Ok(median(seconds))
}

fn random(shape: (usize, usize), dtype: DType) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 0.02, shape, &Device::Cpu)?.to_dtype(dtype)?)
}

/// GFLOP/s of candle's float32 product of two `n × n` matrices.
pub fn matmul_gflops(n: usize) -> Result<f64> {
    let a = random((n, n), DType::F32)?;
    let b = random((n, n), DType::F32)?;
    a.matmul(&b)?; // warm-up: threads started, pages touched
    let seconds = time(|| Ok(a.matmul(&b)?))?;
    Ok(2.0 * (n * n * n) as f64 / seconds / 1e9)
}

/// Seconds of one layer's Linear products through the op the model runs (the fused frozen
/// product and adapter under LoRA, the trained product when the weights train): the forward of
/// each of [`linear_shapes`], then forward and backward of all.
fn layer_products(shape: &StepShape) -> Result<[f64; 8]> {
    let rows = shape.group_batch() * shape.seq;
    let r = shape.lora_rank;
    let var = |t: Tensor| -> Result<Var> { Ok(Var::from_tensor(&t)?) };
    let mut pieces = Vec::new();
    // As in the model: float32 activations whatever the dtype; frozen weights in the model's
    // dtype, trained ones (adapters, or every weight in full fine-tuning) in float32.
    let weight_dtype = if shape.lora() {
        shape.dtype
    } else {
        DType::F32
    };
    for (i, o) in linear_shapes(shape.config) {
        let x = var(random((rows, i), DType::F32)?)?;
        let w = var(random((o, i), weight_dtype)?)?;
        let a = var(random((r, i), DType::F32)?)?;
        let b = var(random((o, r), DType::F32)?)?;
        let upstream = random((rows, o), DType::F32)?;
        pieces.push((x, w, a, b, upstream));
    }
    let forward = |x: &Var, w: &Var, a: &Var, b: &Var| -> Result<Tensor> {
        if shape.lora() {
            lora_product(x, w.as_tensor(), a, b, 2.0, Output::Values)?
                .ok_or_else(|| anyhow!("no LoRA product kernel for {:?}", shape.dtype))
        } else {
            trained_product(x, w.as_tensor(), Output::Values)?
                .ok_or_else(|| anyhow!("no trained product kernel for {:?}", shape.dtype))
        }
    };
    let mut seconds = [0f64; 8];
    for ((x, w, a, b, _), s) in pieces.iter().zip(&mut seconds) {
        *s = time(|| Ok(forward(x, w, a, b)?.detach()))?;
    }
    seconds[7] = time(|| {
        for (x, w, a, b, upstream) in &pieces {
            backward_from(&forward(x, w, a, b)?, upstream)?;
        }
        Ok(())
    })?;
    Ok(seconds)
}

/// Seconds of one layer's attention core (scores, mask, softmax, weighted sum):
/// `[forward, forward and backward]`.
fn layer_attention(shape: &StepShape) -> Result<[f64; 2]> {
    let c = shape.config;
    let (b, s, hd) = (shape.group_batch(), shape.seq, c.head_dim);
    let heads = |n: usize| -> Result<Var> {
        let t = Tensor::randn(0f32, 1.0, (b, n, s, hd), &Device::Cpu)?;
        Ok(Var::from_tensor(&t)?)
    };
    let (q, k) = (heads(c.num_attention_heads)?, heads(c.num_key_value_heads)?);
    // Values as the model hands them over: the projection's rows.
    let v_rows = Tensor::randn(0f32, 1.0, (b, s, c.num_key_value_heads * hd), &Device::Cpu)?;
    let v = Var::from_tensor(&v_rows)?;
    let ctx = ForwardCtx::new(c, &vec![vec![1u8; s]; b], shape.dtype, 0, &Device::Cpu)?;
    let upstream = Tensor::randn(0f32, 1.0, (b, s, c.num_attention_heads * hd), &Device::Cpu)?;
    let forward = || -> Result<Tensor> {
        Ok(attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            &ctx.mask,
        )?)
    };
    let forward_seconds = time(|| forward().map(|t| t.detach()))?;
    let both_seconds = time(|| Ok(backward_from(&forward()?, &upstream)?))?;
    Ok([forward_seconds, both_seconds])
}

/// `measure` run once per row group at the same time on the groups' threads, as the step runs
/// them (a single group: on the calling thread's pool); the slowest group's seconds, the wall
/// time they take together.
fn side_by_side<const N: usize>(
    groups: usize,
    measure: impl Fn() -> Result<[f64; N]> + Sync,
) -> Result<[f64; N]> {
    if groups <= 1 {
        return measure();
    }
    let results = ff_train::on_row_group_threads((0..groups).map(|_| &measure).collect());
    let mut slowest = [0f64; N];
    for result in results {
        for (s, t) in slowest.iter_mut().zip(result?) {
            *s = s.max(t);
        }
    }
    Ok(slowest)
}

/// Prints the profile of the step whose phases are `phases` (the median step) taking `seconds`.
pub fn print(shape: &StepShape, phases: &StepPhases, seconds: f64) -> Result<()> {
    let layers = shape.config.num_hidden_layers as f64;
    let product_seconds = side_by_side(shape.row_groups, || layer_products(shape))?;
    let recomputed: f64 = shape
        .layers_recomputing_linears()
        .iter()
        .zip(&product_seconds)
        .map(|(&n, s)| n as f64 * s)
        .sum();
    let products = layers * product_seconds[7] + recomputed;
    let [attention_forward, attention_both] =
        side_by_side(shape.row_groups, || layer_attention(shape))?;
    let attention =
        layers * attention_both + shape.layers_recomputing_attention() as f64 * attention_forward;
    let layer_time =
        (phases.embedding + phases.layers_forward + phases.layers_backward).as_secs_f64();
    let elementwise = (layer_time - products - attention).max(0.0);
    let tokens = shape.tokens() as f64;
    let gflops = |flops_per_token: f64, s: f64| flops_per_token * tokens / s / 1e9;

    let rows = [
        (
            "matrix products (Linears)",
            products,
            Some(gflops(shape.linear_flops_per_token(), products)),
        ),
        (
            "attention (scores, softmax, sum)",
            attention,
            Some(gflops(shape.attention_flops_per_token(), attention)),
        ),
        ("elementwise, norms, copies", elementwise, None),
        (
            "loss (final norm, LM head, CE)",
            phases.head.as_secs_f64(),
            Some(gflops(
                shape.head_flops_per_token(),
                phases.head.as_secs_f64(),
            )),
        ),
        (
            "optimizer (norm, clip, AdamW)",
            phases.optimizer.as_secs_f64(),
            None,
        ),
        ("communication", phases.communication.as_secs_f64(), None),
    ];
    println!(
        "profile of the median step (products and attention timed apart on one layer's shapes):"
    );
    println!(
        "  {:<34} {:>8} {:>7} {:>9}",
        "part", "seconds", "share", "GFLOP/s"
    );
    for (name, s, rate) in rows {
        let rate = rate.map_or(String::new(), |r| format!("{r:.1}"));
        println!(
            "  {name:<34} {s:>8.3} {:>6.1}% {rate:>9}",
            100.0 * s / seconds
        );
    }

    let peak = matmul_gflops(2048)?;
    let flops = shape.flops_per_token();
    let limit = peak * 1e9 / flops;
    let reached = tokens / seconds;
    println!(
        "float32 limit   {:.0} MFLOP/token at {peak:.1} GFLOP/s (candle f32 2048³ product, this run) = {limit:.1} tokens/s; reached {:.1}% ({:.1} GFLOP/s)",
        flops / 1e6,
        100.0 * reached / limit,
        reached * flops / 1e9
    );
    Ok(())
}
