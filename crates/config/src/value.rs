//! Typed reading of one YAML value, with LLaMA-Factory's leniency: numbers written as strings
//! (`1e-4` is a string to YAML 1.1 readers) and `key=value` overrides convert like typed values.

use serde_yaml::Value;

use crate::choices::Choice;
use crate::error::ConfigError;

pub trait FromYaml: Sized {
    /// `key`'s value, or the one-sentence error that names the key and what it must be.
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError>;
}

pub fn read<T: FromYaml>(key: &str, value: &Value) -> Result<T, ConfigError> {
    T::read(key, value)
}

/// `parsed`, or the error saying that `key` must be `expected`.
fn expect<T>(
    key: &str,
    value: &Value,
    expected: &'static str,
    parsed: Option<T>,
) -> Result<T, ConfigError> {
    parsed.ok_or_else(|| ConfigError::BadValue {
        key: key.to_string(),
        expected,
        got: render(value),
    })
}

pub fn render(value: &Value) -> String {
    match value {
        Value::String(s) => format!("'{s}'"),
        other => serde_yaml::to_string(other)
            .map(|s| s.trim_end().to_string())
            .unwrap_or_else(|_| "?".into()),
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl FromYaml for String {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        expect(key, value, "a string", scalar_text(value))
    }
}

impl FromYaml for f64 {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let parsed = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        expect(
            key,
            value,
            "a number",
            parsed.filter(|v: &f64| v.is_finite()),
        )
    }
}

impl FromYaml for i64 {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let parsed = match value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        expect(key, value, "an integer", parsed)
    }
}

impl FromYaml for u64 {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let parsed = match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        expect(key, value, "a non-negative integer", parsed)
    }
}

impl FromYaml for usize {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        u64::read(key, value).map(|v| v as usize)
    }
}

impl FromYaml for bool {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let parsed = match value {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            _ => None,
        };
        expect(key, value, "true or false", parsed)
    }
}

impl<T: FromYaml> FromYaml for Option<T> {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        match value {
            Value::Null => Ok(None),
            Value::String(s) if s.trim().eq_ignore_ascii_case("null") || s.trim() == "None" => {
                Ok(None)
            }
            v => T::read(key, v).map(Some),
        }
    }
}

/// A comma list written either as `a,b` or as a YAML list.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CommaList(pub Vec<String>);

impl CommaList {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn joined(&self) -> String {
        self.0.join(",")
    }
}

impl FromYaml for CommaList {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let items: Vec<String> = match value {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items.iter().filter_map(scalar_text).collect(),
            v => expect(key, v, "a comma-separated list of names", scalar_text(v))?
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        };
        Ok(CommaList(
            items.into_iter().filter(|s| !s.is_empty()).collect(),
        ))
    }
}

/// Any YAML value kept as it is (for keys such as `lr_scheduler_kwargs`).
impl FromYaml for Value {
    fn read(_key: &str, value: &Value) -> Result<Self, ConfigError> {
        Ok(value.clone())
    }
}

impl<T: Choice> FromYaml for T {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        let name = String::read(key, value)?;
        T::from_name(&name).ok_or_else(|| T::refuse(key, &name))
    }
}

/// A comma list of choices, written as [`CommaList`] is.
impl<T: Choice> FromYaml for Vec<T> {
    fn read(key: &str, value: &Value) -> Result<Self, ConfigError> {
        CommaList::read(key, value)?
            .0
            .iter()
            .map(|name| T::from_name(name).ok_or_else(|| T::refuse(key, name)))
            .collect()
    }
}
