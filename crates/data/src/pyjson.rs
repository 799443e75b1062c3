//! JSON as Python's `json` module sees it. Tool descriptions and function calls are parsed and
//! printed again by LLaMA-Factory with `json.loads` / `json.dumps(..., ensure_ascii=False)` and
//! `str()`; the tokens depend on those exact characters, so key order is kept and numbers, strings
//! and nesting are printed the way Python prints them.

use std::fmt::Write;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

/// A parsed JSON value that keeps object keys in file order (like a Python dict).
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    List(Vec<PyValue>),
    Dict(Vec<(String, PyValue)>),
}

impl PyValue {
    /// `json.loads(text)`.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `value.get(key)` on a dict; `None` for other values.
    pub fn get(&self, key: &str) -> Option<&PyValue> {
        match self {
            PyValue::Dict(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            PyValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Python's truth value: empty containers, empty strings, zero, `False` and `None` are false.
    pub fn is_truthy(&self) -> bool {
        match self {
            PyValue::Null => false,
            PyValue::Bool(b) => *b,
            PyValue::Int(i) => *i != 0,
            PyValue::Float(f) => *f != 0.0,
            PyValue::Str(s) => !s.is_empty(),
            PyValue::List(items) => !items.is_empty(),
            PyValue::Dict(items) => !items.is_empty(),
        }
    }

    /// `json.dumps(value, ensure_ascii=False)`.
    pub fn dumps(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out, None, 0);
        out
    }

    /// `json.dumps(value, indent=4, ensure_ascii=False)`.
    pub fn dumps_indented(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out, Some(4), 0);
        out
    }

    /// `str(value)`, as `str.format` inserts it.
    pub fn py_str(&self) -> String {
        match self {
            PyValue::Str(s) => s.clone(),
            other => other.py_repr(),
        }
    }

    /// `repr(value)` of the Python object `json.loads` made.
    pub fn py_repr(&self) -> String {
        match self {
            PyValue::Null => "None".to_string(),
            PyValue::Bool(true) => "True".to_string(),
            PyValue::Bool(false) => "False".to_string(),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => float_repr(*f),
            PyValue::Str(s) => str_repr(s),
            PyValue::List(items) => {
                let inner: Vec<String> = items.iter().map(PyValue::py_repr).collect();
                format!("[{}]", inner.join(", "))
            }
            PyValue::Dict(items) => {
                let inner: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!("{}: {}", str_repr(k), v.py_repr()))
                    .collect();
                format!("{{{}}}", inner.join(", "))
            }
        }
    }

    fn write_json(&self, out: &mut String, indent: Option<usize>, level: usize) {
        // With an indent Python separates items by "," plus a newline, without one by ", ".
        let newline = |out: &mut String, level: usize| {
            if let Some(width) = indent {
                out.push('\n');
                out.extend(std::iter::repeat_n(' ', width * level));
            }
        };
        let item_separator = if indent.is_some() { "," } else { ", " };
        match self {
            PyValue::Null => out.push_str("null"),
            PyValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            PyValue::Int(i) => {
                let _ = write!(out, "{i}");
            }
            PyValue::Float(f) => out.push_str(&float_json(*f)),
            PyValue::Str(s) => write_json_string(out, s),
            PyValue::List(items) if items.is_empty() => out.push_str("[]"),
            PyValue::Dict(items) if items.is_empty() => out.push_str("{}"),
            PyValue::List(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_separator);
                    }
                    newline(out, level + 1);
                    item.write_json(out, indent, level + 1);
                }
                newline(out, level);
                out.push(']');
            }
            PyValue::Dict(items) => {
                out.push('{');
                for (i, (key, value)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(item_separator);
                    }
                    newline(out, level + 1);
                    write_json_string(out, key);
                    out.push_str(": ");
                    value.write_json(out, indent, level + 1);
                }
                newline(out, level);
                out.push('}');
            }
        }
    }
}

