//! A Hugging Face tokenizer (`tokenizer.json`) with the special tokens of `tokenizer_config.json`.

use std::path::Path;

use serde_json::Value;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::error::{DataError, Result};

pub struct Tokenizer {
    inner: HfTokenizer,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` and, when present, `dir/tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DataError::Invalid(format!(
                "{} does not exist; the model folder must hold a Hugging Face tokenizer.json",
                path.display()
            )));
        }
        let inner = HfTokenizer::from_file(&path).map_err(|e| {
            DataError::Invalid(format!("{} is not a valid tokenizer: {e}", path.display()))
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| DataError::io(&config_path, e))?;
            serde_json::from_str(&text).map_err(|e| DataError::Json {
                path: config_path.clone(),
                line: e.line(),
                message: e.to_string(),
            })?
        } else {
            Value::Null
        };
        let id = |key: &str| token_text(config.get(key)).and_then(|t| inner.token_to_id(&t));
        let mut tokenizer = Self {
            bos_token_id: id("bos_token"),
            eos_token_id: id("eos_token"),
            pad_token_id: id("pad_token"),
            inner,
        };
        if tokenizer.eos_token_id.is_none() {
            tokenizer.eos_token_id = tokenizer.token_id("<|endoftext|>");
        }
        Ok(tokenizer)
    }

    /// Token ids of `text` without BOS/EOS, as `encode(text, add_special_tokens=False)`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Invalid(format!("cannot tokenize text: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Makes `tokens` special (matched whole in text); tokens already known keep their ids.
    pub fn add_special_tokens(&mut self, tokens: &[String]) -> Result<()> {
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        self.inner
            .add_special_tokens(added)
            .map(|_| ())
            .map_err(|e| DataError::Invalid(format!("cannot add special tokens {tokens:?}: {e}")))
    }
}
