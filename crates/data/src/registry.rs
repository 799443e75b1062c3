//! `dataset_info.json`: which file each dataset name reads and how its columns are named, with
//! LLaMA-Factory's defaults.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};

pub const DATASET_INFO: &str = "dataset_info.json";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
}

/// One dataset entry with LLaMA-Factory's defaults filled in. A column set to `None` is not
/// read.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetAttr {
    pub name: String,
    /// The file or folder the rows are read from.
    pub path: PathBuf,
    pub formatting: Formatting,
    /// Resample the dataset to this many rows (a seeded permutation, topped up by draws with
    /// replacement when it asks for more rows than there are).
    pub num_samples: Option<usize>,
    pub prompt: Option<String>,
    pub query: Option<String>,
    pub response: Option<String>,
    pub history: Option<String>,
    pub messages: String,
    pub system: Option<String>,
    pub tools: Option<String>,
    pub role_tag: String,
    pub content_tag: String,
    pub user_tag: String,
    pub assistant_tag: String,
    pub observation_tag: String,
    pub function_tag: String,
    pub system_tag: String,
}

impl DatasetAttr {
    /// The columns this entry reads from each row.
    pub fn columns(&self) -> Vec<&str> {
        let mut columns: Vec<&str> = match self.formatting {
            Formatting::Alpaca => [&self.prompt, &self.query, &self.response, &self.history]
                .into_iter()
                .flatten()
                .map(String::as_str)
                .collect(),
            Formatting::Sharegpt => vec![self.messages.as_str()],
        };
        columns.extend(
            [&self.system, &self.tools]
                .into_iter()
                .flatten()
                .map(String::as_str),
        );
        columns
    }
}

/// Reads `dataset_dir/dataset_info.json` and resolves `names` in order.
pub fn resolve(dataset_dir: &Path, names: &[String]) -> Result<Vec<DatasetAttr>> {
    let path = dataset_dir.join(DATASET_INFO);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let info: BTreeMap<String, Value> =
        serde_json::from_str(&text).map_err(|e| DataError::Json {
            path: path.clone(),
            line: e.line(),
            message: e.to_string(),
        })?;
    names
        .iter()
        .map(|name| {
            let entry = info.get(name).ok_or_else(|| DataError::UnknownDataset {
                name: name.clone(),
                path: path.clone(),
                available: info.keys().cloned().collect(),
            })?;
            let entry = entry
                .as_object()
                .ok_or_else(|| DataError::BadDatasetEntry {
                    name: name.clone(),
                    reason: "its entry must be a JSON object".into(),
                })?;
            parse_entry(name, entry, dataset_dir)
        })
        .collect()
}