/// A JSON string literal as `json.dumps(..., ensure_ascii=False)` writes it: only `"`, `\` and
/// control characters are escaped.
fn write_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `repr(str)`: single quotes unless the text has a single quote and no double quote.
/// Non-printable characters outside ASCII and Latin-1 controls are kept as they are, where
/// Python would escape a few rare ones (format and private-use characters).
fn str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || (0x7f..=0xa0).contains(&(c as u32)) || c == '\u{ad}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// `float.__repr__`: the shortest digits that round-trip, in fixed notation when the decimal
/// exponent is in [-4, 16), otherwise as `d.ddde+XX`.
pub fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    // Rust's `{:e}` also prints the shortest round-trip digits, e.g. "-1.25e-7".
    let scientific = format!("{f:e}");
    let Some((mantissa, Ok(exponent))) = scientific
        .split_once('e')
        .map(|(m, e)| (m, e.parse::<i32>()))
    else {
        return scientific;
    };
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let point = exponent + 1;
    if !(-4..16).contains(&exponent) {
        let (first, rest) = digits.split_at(1);
        let fraction = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        return format!("{sign}{first}{fraction}e{exp_sign}{:02}", exponent.abs());
    }
    let body = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (whole, fraction) = digits.split_at(point as usize);
        format!("{whole}.{fraction}")
    };
    format!("{sign}{body}")
}

/// A float in `json.dumps`: its repr, with JavaScript's names for the special values.
fn float_json(f: f64) -> String {
    if f.is_nan() {
        "NaN".to_string()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string()
    } else {
        float_repr(f)
    }
}

impl<'de> Deserialize<'de> for PyValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PyValueVisitor)
    }
}

struct PyValueVisitor;

impl<'de> Visitor<'de> for PyValueVisitor {
    type Value = PyValue;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<PyValue, E> {
        Ok(PyValue::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<PyValue, E> {
        Ok(PyValue::Int(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<PyValue, E> {
        Ok(PyValue::Int(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<PyValue, E> {
        Ok(PyValue::Float(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<PyValue, E> {
        Ok(PyValue::Str(v.to_string()))
    }

    fn visit_string<E>(self, v: String) -> Result<PyValue, E> {
        Ok(PyValue::Str(v))
    }

    fn visit_unit<E>(self) -> Result<PyValue, E> {
        Ok(PyValue::Null)
    }

    fn visit_none<E>(self) -> Result<PyValue, E> {
        Ok(PyValue::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<PyValue, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(PyValue::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<PyValue, A::Error> {
        let mut items: Vec<(String, PyValue)> = Vec::new();
        while let Some((key, value)) = map.next_entry::<String, PyValue>()? {
            // A repeated key keeps its first position and takes the last value, as in a dict.
            match items.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = value,
                None => items.push((key, value)),
            }
        }
        Ok(PyValue::Dict(items))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        let cases = [
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (1.0, "1.0"),
            (0.5, "0.5"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-7, "1.5e-07"),
            (123456.789, "123456.789"),
            (1.1e-5, "1.1e-05"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1e100, "1e+100"),
        ];
        for (value, expected) in cases {
            assert_eq!(float_repr(value), expected, "{value:e}");
        }
    }

    #[test]
    fn dumps_keeps_key_order_and_python_separators() {
        let v = PyValue::parse(r#"{"b": 1, "a": [1.0, 1e-05, "Zürich", null, true], "c": {}}"#)
            .unwrap();
        assert_eq!(
            v.dumps(),
            r#"{"b": 1, "a": [1.0, 1e-05, "Zürich", null, true], "c": {}}"#
        );
        assert_eq!(
            v.dumps_indented(),
            "{\n    \"b\": 1,\n    \"a\": [\n        1.0,\n        1e-05,\n        \"Zürich\",\n        null,\n        true\n    ],\n    \"c\": {}\n}"
        );
    }

    #[test]
    fn strings_escape_like_python() {
        let v = PyValue::Str("a\"b\\c\nd\u{1}é".to_string());
        assert_eq!(v.dumps(), r#""a\"b\\c\nd\u0001é""#);
        assert_eq!(PyValue::Str("it's".into()).py_repr(), r#""it's""#);
        assert_eq!(PyValue::Str("say \"hi\"".into()).py_repr(), r#"'say "hi"'"#);
        assert_eq!(PyValue::Str("both ' \"".into()).py_repr(), r#"'both \' "'"#);
    }

    #[test]
    fn str_of_containers_is_their_repr() {
        let v = PyValue::parse(r#"{"type": ["string", "null"], "n": 3, "ok": false, "x": null}"#)
            .unwrap();
        assert_eq!(
            v.py_str(),
            "{'type': ['string', 'null'], 'n': 3, 'ok': False, 'x': None}"
        );
        assert_eq!(v.get("type").unwrap().py_str(), "['string', 'null']");
    }

    #[test]
    fn repeated_keys_keep_first_position_and_last_value() {
        let v = PyValue::parse(r#"{"a": 1, "b": 2, "a": 3}"#).unwrap();
        assert_eq!(v.dumps(), r#"{"a": 3, "b": 2}"#);
    }
}
