//! `dataset_info.json`: which file each dataset name reads and how its columns are named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{DataError, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
}

/// One dataset entry with LLaMA-Factory's defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetAttr {
    pub name: String,
    pub file: PathBuf,
    pub formatting: Formatting,
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

/// Reads `dataset_dir/dataset_info.json` and resolves `names` in order.
pub fn resolve(dataset_dir: &Path, names: &[String]) -> Result<Vec<DatasetAttr>> {
    let path = dataset_dir.join("dataset_info.json");
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
            let entry = info.get(name).and_then(Value::as_object).ok_or_else(|| {
                DataError::Invalid(format!(
                    "dataset `{name}` is not in {}; it has {}",
                    path.display(),
                    info.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            parse_entry(name, entry, dataset_dir)
        })
        .collect()
}

fn parse_entry(name: &str, entry: &Map<String, Value>, dir: &Path) -> Result<DatasetAttr> {
    let text = |map: &Map<String, Value>, key: &str| {
        map.get(key).and_then(Value::as_str).map(str::to_string)
    };
    let Some(file_name) = text(entry, "file_name") else {
        let hub = [
            "hf_hub_url",
            "ms_hub_url",
            "om_hub_url",
            "script_url",
            "cloud_file_name",
        ]
        .iter()
        .find(|k| entry.contains_key(**k));
        return Err(DataError::Invalid(match hub {
            Some(key) => format!(
                "dataset `{name}` is fetched from a hub ({key}), which this machine cannot reach; download it elsewhere and point `file_name` in dataset_info.json at the local file"
            ),
            None => format!("dataset `{name}` in dataset_info.json has no `file_name`"),
        }));
    };
    let formatting = match text(entry, "formatting").as_deref() {
        None | Some("alpaca") => Formatting::Alpaca,
        Some("sharegpt") => Formatting::Sharegpt,
        Some(other) => {
            return Err(DataError::Invalid(format!(
                "dataset `{name}` has formatting `{other}`; supported are alpaca and sharegpt"
            )))
        }
    };
    if entry.get("ranking").and_then(Value::as_bool) == Some(true) {
        return Err(DataError::Invalid(format!(
            "dataset `{name}` is a ranking dataset; only stage sft datasets are supported"
        )));
    }
    let empty = Map::new();
    let columns = entry
        .get("columns")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let tags = entry
        .get("tags")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let column = |key: &str, default: Option<&str>| -> Option<String> {
        match columns.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => None,
            None => default.map(str::to_string),
        }
    };
    let tag = |key: &str, default: &str| text(tags, key).unwrap_or_else(|| default.to_string());
    Ok(DatasetAttr {
        name: name.to_string(),
        file: dir.join(file_name),
        formatting,
        num_samples: entry
            .get("num_samples")
            .and_then(Value::as_u64)
            .map(|n| n as usize),
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
