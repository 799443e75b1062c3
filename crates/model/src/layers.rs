//! The pieces of a llama-family decoder layer. One struct per layer, compute only; loading lives
//! in `load.rs` and adapters in `finetune.rs`.

use candle_core::{DType, Device, Result, Tensor, Var, D};

use ff_kernels::cast::{to_dtype, to_f32};
use ff_kernels::causal_attention::{causal_attention, causal_attention_replayed, AttentionValues};
use ff_kernels::rms_normalize::rms_normalize;
use ff_kernels::rope_heads::rope_heads;
use ff_kernels::swiglu::swiglu;
use ff_kernels::Output;

use crate::config::{ModelConfig, RopeScaling};
use crate::dropout::derive_seed;
use crate::linear::Linear;
use crate::param::Param;

/// RMSNorm computed in float32 (the model's activations are float32; a half-precision input is
/// widened and the result cast back).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    pub weight: Param,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = self.weight.in_dtype(DType::F32)?;
        let normed = rms_normalize(&to_f32(x)?, &weight, self.eps, self.weight.is_trainable())?;
        to_dtype(&normed, x.dtype())
    }
}

/// cos and sin tables of rotary position embedding for positions `0..len`.
#[derive(Clone, Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(config: &ModelConfig, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(config);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(len * half * 2);
        let mut sin = Vec::with_capacity(len * half * 2);
        for pos in 0..len {
            // transformers computes the angles in float32; doing the same keeps logits within 1e-6.
            let angles: Vec<f32> = inv_freq.iter().map(|&f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let shape = (len, half * 2);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
        })
    }

    /// `x` is `[batch, seq, heads, head_dim]` or `[batch, seq, heads · head_dim]`; returns the
    /// rotated `[batch, heads, seq, head_dim]`.
    pub fn apply_to_heads(&self, x: &Tensor) -> Result<Tensor> {
        match rope_heads(x, &self.cos, &self.sin)? {
            Some(rotated) => Ok(rotated),
            None => {
                let (batch, seq) = (x.dim(0)?, x.dim(1)?);
                let heads = x.reshape((batch, seq, (), self.cos.dim(D::Minus1)?))?;
                self.apply(&heads.transpose(1, 2)?.contiguous()?)
            }
        }
    }

    /// `x` is `[batch, heads, seq, head_dim]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.dim(D::Minus1)? / 2;
        let x1 = x.narrow(D::Minus1, 0, half)?;
        let x2 = x.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        let (cos, sin) = (self.cos.to_dtype(x.dtype())?, self.sin.to_dtype(x.dtype())?);
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

