//! Tool formats: how the tool list is written into the system prompt and how an assistant's
//! function calls are written, per LLaMA-Factory's tool utils (`default`, `qwen`, `llama3`,
//! `mistral`).

use crate::pyjson::PyValue;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ToolFormat {
    /// "Action: name / Action Input: {...}" in the assistant's own words.
    Default,
    /// Qwen 2.5: JSON lines in `<tools>` and `<tool_call>` tags.
    Qwen,
    /// Llama 3.1 JSON tool calling, with a dated preamble.
    Llama3,
    /// Mistral v0.3: `[AVAILABLE_TOOLS]` and a JSON list of calls.
    Mistral,
}

pub const TOOL_FORMAT_NAMES: &[&str] = &["default", "llama3", "mistral", "qwen"];

/// One call parsed from a function message: `{"name": ..., "arguments": ...}`.
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionCall {
    pub name: PyValue,
    pub arguments: PyValue,
}

const DEFAULT_TOOL_PROMPT_HEAD: &str = "You have access to the following tools:\n";
const DEFAULT_TOOL_PROMPT_TAIL: &str = "Use the following format if using a tool:\n```\n\
Action: tool name (one of [{tool_names}])\n\
Action Input: the input to the tool, in a JSON format representing the kwargs \
(e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n";

const QWEN_TOOL_PROMPT_HEAD: &str =
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
const QWEN_TOOL_PROMPT_TAIL: &str = "\n</tools>\n\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \
\"arguments\": <args-json-object>}\n</tool_call>";

const LLAMA3_TOOL_PROMPT_HEAD: &str = "Cutting Knowledge Date: December 2023\nToday Date: ";
const LLAMA3_TOOL_PROMPT_MIDDLE: &str = "\n\nYou have access to the following functions. \
To call a function, please respond with JSON for a function call. \
Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}. \
Do not use variables.\n\n";

impl ToolFormat {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" => Self::Default,
            "qwen" => Self::Qwen,
            "llama3" => Self::Llama3,
            "mistral" => Self::Mistral,
            _ => return None,
        })
    }

    /// The text appended to the system prompt for the tools column `tools` (a JSON string);
    /// `date` is llama3's "Today Date" (`%d %b %Y`).
    pub fn tool_prompt(&self, tools: &str, date: &str) -> Result<String, String> {
        let parsed = PyValue::parse(tools)
            .map_err(|e| format!("its tools are not valid JSON ({e}): {tools:?}"))?;
        let tools = match &parsed {
            PyValue::List(items) if !items.is_empty() => items.as_slice(),
            PyValue::List(_) | PyValue::Dict(_) if !parsed.is_truthy() => return Ok(String::new()),
            _ => {
                return Err(format!(
                    "its tools must be a JSON list of tool objects: {tools:?}"
                ))
            }
        };
        for tool in tools {
            if !matches!(tool, PyValue::Dict(_)) {
                return Err(format!(
                    "each tool must be a JSON object, found {}",
                    tool.dumps()
                ));
            }
        }
        match self {
            Self::Default => default_tool_prompt(tools),
            Self::Qwen => {
                let mut text = String::from(QWEN_TOOL_PROMPT_HEAD);
                for tool in tools {
                    text.push('\n');
                    text.push_str(&wrap_function(tool).dumps());
                }
                text.push_str(QWEN_TOOL_PROMPT_TAIL);
                Ok(text)
            }
            Self::Llama3 => {
                let mut text =
                    format!("{LLAMA3_TOOL_PROMPT_HEAD}{date}{LLAMA3_TOOL_PROMPT_MIDDLE}");
                for tool in tools {
                    text.push_str(&wrap_function(tool).dumps_indented());
                    text.push_str("\n\n");
                }
                Ok(text)
            }
            Self::Mistral => {
                let wrapped = PyValue::List(tools.iter().map(wrap_function).collect());
                Ok(format!(
                    "[AVAILABLE_TOOLS] {}[/AVAILABLE_TOOLS]",
                    wrapped.dumps()
                ))
            }
        }
    }

    /// The assistant text for `calls`.
    pub fn function_text(&self, calls: &[FunctionCall]) -> String {
        match self {
            Self::Default => calls
                .iter()
                .map(|c| {
                    format!(
                        "Action: {}\nAction Input: {}",
                        c.name.py_str(),
                        c.arguments.dumps()
                    )
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Self::Qwen => calls
                .iter()
                .map(|c| {
                    let call = dict([("name", c.name.clone()), ("arguments", c.arguments.clone())]);
                    format!("<tool_call>\n{}\n</tool_call>", call.dumps())
                })
                .collect::<Vec<_>>()
                .join("\n"),
            Self::Llama3 => {
                let mut objects: Vec<PyValue> = calls
                    .iter()
                    .map(|c| {
                        dict([
                            ("name", c.name.clone()),
                            ("parameters", c.arguments.clone()),
                        ])
                    })
                    .collect();
                if objects.len() == 1 {
                    objects.remove(0).dumps()
                } else {
                    PyValue::List(objects).dumps()
                }
            }
            Self::Mistral => PyValue::List(
                calls
                    .iter()
                    .map(|c| dict([("name", c.name.clone()), ("arguments", c.arguments.clone())]))
                    .collect(),
            )
            .dumps(),
        }
    }
}

/// A calendar date.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CivilDate {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

/// The date of a day number counted from 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_date(days: u64) -> CivilDate {
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * shifted_month + 2) / 5 + 1) as u32;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    CivilDate { year, month, day }
}

