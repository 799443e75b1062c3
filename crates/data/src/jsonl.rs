//! Examples as JSON lines, `{"input_ids": [...], "labels": [...]}`, written the way Python's
//! `json.dumps` writes them (LLaMA-Factory's reference files use this layout).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use crate::error::{DataError, Result};
use crate::supervised::Example;

fn push_list<T: std::fmt::Display>(out: &mut String, items: &[T]) {
    out.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        let _ = write!(out, "{item}");
    }
    out.push(']');
}

/// One line per example, each ending with a newline.
pub fn to_json_lines(examples: &[Example]) -> String {
    let mut out = String::new();
    for example in examples {
        out.push_str("{\"input_ids\": ");
        push_list(&mut out, &example.input_ids);
        out.push_str(", \"labels\": ");
        push_list(&mut out, &example.labels);
        out.push_str("}\n");
    }
    out
}

/// Writes `examples` to `path` through a temporary file, so a partly written file never has
/// the final name.
pub fn write_json_lines(path: &Path, examples: &[Example]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let lines = to_json_lines(examples);
    Ok(ff_fsio::write_atomically(path, |file| {
        file.write_all(lines.as_bytes())
    })?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_use_python_separators() {
        let examples = [Example {
            input_ids: vec![1, 2],
            labels: vec![-100, 2],
        }];
        assert_eq!(
            to_json_lines(&examples),
            "{\"input_ids\": [1, 2], \"labels\": [-100, 2]}\n"
        );
    }
}