fn parse_entry(name: &str, entry: &Map<String, Value>, dir: &Path) -> Result<DatasetAttr> {
    let bad = |reason: &str| DataError::BadDatasetEntry {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    // LLaMA-Factory prefers a hub over `file_name` when an entry names both; nothing can be
    // downloaded here, so a local `file_name` wins.
    let file_name = match entry.get("file_name").and_then(Value::as_str) {
        Some(file_name) => file_name,
        None => {
            let hub = [
                "hf_hub_url",
                "ms_hub_url",
                "om_hub_url",
                "script_url",
                "cloud_file_name",
            ]
            .into_iter()
            .find(|k| entry.contains_key(*k));
            return Err(match hub {
                Some(key) => DataError::HubDataset {
                    name: name.to_string(),
                    key: key.to_string(),
                },
                None => bad("it has no `file_name`; name the local .json/.jsonl file or folder"),
            });
        }
    };
    let formatting = match entry.get("formatting").and_then(Value::as_str) {
        None | Some("alpaca") => Formatting::Alpaca,
        Some("sharegpt") => Formatting::Sharegpt,
        Some(other) => {
            return Err(bad(&format!(
                "formatting `{other}` is not supported; use alpaca or sharegpt"
            )))
        }
    };
    if entry.get("ranking").and_then(Value::as_bool) == Some(true) {
        return Err(bad(
            "it is a ranking (preference) dataset; only stage sft is supported",
        ));
    }
    let num_samples = match entry.get("num_samples") {
        None | Some(Value::Null) => None,
        Some(n) => Some(
            n.as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| bad("`num_samples` must be a whole number of rows"))?,
        ),
    };
    let empty = Map::new();
    let section = |key: &str| entry.get(key).and_then(Value::as_object).unwrap_or(&empty);
    let (columns, tags) = (section("columns"), section("tags"));
    for media in ["images", "videos", "audios"] {
        if columns.get(media).is_some_and(|v| !v.is_null()) {
            return Err(bad(&format!(
                "it has a `{media}` column; multimodal datasets are not supported"
            )));
        }
    }
    // A column given as null (or not a string) is switched off, one left out takes the default.
    let column = |key: &str, default: Option<&str>| -> Option<String> {
        match columns.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => None,
            None => default.map(str::to_string),
        }
    };
    let tag = |key: &str, default: &str| {
        tags.get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    Ok(DatasetAttr {
        name: name.to_string(),
        path: dir.join(file_name),
        formatting,
        num_samples,
        prompt: column("prompt", Some("instruction")),
        query: column("query", Some("input")),
        response: column("response", Some("output")),
        history: column("history", None),
        messages: column("messages", Some("conversations")).unwrap_or_default(),
        system: column("system", None),
        tools: column("tools", None),
        role_tag: tag("role_tag", "from"),
        content_tag: tag("content_tag", "value"),
        user_tag: tag("user_tag", "human"),
        assistant_tag: tag("assistant_tag", "gpt"),
        observation_tag: tag("observation_tag", "observation"),
        function_tag: tag("function_tag", "function_call"),
        system_tag: tag("system_tag", "system"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(json: &str) -> Result<DatasetAttr> {
        let value: Value = serde_json::from_str(json).unwrap();
        parse_entry("demo", value.as_object().unwrap(), Path::new("/data"))
    }

    #[test]
    fn defaults_follow_llama_factory() {
        let attr = entry(r#"{"file_name": "demo.json"}"#).unwrap();
        assert_eq!(attr.path, Path::new("/data/demo.json"));
        assert_eq!(attr.formatting, Formatting::Alpaca);
        assert_eq!(attr.columns(), vec!["instruction", "input", "output"]);
        assert_eq!(attr.messages, "conversations");
        assert_eq!(
            (attr.role_tag.as_str(), attr.content_tag.as_str()),
            ("from", "value")
        );
        assert_eq!(
            (attr.user_tag.as_str(), attr.assistant_tag.as_str()),
            ("human", "gpt")
        );
        assert_eq!(attr.function_tag, "function_call");
    }

    #[test]
    fn columns_and_tags_override_defaults() {
        let attr = entry(
            r#"{"file_name": "d", "formatting": "sharegpt",
                "columns": {"messages": "messages", "system": "sys", "tools": "tools"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user"}}"#,
        )
        .unwrap();
        assert_eq!(attr.columns(), vec!["messages", "sys", "tools"]);
        assert_eq!(attr.role_tag, "role");
        assert_eq!(attr.user_tag, "user");
        assert_eq!(attr.assistant_tag, "gpt");
    }

    #[test]
    fn a_null_column_is_switched_off() {
        let attr = entry(r#"{"file_name": "d", "columns": {"query": null}}"#).unwrap();
        assert_eq!(attr.query, None);
    }

    #[test]
    fn unsupported_entries_say_why() {
        let hub = entry(r#"{"hf_hub_url": "a/b"}"#).unwrap_err().to_string();
        assert!(
            hub.contains("hf_hub_url") && hub.contains("point `file_name`"),
            "{hub}"
        );
        let ranking = entry(r#"{"file_name": "d", "ranking": true}"#)
            .unwrap_err()
            .to_string();
        assert!(ranking.contains("ranking"), "{ranking}");
        let openai = entry(r#"{"file_name": "d", "formatting": "openai"}"#)
            .unwrap_err()
            .to_string();
        assert!(openai.contains("formatting `openai`"), "{openai}");
    }
}