/// A day number as the llama3 tool prompt writes dates, `%d %b %Y` (e.g. "05 Mar 2026").
fn date_of_day(days: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let date = civil_date(days);
    format!(
        "{:02} {} {}",
        date.day,
        MONTHS[date.month as usize - 1],
        date.year
    )
}

/// Today's date (UTC) in the llama3 tool prompt's format.
pub fn today() -> String {
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86_400)
        .unwrap_or(0);
    date_of_day(days)
}

fn dict<const N: usize>(items: [(&str, PyValue); N]) -> PyValue {
    PyValue::Dict(items.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Tools already of `"type": "function"` stay as they are; others are wrapped in one.
fn wrap_function(tool: &PyValue) -> PyValue {
    if tool.get("type").and_then(PyValue::as_str) == Some("function") {
        tool.clone()
    } else {
        dict([
            ("type", PyValue::Str("function".into())),
            ("function", tool.clone()),
        ])
    }
}

/// The default format lists each tool's arguments with their type, whether they are required,
/// their description, allowed values and item type.
fn default_tool_prompt(tools: &[PyValue]) -> Result<String, String> {
    let mut tool_text = String::new();
    let mut tool_names = Vec::new();
    for tool in tools {
        let tool = if tool.get("type").and_then(PyValue::as_str) == Some("function") {
            tool.get("function")
                .ok_or("a tool of type `function` has no `function` object")?
        } else {
            tool
        };
        let name = tool.get("name").ok_or("a tool has no `name`")?.py_str();
        let parameters = tool
            .get("parameters")
            .ok_or_else(|| format!("tool `{name}` has no `parameters`"))?;
        let PyValue::Dict(properties) = parameters
            .get("properties")
            .ok_or_else(|| format!("the parameters of tool `{name}` have no `properties`"))?
        else {
            return Err(format!(
                "the `properties` of tool `{name}` must be a JSON object"
            ));
        };
        let required = parameters.get("required");
        let mut args_text = String::new();
        for (arg, param) in properties {
            if !matches!(param, PyValue::Dict(_)) {
                return Err(format!(
                    "argument `{arg}` of tool `{name}` must be a JSON object"
                ));
            }
            let is_required = match required {
                Some(PyValue::List(names)) => names.iter().any(|n| n.as_str() == Some(arg)),
                Some(PyValue::Str(names)) => names.contains(arg.as_str()),
                _ => false,
            };
            let text_of = |key: &str| param.get(key).map(PyValue::py_str).unwrap_or_default();
            let enum_text = match param.get("enum") {
                Some(values) if values.is_truthy() => {
                    let values: Vec<String> = match values {
                        PyValue::List(items) => items
                            .iter()
                            .map(|v| v.as_str().map(str::to_string))
                            .collect::<Option<_>>()
                            .ok_or_else(|| {
                                format!("the enum of argument `{arg}` of tool `{name}` must hold strings")
                            })?,
                        PyValue::Str(s) => s.chars().map(String::from).collect(),
                        _ => {
                            return Err(format!(
                                "the enum of argument `{arg}` of tool `{name}` must be a list of strings"
                            ))
                        }
                    };
                    format!(", should be one of [{}]", values.join(", "))
                }
                _ => String::new(),
            };
            let items_text = match param.get("items") {
                Some(items) if items.is_truthy() => {
                    if !matches!(items, PyValue::Dict(_)) {
                        return Err(format!(
                            "the items of argument `{arg}` of tool `{name}` must be a JSON object"
                        ));
                    }
                    let item_type = items.get("type").map(PyValue::py_str).unwrap_or_default();
                    format!(", where each item should be {item_type}")
                }
                _ => String::new(),
            };
            args_text.push_str(&format!(
                "  - {arg} ({}{}): {}{enum_text}{items_text}\n",
                text_of("type"),
                if is_required { ", required" } else { "" },
                text_of("description"),
            ));
        }
        let description = tool
            .get("description")
            .map(PyValue::py_str)
            .unwrap_or_default();
        tool_text.push_str(&format!(
            "> Tool Name: {name}\nTool Description: {description}\nTool Args:\n{args_text}\n"
        ));
        tool_names.push(name);
    }
    Ok(format!(
        "{DEFAULT_TOOL_PROMPT_HEAD}{tool_text}{}",
        DEFAULT_TOOL_PROMPT_TAIL.replace("{tool_names}", &tool_names.join(", "))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOOLS: &str = r#"[{"name": "get_weather", "description": "Weather.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}, "unit": {"type": "string", "enum": ["c", "f"]}, "days": {"type": "array", "items": {"type": "integer"}}}, "required": ["city"]}}]"#;

    fn call(text: &str) -> FunctionCall {
        let v = PyValue::parse(text).unwrap();
        FunctionCall {
            name: v.get("name").unwrap().clone(),
            arguments: v.get("arguments").unwrap().clone(),
        }
    }

    #[test]
    fn default_prompt_lists_arguments() {
        let text = ToolFormat::Default.tool_prompt(TOOLS, "").unwrap();
        assert_eq!(
            text,
            "You have access to the following tools:\n\
             > Tool Name: get_weather\nTool Description: Weather.\nTool Args:\n\
             \x20 - city (string, required): City\n\
             \x20 - unit (string): , should be one of [c, f]\n\
             \x20 - days (array): , where each item should be integer\n\n\
             Use the following format if using a tool:\n```\n\
             Action: tool name (one of [get_weather])\n\
             Action Input: the input to the tool, in a JSON format representing the kwargs \
             (e.g. ```{\"input\": \"hello world\", \"num_beams\": 5}```)\n```\n"
        );
    }

    #[test]
    fn empty_tool_list_adds_nothing() {
        assert_eq!(ToolFormat::Qwen.tool_prompt("[]", "").unwrap(), "");
        assert!(ToolFormat::Qwen
            .tool_prompt("{\"name\": 1}", "")
            .unwrap_err()
            .contains("JSON list"));
    }

    #[test]
    fn function_calls_per_format() {
        let calls = [call(r#"{"name": "f", "arguments": {"x": 1.0, "y": "é"}}"#)];
        assert_eq!(
            ToolFormat::Default.function_text(&calls),
            "Action: f\nAction Input: {\"x\": 1.0, \"y\": \"é\"}"
        );
        assert_eq!(
            ToolFormat::Qwen.function_text(&calls),
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"x\": 1.0, \"y\": \"é\"}}\n</tool_call>"
        );
        assert_eq!(
            ToolFormat::Llama3.function_text(&calls),
            "{\"name\": \"f\", \"parameters\": {\"x\": 1.0, \"y\": \"é\"}}"
        );
        assert_eq!(
            ToolFormat::Mistral.function_text(&calls),
            "[{\"name\": \"f\", \"arguments\": {\"x\": 1.0, \"y\": \"é\"}}]"
        );
    }

    #[test]
    fn dates_are_civil_dates() {
        assert_eq!(date_of_day(0), "01 Jan 1970");
        assert_eq!(date_of_day(20_468), "15 Jan 2026");
        assert_eq!(date_of_day(19_782), "29 Feb 2024");
        assert_eq!(date_of_day(11_016), "29 Feb 2000");
    }

    #[test]
    fn llama3_prompt_carries_the_date() {
        let text = ToolFormat::Llama3
            .tool_prompt(TOOLS, "15 Jan 2026")
            .unwrap();
        assert!(
            text.starts_with("Cutting Knowledge Date: December 2023\nToday Date: 15 Jan 2026\n\n")
        );
        assert!(text.contains("{\n    \"type\": \"function\",\n    \"function\": {\n        \"name\": \"get_weather\""));
        assert!(text.ends_with("}\n\n"));
    }
}
