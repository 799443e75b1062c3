//! Typed reading of one YAML value, with LLaMA-Factory's leniency: numbers written as strings
//! (`1e-4` is a string to YAML 1.1 readers) and `key=value` overrides convert like typed values.

use serde_yaml::Value;

use crate::error::ConfigError;

pub trait FromYaml: Sized {
    /// What a value must be, for the error message (`a number`, `true or false`, ...).
    const EXPECTED: &'static str;
    fn from_yaml(value: &Value) -> Option<Self>;
}

pub fn read<T: FromYaml>(key: &str, value: &Value) -> Result<T, ConfigError> {
    T::from_yaml(value).ok_or_else(|| ConfigError::BadValue {
        key: key.to_string(),
        expected: T::EXPECTED,
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
    const EXPECTED: &'static str = "a string";
    fn from_yaml(value: &Value) -> Option<Self> {
        scalar_text(value)
    }
}

impl FromYaml for f64 {
    const EXPECTED: &'static str = "a number";
    fn from_yaml(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
        .filter(|v: &f64| v.is_finite())
    }
}

impl FromYaml for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_yaml(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

impl FromYaml for u64 {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_yaml(value: &Value) -> Option<Self> {
        match value {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

impl FromYaml for usize {
    const EXPECTED: &'static str = "a non-negative integer";
    fn from_yaml(value: &Value) -> Option<Self> {
        u64::from_yaml(value).map(|v| v as usize)
    }
}

impl FromYaml for bool {
    const EXPECTED: &'static str = "true or false";
    fn from_yaml(value: &Value) -> Option<Self> {
        match value {
            Value::Bool(b) => Some(*b),
            Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }
}

impl<T: FromYaml> FromYaml for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_yaml(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            Value::String(s) if s.trim().eq_ignore_ascii_case("null") || s.trim() == "None" => {
                Some(None)
            }
            v => T::from_yaml(v).map(Some),
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
    const EXPECTED: &'static str = "a comma-separated list of names";
    fn from_yaml(value: &Value) -> Option<Self> {
        let items: Vec<String> = match value {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items.iter().filter_map(scalar_text).collect(),
            v => scalar_text(v)?
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
        };
        Some(CommaList(
            items.into_iter().filter(|s| !s.is_empty()).collect(),
        ))
    }
}

/// Any YAML value kept as it is (for keys such as `lr_scheduler_kwargs`).
impl FromYaml for Value {
    const EXPECTED: &'static str = "a value";
    fn from_yaml(value: &Value) -> Option<Self> {
        Some(value.clone())
    }
}
