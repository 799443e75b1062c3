//! llama.cpp's GGUF files as a model source.
//!
//! A GGUF file holds a whole model: hyper-parameters and the tokenizer as metadata, and weights
//! in llama.cpp's own naming, often quantized (Q4_0, Q4_1, Q8_0, K-quants, ...). Training needs
//! float weights in Hugging Face's naming, so [`GgufModel`] dequantizes each tensor on request,
//! renames it, and undoes the row permutation llama.cpp applies to llama's query and key
//! projections. It also rebuilds the Hugging Face files around the weights (config.json,
//! generation_config.json, tokenizer.json, tokenizer_config.json), so an output folder trained
//! from a GGUF file can be found by PEFT and transformers like any other.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value as Meta};
use candle_core::{DType, Device, Tensor};
use ff_fsio::{write_json, JsonEnding};
use memmap2::Mmap;
use serde_json::{json, Map, Value};

use crate::causal_lm::CausalLm;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::load::{from_tensors, TensorSource};

/// `general.architecture` values whose tensors map onto the llama-family decoder. They are
/// spelled as Hugging Face's `model_type` for the same models.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3"];

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Splitting rules of the byte-level BPE tokenizers whose `tokenizer.json` uses a regex split
/// before the byte-level step (as Llama 3's and Qwen2's do); they differ only in digit grouping.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// An opened GGUF file: metadata parsed, tensor data memory-mapped and read on demand.
pub struct GgufModel {
    path: PathBuf,
    mmap: Mmap,
    content: Content,
    arch: String,
}

