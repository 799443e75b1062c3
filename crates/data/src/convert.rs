//! Alpaca and ShareGPT rows turned into one shape: prompt messages, the response, system and
//! tools, following LLaMA-Factory's dataset converters.

use serde_json::Value;

use crate::registry::{DatasetAttr, Formatting};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
    Observation,
    Function,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A training example before templating. Rows LLaMA-Factory treats as broken convert to an
/// empty prompt, which the supervised processor then drops.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub prompt: Vec<Message>,
    pub response: Vec<Message>,
    pub system: String,
    pub tools: String,
}

/// The row's value for a column; a column some rows lack reads as null in those rows, as in a
/// table built from all rows.
fn cell<'a>(row: &'a Value, column: &Option<String>) -> &'a Value {
    column
        .as_ref()
        .and_then(|c| row.get(c))
        .unwrap_or(&Value::Null)
}

/// A text cell: null and empty read as "", other non-strings are an error.
fn text_cell(value: &Value, what: &str) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        other => Err(format!("its {what} must be a string, found {other}")),
    }
}

/// The tools cell: a JSON string describing the tools; empty values mean no tools.
fn tools_cell(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Null | Value::Bool(false) => Ok(String::new()),
        Value::Array(a) if a.is_empty() => Ok(String::new()),
        Value::Object(o) if o.is_empty() => Ok(String::new()),
        other => Err(format!(
            "its tools must be a JSON string holding the tool list, found {other}"
        )),
    }
}

pub fn convert(row: &Value, attr: &DatasetAttr) -> Result<Conversation, String> {
    let tools = tools_cell(cell(row, &attr.tools))?;
    match attr.formatting {
        Formatting::Alpaca => alpaca(row, attr, tools),
        Formatting::Sharegpt => sharegpt(row, attr, tools),
    }
}

fn alpaca(row: &Value, attr: &DatasetAttr, tools: String) -> Result<Conversation, String> {
    let mut prompt = Vec::new();
    if let Value::Array(turns) = cell(row, &attr.history) {
        for turn in turns {
            let Some([old_prompt, old_response]) = turn.as_array().map(Vec::as_slice) else {
                return Err(format!(
                    "each history entry must be a [prompt, response] pair, found {turn}"
                ));
            };
            prompt.push(Message::new(Role::User, text_cell(old_prompt, "history")?));
            prompt.push(Message::new(
                Role::Assistant,
                text_cell(old_response, "history")?,
            ));
        }
    }
    let mut query = Vec::new();
    for (column, what) in [(&attr.prompt, "prompt"), (&attr.query, "query")] {
        let text = text_cell(cell(row, column), what)?;
        if !text.is_empty() {
            query.push(text);
        }
    }
    prompt.push(Message::new(Role::User, query.join("\n")));
    // A response that is not a string makes the row unsupervised, which SFT drops.
    let response = match cell(row, &attr.response) {
        Value::String(s) => vec![Message::new(Role::Assistant, s.clone())],
        _ => Vec::new(),
    };
    Ok(Conversation {
        prompt,
        response,
        system: text_cell(cell(row, &attr.system), "system")?,
        tools,
    })
}

fn sharegpt(row: &Value, attr: &DatasetAttr, tools: String) -> Result<Conversation, String> {
    let messages = match cell(row, &Some(attr.messages.clone())) {
        Value::Array(m) => m.as_slice(),
        other => {
            return Err(format!(
                "its `{}` must be a list of messages, found {other}",
                attr.messages
            ))
        }
    };
    let role_of = |m: &Value| {
        m.get(&attr.role_tag)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let content_of = |m: &Value| {
        text_cell(
            m.get(&attr.content_tag).unwrap_or(&Value::Null),
            "message content",
        )
    };
    let (system, messages) = match messages.first() {
        Some(first) if role_of(first).as_deref() == Some(attr.system_tag.as_str()) => {
            (content_of(first)?, &messages[1..])
        }
        _ => (text_cell(cell(row, &attr.system), "system")?, messages),
    };
    let broken = Conversation {
        prompt: Vec::new(),
        response: Vec::new(),
        system: system.clone(),
        tools: tools.clone(),
    };
    let mut aligned = Vec::with_capacity(messages.len());
    for (turn, m) in messages.iter().enumerate() {
        let tag = role_of(m).unwrap_or_default();
        // Even turns come from the user side, odd turns from the assistant side.
        let role = if turn % 2 == 0 {
            if tag == attr.user_tag {
                Role::User
            } else if tag == attr.observation_tag {
                Role::Observation
            } else {
                return Ok(broken);
            }
        } else if tag == attr.assistant_tag {
            Role::Assistant
        } else if tag == attr.function_tag {
            Role::Function
        } else {
            return Ok(broken);
        };
        aligned.push((role, m));
    }
    if aligned.len() % 2 != 0 {
        return Ok(broken);
    }
    // Contents are checked only for rows that are kept, since broken rows are dropped anyway.
    let mut aligned = aligned
        .into_iter()
        .map(|(role, m)| Ok(Message::new(role, content_of(m)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let response = aligned.split_off(aligned.len().saturating_sub(1));
    Ok(Conversation {
        prompt: aligned,
        response,
        system,
        tools,
    })
}
