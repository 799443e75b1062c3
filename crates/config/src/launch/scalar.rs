//! Scalars as accelerate reads them: booleans in any of the spellings of its `str_to_bool`
//! (launch flags arrive as text), counts, and names.

use serde_yaml::Value;

use crate::value::{read, render};
use crate::ConfigError;

pub(super) fn read_bool(key: &str, value: &Value) -> Result<bool, ConfigError> {
    let parsed = match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(s) => parse_bool_text(s),
        _ => None,
    };
    parsed.ok_or_else(|| ConfigError::BadValue {
        key: key.into(),
        expected: "true or false",
        got: render(value),
    })
}

/// accelerate's `str_to_bool` spellings.
pub(super) fn parse_bool_text(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "t" | "true" | "on" | "1" => Some(true),
        "n" | "no" | "f" | "false" | "off" | "0" => Some(false),
        _ => None,
    }
}

pub(super) fn read_count(key: &str, value: &Value) -> Result<usize, ConfigError> {
    read::<usize>(key, value)
}

pub(super) fn read_text(key: &str, value: &Value) -> Result<String, ConfigError> {
    read::<String>(key, value)
}

/// A whole number that may be written as a float (`1e8`, `100000000.0`).
pub(super) fn read_whole(key: &str, value: &Value) -> Result<u64, ConfigError> {
    if let Ok(exact) = read::<u64>(key, value) {
        return Ok(exact);
    }
    let float = read::<f64>(key, value)
        .ok()
        .filter(|v| *v >= 0.0 && v.fract() == 0.0 && *v <= u64::MAX as f64);
    float
        .map(|v| v as u64)
        .ok_or_else(|| ConfigError::BadValue {
            key: key.into(),
            expected: "a non-negative whole number",
            got: render(value),
        })
}