fn inverse_frequencies(config: &ModelConfig) -> Vec<f32> {
    let dim = config.head_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (config.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match config.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old_len) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old_len / low;
            let high_freq_wavelen = old_len / high;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

/// What every layer of one forward pass shares: positions, the attention mask, the dropout seed.
#[derive(Clone, Debug)]
pub struct ForwardCtx {
    pub rope: Rope,
    /// Additive float32 mask `[batch, 1, 1, seq, seq]`: 0 where a query may attend, float32's
    /// lowest value elsewhere (not -inf, so a fully masked padding row stays finite).
    pub mask: Tensor,
    pub dropout_seed: u64,
}

impl ForwardCtx {
    /// `attention_mask` is `[batch][seq]` with 1 for real tokens and 0 for padding.
    pub fn new(
        config: &ModelConfig,
        attention_mask: &[Vec<u8>],
        dtype: DType,
        dropout_seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let batch = attention_mask.len();
        let seq = attention_mask.first().map_or(0, Vec::len);
        let mut mask = vec![0f32; batch * seq * seq];
        for (b, row) in attention_mask.iter().enumerate() {
            for i in 0..seq {
                for j in 0..seq {
                    if j > i || row[j] == 0 {
                        mask[(b * seq + i) * seq + j] = f32::MIN;
                    }
                }
            }
        }
        Ok(Self {
            rope: Rope::new(config, seq, dtype, device)?,
            mask: Tensor::from_vec(mask, (batch, 1, 1, seq, seq), device)?,
            dropout_seed,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// What a layer's first pass keeps so that its recomputation runs neither attention nor the q,
/// k, v and output projections: four of the layer's seven products, for memory held from the
/// forward until the layer's backward (see [`DecoderLayer::forward_keeping`]).
#[derive(Clone, Debug)]
struct KeptAttention {
    core: AttentionValues,
    /// The output projection's result.
    out: Tensor,
}

/// Which of a layer's results its first pass keeps for the layer's recomputation, each sparing
/// it the work that made them (see [`DecoderLayer::forward_keeping`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Keep {
    /// Attention's results: the recomputation runs neither attention nor the q, k, v and
    /// output projections.
    pub attention: bool,
    /// The MLP's gate and up projections' results: the recomputation runs none of its products.
    pub mlp: bool,
}

/// What a layer's first pass kept; the default keeps nothing, and the layer is recomputed whole.
#[derive(Clone, Debug, Default)]
pub struct KeptLayer {
    attention: Option<KeptAttention>,
    mlp: Option<KeptMlp>,
}

/// How [`Attention::run`] treats the values a recomputation needs.
#[derive(Clone, Copy)]
enum AttentionPass<'a> {
    Compute,
    Keep,
    Replay(&'a KeptAttention),
}

impl Attention {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx, seed: u64) -> Result<Tensor> {
        Ok(self.run(x, ctx, seed, AttentionPass::Compute)?.0)
    }

    /// Whether a recomputation can replay kept results: per-head norms read their input in
    /// backward, so the projections under them must run again.
    fn replays(&self) -> bool {
        self.q_norm.is_none() && self.k_norm.is_none()
    }

    fn run(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        seed: u64,
        pass: AttentionPass,
    ) -> Result<(Tensor, Option<KeptAttention>)> {
        // Off the CPU attention has no kernel that replays.
        let replayable = self.replays() && x.device().is_cpu();
        let pass = match pass {
            AttentionPass::Keep if !replayable => AttentionPass::Compute,
            pass => pass,
        };
        let projections = match pass {
            AttentionPass::Replay(_) => Output::Unread,
            _ => Output::Values,
        };
        let [q, k, v] = self.rotated_heads(x, ctx, seed, projections)?;
        let o_seed = derive_seed(seed, 4);
        match pass {
            AttentionPass::Compute | AttentionPass::Keep => {
                let core = attention(&q, &k, &v, &ctx.mask)?;
                let out = self.o_proj.forward(&core, o_seed)?;
                let kept = matches!(pass, AttentionPass::Keep).then(|| KeptAttention {
                    core: AttentionValues {
                        q: q.detach(),
                        k: k.detach(),
                        v: v.detach(),
                        out: core.detach(),
                    },
                    out: out.detach(),
                });
                Ok((out, kept))
            }
            AttentionPass::Replay(kept) => {
                let core = causal_attention_replayed(&q, &k, &v, &ctx.mask, &kept.core)?
                    .ok_or_else(|| {
                        candle_core::Error::Msg("attention replayed off the CPU".into())
                    })?;
                let out = self
                    .o_proj
                    .forward_to(&core, o_seed, Output::Kept(kept.out.clone()))?;
                Ok((out, None))
            }
        }
    }

    /// The rotated `[batch, heads, seq, head_dim]` queries and keys and the `[batch, seq,
    /// kv_heads · head_dim]` values, each projection handing on `output`. A projection's
    /// result goes to rotary embedding and attention as it is; only a per-head norm needs the
    /// heads apart.
    fn rotated_heads(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        seed: u64,
        output: Output,
    ) -> Result<[Tensor; 3]> {
        let (batch, seq, _) = x.dims3()?;
        let (hd, nh, nkv) = (self.head_dim, self.num_heads, self.num_kv_heads);
        let heads =
            |proj: &Linear, n: usize, site: u64, norm: &Option<RmsNorm>| -> Result<Tensor> {
                let t = proj.forward_to(x, derive_seed(seed, site), output.clone())?;
                match norm {
                    Some(norm) => norm.forward(&t.reshape((batch, seq, n, hd))?),
                    None => Ok(t),
                }
            };
        let q = ctx
            .rope
            .apply_to_heads(&heads(&self.q_proj, nh, 1, &self.q_norm)?)?;
        let k = ctx
            .rope
            .apply_to_heads(&heads(&self.k_proj, nkv, 2, &self.k_norm)?)?;
        let v = heads(&self.v_proj, nkv, 3, &None)?;
        Ok([q, k, v])
    }
}

/// Attention of `q` `[batch, heads, seq, head_dim]` over `k` `[batch, kv_heads, seq, head_dim]`
/// and `v` (the same, or `[batch, seq, kv_heads · head_dim]`) under the additive `mask` of
/// [`ForwardCtx`]; returns `[batch, seq, heads · head_dim]`. Scores and softmax are in float32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if let Some(out) = causal_attention(q, k, v, mask)? {
        return Ok(out);
    }
    // Off the CPU, candle's ops compute the same over the whole square.
    let (batch, nh, seq, hd) = q.dims4()?;
    let nkv = k.dim(1)?;
    let v = match v.rank() {
        3 => v.reshape((batch, seq, nkv, hd))?.transpose(1, 2)?,
        _ => v.clone(),
    };
    // Grouped-query attention without copying keys: the `groups` query heads that share a
    // key-value head are stacked along the sequence axis.
    let groups = nh / nkv;
    let q = q
        .reshape((batch, nkv, groups * seq, hd))?
        .to_dtype(DType::F32)?;
    let scores = (q.matmul(&k.to_dtype(DType::F32)?.t()?)? / (hd as f64).sqrt())?
        .reshape((batch, nkv, groups, seq, seq))?
        .broadcast_add(mask)?;
    let max = scores.max_keepdim(D::Minus1)?.detach();
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let probs = exp
        .broadcast_div(&exp.sum_keepdim(D::Minus1)?)?
        .reshape((batch, nkv, groups * seq, seq))?
        .to_dtype(v.dtype())?;
    probs
        .matmul(&v.contiguous()?)?
        .reshape((batch, nh, seq, hd))?
        .transpose(1, 2)?
        .reshape((batch, seq, nh * hd))
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// What an MLP's first pass keeps so that its recomputation runs none of its products: the gate
/// and up projections' results (the down projection's value is never read there).
#[derive(Clone, Debug)]
struct KeptMlp {
    gate: Tensor,
    up: Tensor,
}

/// How [`Mlp::run`] treats the values a recomputation needs.
#[derive(Clone, Copy)]
enum MlpPass<'a> {
    Compute,
    Keep,
    Replay(&'a KeptMlp),
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, seed: u64) -> Result<Tensor> {
        Ok(self.run(x, seed, MlpPass::Compute, Output::Values)?.0)
    }

    /// [`Self::forward`] as `pass` says, the last product handing on `output`.
    fn run(
        &self,
        x: &Tensor,
        seed: u64,
        pass: MlpPass,
        output: Output,
    ) -> Result<(Tensor, Option<KeptMlp>)> {
        let (gate_output, up_output) = match pass {
            MlpPass::Replay(kept) => (
                Output::Kept(kept.gate.clone()),
                Output::Kept(kept.up.clone()),
            ),
            _ => (Output::Values, Output::Values),
        };
        let gate = self
            .gate_proj
            .forward_to(x, derive_seed(seed, 5), gate_output)?;
        let up = self
            .up_proj
            .forward_to(x, derive_seed(seed, 6), up_output)?;
        let y = self
            .down_proj
            .forward_to(&swiglu(&gate, &up)?, derive_seed(seed, 7), output)?;
        let kept = matches!(pass, MlpPass::Keep).then(|| KeptMlp {
            gate: gate.detach(),
            up: up.detach(),
        });
        Ok((y, kept))
    }
}

/// A layer's parameters and LoRA matrices, each under its name relative to the layer.
pub type ParamsAndAdapters<'a> = (Vec<(String, &'a mut Param)>, Vec<(String, &'a mut Var)>);

#[derive(Clone, Debug)]
pub struct DecoderLayer {
    pub index: usize,
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (attention, mlp) = (AttentionPass::Compute, MlpPass::Compute);
        Ok(self.forward_to(x, ctx, attention, mlp, Output::Values)?.0)
    }

    /// [`Self::forward`], keeping what `keep` names for [`Self::forward_for_gradients`]:
    /// attention's results only where the layer can replay attention (no per-head norms, on the
    /// CPU). [`Self::kept_values_per_token`] says how much that is.
    pub fn forward_keeping(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        keep: Keep,
    ) -> Result<(Tensor, KeptLayer)> {
        let attention = match keep.attention {
            true => AttentionPass::Keep,
            false => AttentionPass::Compute,
        };
        let mlp = match keep.mlp {
            true => MlpPass::Keep,
            false => MlpPass::Compute,
        };
        self.forward_to(x, ctx, attention, mlp, Output::Values)
    }

    /// Values per token [`Self::forward_keeping`] keeps with `keep`: for attention the rotated
    /// queries and keys, the values, attention's result and the output projection's; for the
    /// MLP the gate and up projections' results.
    pub fn kept_values_per_token(&self, keep: Keep) -> usize {
        let a = &self.self_attn;
        let attention = match keep.attention && a.replays() {
            true => 2 * (a.num_heads + a.num_kv_heads) * a.head_dim + a.o_proj.out_features(),
            false => 0,
        };
        let mlp = match keep.mlp {
            true => self.mlp.gate_proj.out_features() + self.mlp.up_proj.out_features(),
            false => 0,
        };
        attention + mlp
    }

    /// The graph of [`Self::forward`] for a backward whose gradient at the layer's output is
    /// already known (a checkpointed layer recomputed): the value it returns is not the layer's
    /// output. The MLP's last product feeds only the output, so its value is left out (a quarter
    /// of the products a recomputation of a SmolLM2 layer would run); what the first pass
    /// `kept` is handed on instead of computed again: attention and its projections, the MLP's
    /// gate and up projections. The gradients are the same.
    pub fn forward_for_gradients(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        kept: &KeptLayer,
    ) -> Result<Tensor> {
        let attention = kept
            .attention
            .as_ref()
            .map_or(AttentionPass::Compute, AttentionPass::Replay);
        let mlp = kept.mlp.as_ref().map_or(MlpPass::Compute, MlpPass::Replay);
        Ok(self.forward_to(x, ctx, attention, mlp, Output::Unread)?.0)
    }

    fn forward_to(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        attention: AttentionPass,
        mlp: MlpPass,
        output: Output,
    ) -> Result<(Tensor, KeptLayer)> {
        let seed = derive_seed(ctx.dropout_seed, self.index as u64);
        let (a, attention) =
            self.self_attn
                .run(&self.input_layernorm.forward(x)?, ctx, seed, attention)?;
        let h = (x + a)?;
        let normed = self.post_attention_layernorm.forward(&h)?;
        let (m, mlp) = self.mlp.run(&normed, seed, mlp, output)?;
        Ok(((h + m)?, KeptLayer { attention, mlp }))
    }

    /// Every Linear of the layer with its module path inside the layer (`self_attn.q_proj`, ...).
    pub fn linears(&self) -> [(&'static str, &Linear); 7] {
        [
            ("self_attn.q_proj", &self.self_attn.q_proj),
            ("self_attn.k_proj", &self.self_attn.k_proj),
            ("self_attn.v_proj", &self.self_attn.v_proj),
            ("self_attn.o_proj", &self.self_attn.o_proj),
            ("mlp.gate_proj", &self.mlp.gate_proj),
            ("mlp.up_proj", &self.mlp.up_proj),
            ("mlp.down_proj", &self.mlp.down_proj),
        ]
    }

    pub fn linears_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        linears_of(&mut self.self_attn, &mut self.mlp)
    }

    /// Every parameter of the layer under its Hugging Face name relative to the layer
    /// (`self_attn.q_proj.weight`, `input_layernorm.weight`, ...), adapters excluded.
    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.params_and_adapters_mut().0
    }

    /// [`DecoderLayer::params_mut`], and beside it every LoRA matrix under its PEFT name
    /// relative to the layer (`self_attn.q_proj.lora_A.weight`), for code that must reach both
    /// at once (sharding empties and refills them).
    pub fn params_and_adapters_mut(&mut self) -> ParamsAndAdapters<'_> {
        let DecoderLayer {
            input_layernorm,
            self_attn,
            post_attention_layernorm,
            mlp,
            ..
        } = self;
        let mut params: Vec<(String, &mut Param)> = vec![
            ("input_layernorm.weight".into(), &mut input_layernorm.weight),
            (
                "post_attention_layernorm.weight".into(),
                &mut post_attention_layernorm.weight,
            ),
        ];
        let mut adapters: Vec<(String, &mut Var)> = Vec::new();
        let Attention {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm,
            k_norm,
            ..
        } = self_attn;
        let Mlp {
            gate_proj,
            up_proj,
            down_proj,
        } = mlp;
        if let Some(n) = q_norm {
            params.push(("self_attn.q_norm.weight".into(), &mut n.weight));
        }
        if let Some(n) = k_norm {
            params.push(("self_attn.k_norm.weight".into(), &mut n.weight));
        }
        let linears = [
            ("self_attn.q_proj", q_proj),
            ("self_attn.k_proj", k_proj),
            ("self_attn.v_proj", v_proj),
            ("self_attn.o_proj", o_proj),
            ("mlp.gate_proj", gate_proj),
            ("mlp.up_proj", up_proj),
            ("mlp.down_proj", down_proj),
        ];
        for (name, linear) in linears {
            let Linear {
                weight, bias, lora, ..
            } = linear;
            params.push((format!("{name}.weight"), weight));
            if let Some(b) = bias {
                params.push((format!("{name}.bias"), b));
            }
            if let Some(lora) = lora {
                adapters.push((format!("{name}.lora_A.weight"), &mut lora.a));
                adapters.push((format!("{name}.lora_B.weight"), &mut lora.b));
            }
        }
        (params, adapters)
    }
}