impl GgufModel {
    /// Opens `path`, reads its metadata and checks that every tensor lies inside the file, so a
    /// truncated download fails here rather than halfway through loading.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| ModelError::io(&path, e))?;
        let len = file.metadata().map_err(|e| ModelError::io(&path, e))?.len();
        if len < 4 {
            return Err(not_gguf(&path));
        }
        // SAFETY: the map is read-only; a file changed underneath us while loading is a user
        // error that at worst yields wrong numbers, as with any reader of mapped checkpoints.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&path, e))?;
        if &mmap[..4] != b"GGUF" {
            return Err(not_gguf(&path));
        }
        let content = Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| {
            ModelError::file(
                &path,
                format!(
                    "is not a readable GGUF file ({}); it is truncated or corrupt, or uses a tensor type candle cannot read",
                    reason(&e)
                ),
            )
        })?;
        check_tensor_extents(&path, &content, mmap.len() as u64)?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Meta::String(arch)) => arch.clone(),
            _ => {
                return Err(ModelError::file(
                    &path,
                    "has no `general.architecture` string in its metadata; it is not a model file llama.cpp would load",
                ))
            }
        };
        if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(ModelError::file(
                &path,
                format!(
                    "has architecture `{arch}`, which is not supported; supported GGUF architectures are {}",
                    SUPPORTED_ARCHITECTURES.join(", ")
                ),
            ));
        }
        Ok(Self {
            path,
            mmap,
            content,
            arch,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `general.architecture`: one of [`SUPPORTED_ARCHITECTURES`].
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    /// The model with every weight frozen, in `dtype`, as [`crate::load::load_model_dir`] gives it.
    pub fn load(&self, dtype: DType, device: &Device) -> Result<CausalLm> {
        from_tensors(self.config()?, self, dtype, device)
    }

    /// The model's configuration, read from the Hugging Face config.json that
    /// [`Self::config_json`] rebuilds, so it passes the same validation as a model directory.
    pub fn config(&self) -> Result<ModelConfig> {
        let text = Value::Object(self.config_json()?).to_string();
        ModelConfig::from_json_str(&text, &self.path)
    }

    /// The Hugging Face config.json equivalent to the GGUF metadata.
    pub fn config_json(&self) -> Result<Map<String, Value>> {
        if self.arch_usize("expert_count")?.unwrap_or(0) > 0 {
            return Err(self.error("is a mixture-of-experts model, which is not supported"));
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.error(
                "holds `rope_freqs.weight` (Llama 3.1-style rope scaling), whose parameters cannot be recovered from the file; train from the Hugging Face checkpoint instead",
            ));
        }
        let hidden = self.arch_usize_required("embedding_length")?;
        let heads = self.arch_usize_required("attention.head_count")?;
        let kv_heads = self.arch_usize("attention.head_count_kv")?.unwrap_or(heads);
        // The converter writes key_length only where head_dim is not hidden / heads; llama's
        // rotary dimension is the whole head.
        let head_dim = match self.arch_usize("attention.key_length")? {
            Some(d) => d,
            None => self
                .arch_usize("rope.dimension_count")?
                .unwrap_or(hidden / heads.max(1)),
        };
        let embed_shape = self.tensor_dims("token_embd.weight")?;
        let [vocab_size, _] = embed_shape[..] else {
            return Err(ModelError::tensor(
                &self.path,
                "token_embd.weight",
                format!("has shape {embed_shape:?} but must have two dimensions"),
            ));
        };
        let class = match self.arch.as_str() {
            "qwen2" => "Qwen2ForCausalLM",
            "qwen3" => "Qwen3ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        let mut c = Map::new();
        c.insert("architectures".into(), json!([class]));
        c.insert("model_type".into(), json!(self.arch));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert(
            "intermediate_size".into(),
            json!(self.arch_usize_required("feed_forward_length")?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(self.arch_usize_required("block_count")?),
        );
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert("num_key_value_heads".into(), json!(kv_heads));
        c.insert("head_dim".into(), json!(head_dim));
        if let Some(n) = self.arch_usize("context_length")? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        let eps = self.meta_f64(&self.arch_key("attention.layer_norm_rms_epsilon"))?;
        let Some(eps) = eps else {
            return Err(self.missing(&self.arch_key("attention.layer_norm_rms_epsilon")));
        };
        c.insert("rms_norm_eps".into(), json!(eps));
        let theta = self.meta_f64(&self.arch_key("rope.freq_base"))?;
        c.insert("rope_theta".into(), json!(theta.unwrap_or(10000.0)));
        c.insert("rope_scaling".into(), self.rope_scaling()?);
        c.insert("vocab_size".into(), json!(vocab_size));
        c.insert(
            "tie_word_embeddings".into(),
            json!(!self.content.tensor_infos.contains_key("output.weight")),
        );
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        c.insert("attention_bias".into(), json!(has("blk.0.attn_q.bias")));
        c.insert("mlp_bias".into(), json!(has("blk.0.ffn_up.bias")));
        for (key, value) in self.special_token_ids()? {
            c.insert(key.into(), json!(value));
        }
        Ok(c)
    }

    /// Writes config.json and generation_config.json into `dir`, each atomically.
    pub fn write_config_files(&self, dir: &Path) -> Result<()> {
        let config = Value::Object(self.config_json()?);
        let mut generation = Map::new();
        for (key, value) in self.special_token_ids()? {
            generation.insert(key.into(), json!(value));
        }
        write_json(&dir.join("config.json"), &config, JsonEnding::Newline)?;
        Ok(write_json(
            &dir.join("generation_config.json"),
            &Value::Object(generation),
            JsonEnding::Newline,
        )?)
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir`, each atomically, rebuilt from
    /// the `tokenizer.*` metadata. Only byte-level BPE vocabularies (`tokenizer.ggml.model` =
    /// gpt2) can be rebuilt.
    pub fn write_tokenizer_files(&self, dir: &Path) -> Result<()> {
        let tokenizer = self.tokenizer_json()?;
        let config = self.tokenizer_config_json()?;
        write_json(&dir.join("tokenizer.json"), &tokenizer, JsonEnding::Newline)?;
        Ok(write_json(
            &dir.join("tokenizer_config.json"),
            &config,
            JsonEnding::Newline,
        )?)
    }

    fn tokenizer_json(&self) -> Result<Value> {
        let kind = self.meta_str("tokenizer.ggml.model")?.unwrap_or("none");
        if kind != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "{}: its tokenizer is of type `{kind}`, and only gpt2 (byte-level BPE) vocabularies can be turned into tokenizer.json; copy the tokenizer files of the original model instead",
                self.path.display()
            )));
        }
        let tokens = self.tokens()?;
        let types = self.token_types(tokens.len())?;
        let merges: Vec<Value> = self
            .meta_strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| json!([a, b]))
                    .ok_or_else(|| {
                        self.error(format!(
                            "has a merge `{m}` in `tokenizer.ggml.merges` without the space that separates its two parts"
                        ))
                    })
            })
            .collect::<Result<_>>()?;
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.to_string(), json!(id)))
            .collect();
        let added: Vec<Value> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (_, &ty))| {
                matches!(
                    ty,
                    TOKEN_TYPE_UNKNOWN | TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED
                )
            })
            .map(|(id, (content, &ty))| {
                json!({
                    "id": id,
                    "content": content,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": ty != TOKEN_TYPE_USER_DEFINED,
                })
            })
            .collect();
        let pre = self.meta_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let (normalizer, pre_tokenizer) = match pre {
            // SmolLM2's own tokenizer.json, as transformers saves it, splits with the byte-level
            // regex alone; llama.cpp's `smollm` pre-type also splits digits one by one, but
            // training must tokenize as the Hugging Face tokenizer does.
            "default" | "gpt2" | "gpt-2" | "smollm" => (Value::Null, byte_level(true)),
            "llama-bpe" | "llama3" | "smaug-bpe" => (Value::Null, split_then_bytes(LLAMA3_SPLIT)),
            "qwen2" => (json!({"type": "NFC"}), split_then_bytes(QWEN2_SPLIT)),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "{}: its tokenizer pre-type `{other}` is not supported; supported pre-types are gpt-2, smollm, llama-bpe, smaug-bpe and qwen2, or copy the tokenizer files of the original model",
                    self.path.display()
                )))
            }
        };
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self.post_processor(&tokens)?,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": null,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": false,
                "byte_fallback": false,
                "ignore_merges": false,
                "vocab": vocab,
                "merges": merges,
            },
        }))
    }

    /// Adds the BOS/EOS tokens the GGUF file asks for (`add_bos_token`, `add_eos_token`), as
    /// llama.cpp does when it tokenizes.
    fn post_processor(&self, tokens: &[&str]) -> Result<Value> {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Map::new();
        let mut edge = |flag: &str, id_key: &str| -> Result<Option<(String, usize)>> {
            if !self.meta_bool(flag)?.unwrap_or(false) {
                return Ok(None);
            }
            let Some(id) = self.meta_usize(id_key)? else {
                return Err(self.missing(id_key));
            };
            let token = self.token_at(tokens, id, id_key)?.to_string();
            specials.insert(
                token.clone(),
                json!({"id": token, "ids": [id], "tokens": [token]}),
            );
            Ok(Some((token, id)))
        };
        let bos = edge(
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.bos_token_id",
        )?;
        let eos = edge(
            "tokenizer.ggml.add_eos_token",
            "tokenizer.ggml.eos_token_id",
        )?;
        for (seq, type_id) in [("A", 0), ("B", 1)] {
            let special = |t: &Option<(String, usize)>| {
                t.as_ref()
                    .map(|(token, _)| json!({"SpecialToken": {"id": token, "type_id": type_id}}))
            };
            let body = json!({"Sequence": {"id": seq, "type_id": type_id}});
            let part: Vec<Value> = [special(&bos), Some(body), special(&eos)]
                .into_iter()
                .flatten()
                .collect();
            if seq == "A" {
                single.clone_from(&part);
            }
            pair.extend(part);
        }
        Ok(json!({
            "type": "TemplateProcessing",
            "single": single,
            "pair": pair,
            "special_tokens": specials,
        }))
    }

    fn tokenizer_config_json(&self) -> Result<Value> {
        let tokens = self.tokens()?;
        let mut c = Map::new();
        for (name, key) in [
            ("bos_token", "tokenizer.ggml.bos_token_id"),
            ("eos_token", "tokenizer.ggml.eos_token_id"),
            ("pad_token", "tokenizer.ggml.padding_token_id"),
            ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ] {
            if let Some(id) = self.meta_usize(key)? {
                c.insert(name.into(), json!(self.token_at(&tokens, id, key)?));
            }
        }
        if let Some(template) = self.meta_str("tokenizer.chat_template")? {
            c.insert("chat_template".into(), json!(template));
        }
        c.insert("clean_up_tokenization_spaces".into(), json!(false));
        if let Some(n) = self.arch_usize("context_length")? {
            c.insert("model_max_length".into(), json!(n));
        }
        c.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        Ok(Value::Object(c))
    }

    fn tokens(&self) -> Result<Vec<&str>> {
        self.meta_strings("tokenizer.ggml.tokens")
    }

    /// One type per token; files without the list have only normal tokens.
    fn token_types(&self, n: usize) -> Result<Vec<i64>> {
        let key = "tokenizer.ggml.token_type";
        let Some(value) = self.content.metadata.get(key) else {
            return Ok(vec![1; n]);
        };
        let types = match value {
            Meta::Array(items) => items.iter().map(meta_int).collect::<Option<Vec<i64>>>(),
            _ => None,
        };
        match types {
            Some(types) if types.len() == n => Ok(types),
            _ => Err(self.error(format!(
                "has a `{key}` that is not a list of {n} integers, one per token"
            ))),
        }
    }

    fn token_at<'a>(&self, tokens: &[&'a str], id: usize, key: &str) -> Result<&'a str> {
        tokens.get(id).copied().ok_or_else(|| {
            self.error(format!(
                "has `{key}` = {id}, past the end of its {} tokens",
                tokens.len()
            ))
        })
    }

    /// `bos_token_id`, `eos_token_id` and `pad_token_id`, where the file gives them.
    fn special_token_ids(&self) -> Result<Vec<(&'static str, usize)>> {
        let mut ids = Vec::new();
        for (name, key) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.meta_usize(key)? {
                ids.push((name, id));
            }
        }
        Ok(ids)
    }

    fn rope_scaling(&self) -> Result<Value> {
        let kind = self.meta_str(&self.arch_key("rope.scaling.type"))?;
        match kind {
            None | Some("none") => Ok(Value::Null),
            Some("linear") => {
                let key = self.arch_key("rope.scaling.factor");
                match self.meta_f64(&key)? {
                    Some(factor) if factor > 0.0 => {
                        Ok(json!({"rope_type": "linear", "factor": factor}))
                    }
                    _ => Err(self.error(format!(
                        "uses linear rope scaling without a positive `{key}`"
                    ))),
                }
            }
            Some(other) => Err(self.error(format!(
                "uses rope scaling `{other}`, which is not supported; supported: none, linear"
            ))),
        }
    }

    /// A tensor's dims in Hugging Face's order (candle's reader reverses GGUF's ne[] already).
    fn tensor_dims(&self, gguf_name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(gguf_name)
            .map(|info| info.shape.dims().to_vec())
            .ok_or_else(|| ModelError::tensor(&self.path, gguf_name, "is missing"))
    }

    fn arch_key(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.arch)
    }

    fn arch_usize(&self, suffix: &str) -> Result<Option<usize>> {
        self.meta_usize(&self.arch_key(suffix))
    }

    fn arch_usize_required(&self, suffix: &str) -> Result<usize> {
        let key = self.arch_key(suffix);
        self.meta_usize(&key)?.ok_or_else(|| self.missing(&key))
    }

    fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(v) => match meta_int(v).and_then(|n| usize::try_from(n).ok()) {
                Some(n) => Ok(Some(n)),
                None => Err(self.error(format!(
                    "has `{key}` = {v:?}, which is not a non-negative integer"
                ))),
            },
        }
    }

    fn meta_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Meta::F32(x)) => Ok(Some(f64::from(*x))),
            Some(Meta::F64(x)) => Ok(Some(*x)),
            Some(v) => match meta_int(v) {
                Some(n) => Ok(Some(n as f64)),
                None => Err(self.error(format!("has `{key}` = {v:?}, which is not a number"))),
            },
        }
    }

    fn meta_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Meta::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.error(format!("has `{key}` = {v:?}, which is not a boolean"))),
        }
    }

    fn meta_str(&self, key: &str) -> Result<Option<&str>> {
        match self.content.metadata.get(key) {
            None => Ok(None),
            Some(Meta::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.error(format!(
                "has `{key}` of type {:?}, not a string",
                v.value_type()
            ))),
        }
    }

    fn meta_strings(&self, key: &str) -> Result<Vec<&str>> {
        let Some(value) = self.content.metadata.get(key) else {
            return Err(self.missing(key));
        };
        let strings = match value {
            Meta::Array(items) => items
                .iter()
                .map(|v| match v {
                    Meta::String(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect::<Option<Vec<&str>>>(),
            _ => None,
        };
        strings.ok_or_else(|| self.error(format!("has a `{key}` that is not a list of strings")))
    }

    fn error(&self, message: impl Into<String>) -> ModelError {
        ModelError::file(&self.path, message)
    }

    fn missing(&self, key: &str) -> ModelError {
        self.error(format!(
            "has no `{key}` in its metadata; it was not written by llama.cpp's converter or is damaged"
        ))
    }

    /// Rows of a llama query or key projection put back in Hugging Face's order.
    ///
    /// llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head, while transformers
    /// rotates the first half of the head against the second half. Its converter therefore views
    /// each head's rows as [2, head_dim / 2] and transposes them to [head_dim / 2, 2], so GGUF row
    /// 2i + j of a head holds Hugging Face row j * head_dim / 2 + i. The inverse views the rows as
    /// [head_dim / 2, 2] and transposes back.
    fn unpermute_rows(&self, name: &str, t: Tensor, heads: usize) -> Result<Tensor> {
        let dims = t.dims().to_vec();
        let rows = dims.first().copied().unwrap_or(0);
        if heads == 0 || rows % (2 * heads) != 0 {
            return Err(ModelError::tensor(
                &self.path,
                name,
                format!("has {rows} rows, which do not split into {heads} heads of even size"),
            ));
        }
        let mut grouped = vec![heads, rows / heads / 2, 2];
        grouped.extend_from_slice(&dims[1..]);
        Ok(t.reshape(grouped)?.transpose(1, 2)?.reshape(dims)?)
    }
}

impl TensorSource for GgufModel {
    fn tensor(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let Some((gguf_name, module)) = gguf_name(name) else {
            return Err(ModelError::tensor(
                &self.path,
                name,
                "has no counterpart in GGUF files",
            ));
        };
        let Some(info) = self.content.tensor_infos.get(&gguf_name) else {
            return Err(ModelError::tensor(
                &self.path,
                name,
                format!("is missing (looked for `{gguf_name}`)"),
            ));
        };
        if info.shape.dims() != shape {
            return Err(ModelError::tensor(
                &self.path,
                name,
                format!(
                    "has shape {:?} (as `{gguf_name}`) but the model needs {shape:?}",
                    info.shape.dims()
                ),
            ));
        }
        let read_error = |e: candle_core::Error| {
            ModelError::tensor(
                &self.path,
                name,
                format!("could not be read from `{gguf_name}` ({})", reason(&e)),
            )
        };
        let quantized = info
            .read(
                &mut Cursor::new(&self.mmap[..]),
                self.content.tensor_data_offset,
                &Device::Cpu,
            )
            .map_err(read_error)?;
        let mut t = quantized.dequantize(&Device::Cpu).map_err(read_error)?;
        // Only llama's converter permutes; qwen2 and qwen3 use rotate-half rotary in llama.cpp
        // too and keep Hugging Face's rows.
        if self.arch == "llama" {
            let heads = match module {
                "self_attn.q_proj" => Some(self.arch_usize_required("attention.head_count")?),
                "self_attn.k_proj" => Some(match self.arch_usize("attention.head_count_kv")? {
                    Some(n) => n,
                    None => self.arch_usize_required("attention.head_count")?,
                }),
                _ => None,
            };
            if let Some(heads) = heads {
                t = self.unpermute_rows(name, t, heads)?;
            }
        }
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The GGUF name of a Hugging Face tensor, and its module path inside a decoder layer (empty
/// outside layers).
fn gguf_name(hf: &str) -> Option<(String, &str)> {
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), "")),
        "model.norm.weight" => return Some(("output_norm.weight".into(), "")),
        "lm_head.weight" => return Some(("output.weight".into(), "")),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (index, rest) = rest.split_once('.')?;
    index.parse::<usize>().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some((format!("blk.{index}.{short}.{kind}"), module))
}

fn meta_int(v: &Meta) -> Option<i64> {
    match *v {
        Meta::U8(n) => Some(i64::from(n)),
        Meta::I8(n) => Some(i64::from(n)),
        Meta::U16(n) => Some(i64::from(n)),
        Meta::I16(n) => Some(i64::from(n)),
        Meta::U32(n) => Some(i64::from(n)),
        Meta::I32(n) => Some(i64::from(n)),
        Meta::U64(n) => i64::try_from(n).ok(),
        Meta::I64(n) => Some(n),
        _ => None,
    }
}

/// candle's message without the backtrace it attaches when RUST_BACKTRACE is set, on one line.
fn reason(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => reason(inner),
        other => other.to_string().lines().collect::<Vec<_>>().join("; "),
    }
}

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split_then_bytes(regex: &str) -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ],
    })
}

fn not_gguf(path: &Path) -> ModelError {
    ModelError::file(
        path,
        "is not a GGUF file (it does not start with the bytes `GGUF`); model_name_or_path must name a Hugging Face model directory or a .gguf file",
    )
}

/// Fails on the first tensor (in file order) whose data runs past the end of the file.
fn check_tensor_extents(path: &Path, content: &Content, file_len: u64) -> Result<()> {
    let mut infos: Vec<_> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, info)| info.offset);
    for (name, info) in infos {
        let dtype = info.ggml_dtype;
        let bytes =
            (info.shape.elem_count() / dtype.block_size()) as u64 * dtype.type_size() as u64;
        let end = content
            .tensor_data_offset
            .saturating_add(info.offset)
            .saturating_add(bytes);
        if end > file_len {
            return Err(ModelError::tensor(
                path,
                name,
                "runs past the end of the file; the file is truncated, download or copy it again",
            ));
        }
    }
    Ok(())
}
