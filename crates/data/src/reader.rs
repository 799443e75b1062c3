//! Rows of a dataset file: a JSON array, JSON lines, or a folder of such files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};

pub fn read_rows(path: &Path) -> Result<Vec<Value>> {
    if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| DataError::io(path, e))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("json" | "jsonl")
                )
            })
            .collect();
        files.sort();
        let mut rows = Vec::new();
        for file in files {
            rows.extend(read_file(&file)?);
        }
        return Ok(rows);
    }
    read_file(path)
}

fn read_file(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let json_error = |line: usize, e: serde_json::Error| DataError::Json {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    };
    let is_lines = path.extension().and_then(|e| e.to_str()) == Some("jsonl");
    if !is_lines || text.trim_start().starts_with('[') {
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(rows)) => return Ok(rows),
            Ok(_) if !is_lines => {
                return Err(DataError::Invalid(format!(
                    "{} must hold a JSON array of examples",
                    path.display()
                )))
            }
            Ok(_) => {}
            Err(e) if !is_lines => return Err(json_error(e.line(), e)),
            Err(_) => {}
        }
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| json_error(i + 1, e)))
        .collect()
}