fn linears_of<'a>(
    attn: &'a mut Attention,
    mlp: &'a mut Mlp,
) -> [(&'static str, &'a mut Linear); 7] {
    [
        ("self_attn.q_proj", &mut attn.q_proj),
        ("self_attn.k_proj", &mut attn.k_proj),
        ("self_attn.v_proj", &mut attn.v_proj),
        ("self_attn.o_proj", &mut attn.o_proj),
        ("mlp.gate_proj", &mut mlp.gate_proj),
        ("mlp.up_proj", &mut mlp.up_proj),
        ("mlp.down_proj", &mut mlp.down_proj),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(extra: &str) -> ModelConfig {
        let text = format!(
            r#"{{"model_type":"llama","vocab_size":8,"hidden_size":64,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":4{extra}}}"#
        );
        ModelConfig::from_json_str(&text, Path::new("config.json")).unwrap()
    }

    fn assert_close(actual: &[f32], expected: &[f64]) {
        for (a, e) in actual.iter().zip(expected) {
            assert!((*a as f64 - e).abs() <= 1e-6 * e.abs(), "{a} vs {e}");
        }
    }

    // Expected values from the formulas of transformers' rope initialisers, in float64.
    #[test]
    fn llama3_frequencies_keep_high_divide_low_and_smooth_between() {
        let c = config(
            r#","rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,
            "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}"#,
        );
        assert_close(
            &inverse_frequencies(&c),
            &[
                1.0,
                0.19392274474868576,
                0.03760603093086393,
                0.0072926647372171085,
                0.0005248461609929547,
                3.428102195952591e-05,
                6.647869871181236e-06,
                1.2891731721515574e-06,
            ],
        );
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let plain = inverse_frequencies(&config(""));
        let scaled =
            inverse_frequencies(&config(r#","rope_scaling":{"type":"linear","factor":4.0}"#));
        for (p, s) in plain.iter().zip(&scaled) {
            assert_eq!(p / 4.0, *s);
        }
    }

    #[test]
    fn causal_and_padding_mask() {
        let c = config("");
        let ctx = ForwardCtx::new(&c, &[vec![1, 1, 0]], DType::F32, 0, &Device::Cpu).unwrap();
        let m: Vec<f32> = ctx.mask.flatten_all().unwrap().to_vec1().unwrap();
        let open: Vec<bool> = m.iter().map(|&v| v == 0.0).collect();
        #[rustfmt::skip]
        let expected = [
            true, false, false,
            true, true, false,
            true, true, false,
        ];
        assert_eq!(open, expected);
    }
}
