//! Rows of a dataset: a JSON array file, a JSON-lines file, or a folder of such files.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{DataError, Result};

/// The files behind a dataset path: the file itself, or every file of the folder in name order
/// (LLaMA-Factory takes the folder's listing order, which the file system decides).
pub fn dataset_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| DataError::io(path, e))?
        .map(|entry| entry.map(|e| e.path()).map_err(|e| DataError::io(path, e)))
        .collect::<Result<_>>()?;
    files.sort();
    Ok(files)
}

/// Every row of `files`, in order; each row must be a JSON object.
pub fn read_rows(files: &[PathBuf]) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for file in files {
        rows.extend(read_file(file)?);
    }
    Ok(rows)
}

fn read_file(path: &Path) -> Result<Vec<Value>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json" | "jsonl") => {}
        _ => {
            return Err(DataError::Args(format!(
                "{} is not a .json or .jsonl file; only JSON and JSON-lines datasets are supported",
                path.display()
            )))
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let json_error = |line: usize, e: serde_json::Error| DataError::Json {
        path: path.to_path_buf(),
        line,
        message: e.to_string(),
    };
    // Like the `json` loader of `datasets`, either layout is accepted whatever the extension.
    let rows: Vec<Value> = if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| json_error(e.line(), e))?
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| serde_json::from_str(line).map_err(|e| json_error(i + 1, e)))
            .collect::<Result<_>>()?
    };
    if let Some(position) = rows.iter().position(|r| !r.is_object()) {
        return Err(DataError::Args(format!(
            "row {position} of {} is not a JSON object; every example must be an object of columns",
            path.display()
        )));
    }
    Ok(rows)
}
