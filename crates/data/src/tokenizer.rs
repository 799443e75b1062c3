//! A Hugging Face tokenizer (`tokenizer.json`) with the special tokens named in
//! `tokenizer_config.json` (or `special_tokens_map.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{DataError, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    dir: PathBuf,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The Jinja chat template: `chat_template.jinja`, else the config's `chat_template`.
    pub chat_template: Option<String>,
    /// The special tokens by role (`bos_token`, `eos_token`, `pad_token`, `unk_token`) as
    /// written in the config, which chat templates can refer to.
    pub special_tokens: Vec<(String, String)>,
}

/// The files a tokenizer is read from, in the order they are hashed for the cache key.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

const SPECIAL_TOKEN_KEYS: &[&str] = &["bos_token", "eos_token", "unk_token", "pad_token"];

/// The config's `chat_template`: a string, or a list of named templates of which "default"
/// is the chat template.
fn config_chat_template(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A special token is written either as its text or as a serialized `AddedToken`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        line: e.line(),
        message: e.to_string(),
    })
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and the special tokens of `dir/tokenizer_config.json`, falling
    /// back to `dir/special_tokens_map.json` for tokens the config leaves out.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Tokenizer {
                path: dir.to_path_buf(),
                reason:
                    "it has no tokenizer.json; point the model path at a Hugging Face model folder"
                        .into(),
            });
        }
        let inner = HfTokenizer::from_file(&path).map_err(|e| DataError::Tokenizer {
            path: path.clone(),
            reason: format!("tokenizer.json cannot be parsed ({e})"),
        })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let special_tokens: Vec<(String, String)> = SPECIAL_TOKEN_KEYS
            .iter()
            .filter_map(|key| {
                let text =
                    token_text(config.get(*key)).or_else(|| token_text(special_map.get(*key)))?;
                Some((key.to_string(), text))
            })
            .collect();
        let id = |key: &str| {
            let (_, text) = special_tokens.iter().find(|(k, _)| k == key)?;
            inner.token_to_id(text)
        };
        let template_file = dir.join("chat_template.jinja");
        let chat_template = if template_file.is_file() {
            Some(
                std::fs::read_to_string(&template_file)
                    .map_err(|e| DataError::io(&template_file, e))?,
            )
        } else {
            config_chat_template(&config)
        };
        Ok(Self {
            bos_token_id: id("bos_token"),
            eos_token_id: id("eos_token"),
            pad_token_id: id("pad_token"),
            chat_template,
            special_tokens,
            dir: dir.to_path_buf(),
            inner,
        })
    }

    /// Token ids of `text` without BOS/EOS, as `encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.clone(),
                reason: format!("it cannot tokenize {text:?} ({e})"),
            })
    }

    /// `decode(encode(text))` with the post-processor's special tokens, which is how
    /// LLaMA-Factory finds the prefix a tokenizer adds to every text.
    pub fn round_trip_with_special_tokens(&self, text: &str) -> Result<String> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.clone(),
                reason: format!("it cannot tokenize {text:?} ({e})"),
            })?;
        self.decode(encoding.get_ids())
    }

    /// The folder the tokenizer was read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Decodes `ids` back to text, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.clone(),
                reason: format!("it cannot decode {ids:?} ({e})"),
            })
    }

    /// Makes `tokens` special (matched whole in text); tokens already known keep their ids and
    /// new ones get the next free ids.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Result<()> {
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        self.inner
            .add_special_tokens(added)
            .map_err(|e| DataError::Tokenizer {
                path: self.dir.clone(),
                reason: format!("it cannot add the special tokens {tokens:?} ({e})"),
            })?;
        Ok(())
    }

    /// Makes `token` the EOS token, adding it as a special token when needed.
    pub fn set_eos_token(&mut self, token: &str) -> Result<()> {
        self.add_special_tokens(&[token.to_string()])?;
        self.eos_token_id = self.token_id(token);
        Ok(())
    }
}
