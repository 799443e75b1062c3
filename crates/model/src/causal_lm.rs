//! The whole decoder: embeddings, layers, final norm and language-model head.

use candle_core::{DType, Device, Result, Tensor, Var};
use ff_kernels::cast::to_f32;

use crate::config::ModelConfig;
use crate::layers::{DecoderLayer, ForwardCtx, RmsNorm};
use crate::param::Param;
use crate::part::Part;
use crate::table_grad::RowSums;

#[derive(Clone, Debug)]
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Param,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when the head is tied to `embed_tokens`.
    pub lm_head: Option<Param>,
    /// Dtype of the frozen weights. Activations are float32 whatever it is: the products round
    /// their inputs to bfloat16 where they run on the bf16 product, and everything between
    /// them (norms, attention, residual sums, gradients) stays in float32, where candle's
    /// half-precision elementwise ops and gradient sums were half of a bfloat16 step's time.
    pub dtype: DType,
    pub device: Device,
}

impl CausalLm {
    /// Float32 hidden states `[batch, seq, hidden]` of `input_ids` `[batch, seq]` (u32).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, seq) = input_ids.dims2()?;
        let table = self.embed_tokens.in_dtype(self.dtype)?;
        let ids = input_ids.flatten_all()?;
        let rows = table.index_select(&ids, 0)?;
        // Lookups of the padding token pass no gradient to its row, as transformers'
        // `nn.Embedding(padding_idx)` (a tied head still trains it).
        let rows = match (self.config.pad_token_id, self.embed_tokens.var()) {
            (Some(pad), Some(_)) => ids
                .eq(pad)?
                .unsqueeze(1)?
                .broadcast_as(rows.shape())?
                .where_cond(&rows.detach(), &rows)?,
            _ => rows,
        };
        to_f32(&rows)?.reshape((batch, seq, self.config.hidden_size))
    }

    /// Whether [`Self::embedding_row_sums`] gives the trained embedding table's gradient: a
    /// float32 table looked up in float32 (autograd does it otherwise).
    pub fn embedding_grad_in_rows(&self) -> bool {
        self.dtype == DType::F32 && self.embed_tokens.var().is_some()
    }

    /// The rows of the embedding table's gradient when `grad` (`[batch, seq, hidden]`) reaches
    /// `embed(input_ids)`: each position's row added, in order, to its token's sum, as
    /// autograd's `index_add` adds them, and lookups of the padding token adding nothing. Only
    /// the tokens' rows: autograd would hold a table of zeros and the sum at once, each the
    /// size of the whole table.
    pub fn embedding_row_sums(&self, input_ids: &Tensor, grad: &Tensor) -> Result<RowSums> {
        let vocab = self.config.vocab_size;
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        let pad = self.config.pad_token_id;
        if let Some(id) = ids
            .iter()
            .find(|&&id| id as usize >= vocab && Some(id) != pad)
        {
            candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
        }
        let grad = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        RowSums::of(&ids, &grad, self.config.hidden_size, pad)
    }

    /// The `[vocab, hidden]` matrix that maps normed hidden states to logits.
    pub fn lm_head_weight(&self) -> &Param {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits of every position, all at once: for inference and tests on small inputs. Training
    /// never materialises these; see the chunked loss in `ff-train`.
    pub fn forward_logits(&self, input_ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut x = self.embed(input_ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, ctx)?;
        }
        let h = self.norm.forward(&x)?;
        let (batch, seq, hidden) = h.dims3()?;
        let w = self.lm_head_weight().in_dtype(h.dtype())?;
        h.reshape((batch * seq, hidden))?
            .matmul(&w.t()?)?
            .reshape((batch, seq, ()))
    }

    /// Every base-model parameter under its Hugging Face name (`model.layers.0.mlp.up_proj.weight`).
    pub fn params_mut(&mut self) -> Vec<(String, &mut Param)> {
        self.params_with_parts_mut()
            .into_iter()
            .map(|(_, name, p)| (name, p))
            .collect()
    }

    /// [`Self::params_mut`], each with the part of the model it belongs to.
    pub fn params_with_parts_mut(&mut self) -> Vec<(Part, String, &mut Param)> {
        let mut out: Vec<(Part, String, &mut Param)> = vec![(
            Part::Embed,
            "model.embed_tokens.weight".into(),
            &mut self.embed_tokens,
        )];
        for (position, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{}.", layer.index);
            for (name, p) in layer.params_mut() {
                out.push((Part::Layer(position), format!("{prefix}{name}"), p));
            }
        }
        out.push((
            Part::Head,
            "model.norm.weight".into(),
            &mut self.norm.weight,
        ));
        if let Some(head) = &mut self.lm_head {
            out.push((Part::Head, "lm_head.weight".into(), head));
        }
        out
    }

    /// Every trained tensor: base parameters under their Hugging Face names, adapters under PEFT's
    /// names without the `base_model.model.` prefix (`model.layers.0.self_attn.q_proj.lora_A.weight`).
    pub fn trainable_params(&mut self) -> Vec<(String, Var)> {
        self.trainable_params_with_parts()
            .into_iter()
            .map(|(_, name, var)| (name, var))
            .collect()
    }

    /// [`Self::trainable_params`], each with the part of the model it belongs to.
    pub fn trainable_params_with_parts(&mut self) -> Vec<(Part, String, Var)> {
        let mut out: Vec<(Part, String, Var)> = self
            .params_with_parts_mut()
            .into_iter()
            .filter_map(|(part, name, p)| p.var().map(|v| (part, name, v.clone())))
            .collect();
        for (position, layer) in self.layers.iter().enumerate() {
            for (module, linear) in layer.linears() {
                if let Some(lora) = &linear.lora {
                    let prefix = format!("model.layers.{}.{module}", layer.index);
                    let part = Part::Layer(position);
                    out.push((part, format!("{prefix}.lora_A.weight"), lora.a.clone()));
                    out.push((part, format!("{prefix}.lora_B.weight"), lora.b.clone()));
                }
            }
        }
        out
    }

    pub fn num_params(&mut self) -> (usize, usize) {
        let mut total = 0;
        let mut trainable = 0;
        for (_, p) in self.params_mut() {
            total += p.elem_count();
            if p.is_trainable() {
                trainable += p.elem_count();
            }
        }
        for layer in &self.layers {
            for (_, linear) in layer.linears() {
                if let Some(lora) = &linear.lora {
                    let n = lora.a.elem_count() + lora.b.elem_count();
                    total += n;
                    trainable += n;
                }
            }
        }
        (total, trainable)
    }
}
