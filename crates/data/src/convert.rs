//! Alpaca and ShareGPT rows turned into one shape: prompt messages, one response, system, tools.

use serde_json::Value;

use crate::error::{DataError, Result};
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

/// A training example before templating. Broken rows convert to an empty prompt, which the
/// supervised processor then drops, as LLaMA-Factory does.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    pub prompt: Vec<Message>,
    pub response: Vec<Message>,
    pub system: String,
    pub tools: String,
}

fn column<'a>(
    row: &'a Value,
    attr: &DatasetAttr,
    name: &Option<String>,
    index: usize,
) -> Result<Option<&'a Value>> {
    let Some(name) = name else { return Ok(None) };
    match row.get(name) {
        Some(v) => Ok(Some(v)),
        None => Err(DataError::Invalid(format!(
            "dataset `{}` names column `{name}` in dataset_info.json, but example {index} of {} has no such column",
            attr.name,
            attr.file.display()
        ))),
    }
}

fn as_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

pub fn convert(row: &Value, attr: &DatasetAttr, index: usize) -> Result<Conversation> {
    let system = as_text(column(row, attr, &attr.system, index)?);
    let tools = as_text(column(row, attr, &attr.tools, index)?);
    match attr.formatting {
        Formatting::Alpaca => alpaca(row, attr, index, system, tools),
        Formatting::Sharegpt => sharegpt(row, attr, index, system, tools),
    }
}

fn alpaca(
    row: &Value,
    attr: &DatasetAttr,
    index: usize,
    system: String,
    tools: String,
) -> Result<Conversation> {
    let mut prompt = Vec::new();
    if let Some(Value::Array(turns)) = column(row, attr, &attr.history, index)? {
        for turn in turns {
            if let Some([old_prompt, old_response]) = turn.as_array().map(Vec::as_slice) {
                prompt.push(Message {
                    role: Role::User,
                    content: as_text(Some(old_prompt)),
                });
                prompt.push(Message {
                    role: Role::Assistant,
                    content: as_text(Some(old_response)),
                });
            }
        }
    }
    let mut query = Vec::new();
    for name in [&attr.prompt, &attr.query] {
        let text = as_text(column(row, attr, name, index)?);
        if !text.is_empty() {
            query.push(text);
        }
    }
    prompt.push(Message {
        role: Role::User,
        content: query.join("\n"),
    });
    let response = match column(row, attr, &attr.response, index)? {
        Some(Value::String(s)) => vec![Message {
            role: Role::Assistant,
            content: s.clone(),
        }],
        _ => Vec::new(),
    };
    Ok(Conversation {
        prompt,
        response,
        system,
        tools,
    })
}

fn sharegpt(
    row: &Value,
    attr: &DatasetAttr,
    index: usize,
    system: String,
    tools: String,
) -> Result<Conversation> {
    let messages = match column(row, attr, &Some(attr.messages.clone()), index)? {
        Some(Value::Array(m)) => m.as_slice(),
        _ => &[],
    };
    let role_of = |m: &Value| {
        m.get(&attr.role_tag)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let content_of = |m: &Value| as_text(m.get(&attr.content_tag));
    let (system, messages) = match messages.first() {
        Some(first) if role_of(first) == attr.system_tag => (content_of(first), &messages[1..]),
        _ => (system, messages),
    };
    let mut aligned = Vec::with_capacity(messages.len());
    let mut broken = false;
    for (turn, m) in messages.iter().enumerate() {
        let tag = role_of(m);
        let role = if turn % 2 == 0 {
            if tag == attr.user_tag {
                Some(Role::User)
            } else if tag == attr.observation_tag {
                Some(Role::Observation)
            } else {
                None
            }
        } else if tag == attr.assistant_tag {
            Some(Role::Assistant)
        } else if tag == attr.function_tag {
            Some(Role::Function)
        } else {
            None
        };
        match role {
            Some(role) => aligned.push(Message {
                role,
                content: content_of(m),
            }),
            None => {
                broken = true;
                break;
            }
        }
    }
    if broken || aligned.len() % 2 != 0 {
        return Ok(Conversation {
            prompt: Vec::new(),
            response: Vec::new(),
            system,
            tools,
        });
    }
    let response = aligned.split_off(aligned.len().saturating_sub(1));
    Ok(Conversation {
        prompt: aligned,
        response,
        system,
        tools,
    })
}
