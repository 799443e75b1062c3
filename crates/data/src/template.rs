//! A chat template: how each role's text is wrapped, and the rules that turn a conversation into
//! (prompt, response) token pairs, as LLaMA-Factory's `Template`, `Llama2Template` and
//! `ReasoningTemplate` do it.

use std::ops::Range;

use crate::convert::{Message, Role};
use crate::error::{DataError, Result};
use crate::pyjson::PyValue;
use crate::tokenizer::Tokenizer;
use crate::tools::{FunctionCall, ToolFormat};

/// A piece of a formatter: text with `{{content}}` (and, for user turns, `{{idx}}`) filled in,
/// or the tokenizer's BOS / EOS token.
#[derive(Clone, Debug, PartialEq)]
pub enum Slot {
    Text(String),
    Bos,
    Eos,
}

/// Where the system prompt goes and whether thoughts get special treatment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// A system turn before the first user message.
    Plain,
    /// The system text is fused into the first user message (llama2, mistral, gemma); function
    /// calls are formatted without looking for thought or tool-call tags.
    Llama2,
    /// Plain, plus an empty thought added to answers that have none (qwen3).
    Reasoning,
}

/// The result of encoding one conversation; the error says why it cannot be encoded.
pub type Encoded<T> = std::result::Result<T, String>;

const THOUGHT_OPEN: &str = "<think>\n";
const THOUGHT_CLOSE: &str = "\n</think>\n\n";
const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";

#[derive(Clone, Debug)]
pub struct Template {
    pub name: String,
    pub kind: TemplateKind,
    pub(crate) user: Vec<Slot>,
    pub(crate) assistant: Vec<Slot>,
    pub(crate) system: Vec<Slot>,
    pub(crate) function: Vec<Slot>,
    pub(crate) observation: Vec<Slot>,
    pub(crate) prefix: Vec<Slot>,
    /// Formats the calls of function messages.
    pub function_format: ToolFormat,
    /// Formats the tool list added to the system prompt.
    pub tool_format: ToolFormat,
    pub default_system: String,
    pub stop_words: Vec<String>,
    /// The EOS token closes the whole sequence instead of each answer (labels then start each
    /// later prompt with EOS).
    pub efficient_eos: bool,
    /// The first stop word becomes the tokenizer's EOS token.
    pub replace_eos: bool,
    /// Reasoning templates: whether the empty thought added to answers is trained on (true) or
    /// part of the prompt (false, and all thoughts are removed).
    pub enable_thinking: bool,
    /// Reasoning templates: keep the thoughts of earlier turns when `mask_history` is on.
    pub preserve_thinking: bool,
    /// "Today Date" of the llama3 tool prompt, as `%d %b %Y`.
    pub tool_date: String,
}

/// `Slot::Text` from a literal.
pub(crate) fn text(s: &str) -> Slot {
    Slot::Text(s.to_string())
}

impl Template {
    /// The slots for the function formatter when only the tool format is chosen: the content
    /// followed by EOS unless EOS is saved for the end.
    pub(crate) fn plain_function_slots(efficient_eos: bool) -> Vec<Slot> {
        if efficient_eos {
            vec![text("{{content}}")]
        } else {
            vec![text("{{content}}"), Slot::Eos]
        }
    }

    /// Uses `format` for both the tool list and function calls, with plain function slots,
    /// as LLaMA-Factory's `tool_format` argument does.
    pub fn set_tool_format(&mut self, format: ToolFormat) {
        self.function = Self::plain_function_slots(self.efficient_eos);
        self.function_format = format;
        self.tool_format = format;
    }

    /// What LLaMA-Factory's `fix_special_tokens` does: the first stop word becomes EOS when the
    /// template replaces it, a tokenizer without EOS gets `<|endoftext|>`, the pad token falls
    /// back to EOS, and the remaining stop words become special tokens.
    pub fn fix_tokenizer(&self, tokenizer: &mut Tokenizer) -> Result<()> {
        let mut stop_words = self.stop_words.as_slice();
        if self.replace_eos {
            let (eos, rest) = stop_words.split_first().ok_or_else(|| {
                DataError::Args(format!(
                    "template `{}` replaces EOS but names no stop word",
                    self.name
                ))
            })?;
            tokenizer.set_eos_token(eos)?;
            stop_words = rest;
        }
        if tokenizer.eos_token_id.is_none() {
            tokenizer.set_eos_token("<|endoftext|>")?;
        }
        if tokenizer.pad_token_id.is_none() {
            tokenizer.pad_token_id = tokenizer.eos_token_id;
        }
        if !stop_words.is_empty() {
            tokenizer.add_special_tokens(stop_words)?;
        }
        Ok(())
    }

    /// Token ids of `slots` with `content` filled in; each text slot is tokenized on its own,
    /// so its boundaries are token boundaries. `idx` fills `{{idx}}` (user turns of plain
    /// templates), after `{{content}}` as LLaMA-Factory does, so a literal `{{idx}}` in the
    /// content is replaced too.
    fn render(
        &self,
        tokenizer: &Tokenizer,
        slots: &[Slot],
        content: &str,
        idx: Option<&str>,
    ) -> Encoded<Vec<u32>> {
        let mut ids = Vec::new();
        for slot in slots {
            match slot {
                Slot::Text(text) => {
                    let mut filled = text.replacen("{{content}}", content, 1);
                    if let Some(idx) = idx {
                        filled = filled.replacen("{{idx}}", idx, 1);
                    }
                    ids.extend(tokenizer.encode(&filled).map_err(|e| e.to_string())?);
                }
                Slot::Bos => ids.extend(tokenizer.bos_token_id),
                Slot::Eos => ids.extend(tokenizer.eos_token_id),
            }
        }
        Ok(ids)
    }

    /// The assistant text of a function message: its calls in the function format, keeping a
    /// leading thought or the text around a `<tool_call>` block.
    fn function_text(&self, content: &str) -> Encoded<String> {
        if self.kind == TemplateKind::Llama2 {
            return Ok(self.function_format.function_text(&parse_calls(content)?));
        }
        if let Some((whole, inner)) = find_enclosed(content, TOOL_CALL_OPEN, TOOL_CALL_CLOSE) {
            // Every copy of the tagged block goes, as Python's str.replace does.
            let around = content.replace(&content[whole], "");
            let calls = parse_calls(&content[inner])?;
            return Ok(around + &self.function_format.function_text(&calls));
        }
        match find_enclosed(content, THOUGHT_OPEN, THOUGHT_CLOSE) {
            Some((whole, _)) => {
                let thought = &content[whole];
                let calls = parse_calls(&content.replace(thought, ""))?;
                Ok(thought.to_string() + &self.function_format.function_text(&calls))
            }
            None => Ok(self.function_format.function_text(&parse_calls(content)?)),
        }
    }

    /// Token ids of each message: turn 0 gets the prefix and the system prompt (with the tool
    /// list) before it.
    fn encode_messages(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Encoded<Vec<Vec<u32>>> {
        let system = if system.is_empty() {
            self.default_system.as_str()
        } else {
            system
        };
        let mut encoded = Vec::with_capacity(messages.len());
        for (i, message) in messages.iter().enumerate() {
            let mut ids = Vec::new();
            let mut fused_system = String::new();
            if i == 0 {
                ids.extend(self.render(tokenizer, &self.prefix, "", None)?);
                if !system.is_empty() || !tools.is_empty() {
                    let tool_text = if tools.is_empty() {
                        String::new()
                    } else {
                        self.tool_format.tool_prompt(tools, &self.tool_date)?
                    };
                    let content = format!("{system}{tool_text}");
                    match self.kind {
                        TemplateKind::Llama2 => {
                            if let Some(Slot::Text(first)) = self.system.first() {
                                fused_system = first.replacen("{{content}}", &content, 1);
                            }
                        }
                        _ => ids.extend(self.render(tokenizer, &self.system, &content, None)?),
                    }
                }
            }
            let turn = (i / 2).to_string();
            let rendered = match message.role {
                Role::User if self.kind == TemplateKind::Llama2 => self.render(
                    tokenizer,
                    &self.user,
                    &format!("{fused_system}{}", message.content),
                    None,
                )?,
                Role::User => self.render(tokenizer, &self.user, &message.content, Some(&turn))?,
                Role::Assistant => {
                    self.render(tokenizer, &self.assistant, &message.content, None)?
                }
                Role::Observation => {
                    self.render(tokenizer, &self.observation, &message.content, None)?
                }
                Role::Function => {
                    let text = self.function_text(&message.content)?;
                    self.render(tokenizer, &self.function, &text, None)?
                }
            };
            ids.extend(rendered);
            encoded.push(ids);
        }
        Ok(encoded)
    }

    /// (prompt, response) token pairs of every turn of `messages` (user/observation and
    /// assistant/function messages alternating).
    pub fn encode_multiturn(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
        discarding_history_cot: bool,
    ) -> Encoded<Vec<(Vec<u32>, Vec<u32>)>> {
        if self.kind != TemplateKind::Reasoning {
            return Ok(into_pairs(
                self.encode_messages(tokenizer, messages, system, tools)?,
            ));
        }
        let mut messages = messages.to_vec();
        let n = messages.len();
        if !self.enable_thinking {
            for m in messages.iter_mut().skip(1).step_by(2) {
                m.content = remove_thought(&m.content);
            }
        }
        if discarding_history_cot {
            // Every answer but the last loses its thought.
            for m in messages[..n.saturating_sub(2)]
                .iter_mut()
                .skip(1)
                .step_by(2)
            {
                m.content = remove_thought(&m.content);
            }
        }
        let mut encoded = self.encode_messages(tokenizer, &messages, system, tools)?;
        let empty_thought = tokenizer
            .encode(&format!("{THOUGHT_OPEN}{THOUGHT_CLOSE}"))
            .map_err(|e| e.to_string())?;
        let turns: Vec<usize> = if discarding_history_cot {
            vec![n.saturating_sub(2)]
        } else {
            (0..n).step_by(2).collect()
        };
        for i in turns {
            let Some(answer) = messages.get(i + 1) else {
                continue;
            };
            let has_thought = answer.content.contains(THOUGHT_OPEN.trim())
                || answer.content.contains(THOUGHT_CLOSE.trim());
            if has_thought {
                continue;
            }
            if self.enable_thinking {
                let mut with_thought = empty_thought.clone();
                with_thought.extend(&encoded[i + 1]);
                encoded[i + 1] = with_thought;
            } else {
                encoded[i].extend(&empty_thought);
            }
        }
        Ok(into_pairs(encoded))
    }
}

fn into_pairs(encoded: Vec<Vec<u32>>) -> Vec<(Vec<u32>, Vec<u32>)> {
    let mut pairs = Vec::with_capacity(encoded.len() / 2);
    let mut it = encoded.into_iter();
    while let (Some(prompt), Some(response)) = (it.next(), it.next()) {
        pairs.push((prompt, response));
    }
    pairs
}

/// The byte range of the first `open…close` span (leftmost, shortest) and of the text between
/// the tags, like the non-greedy regex LLaMA-Factory uses.
fn find_enclosed(text: &str, open: &str, close: &str) -> Option<(Range<usize>, Range<usize>)> {
    let start = text.find(open)?;
    let inner_start = start + open.len();
    let inner_end = inner_start + text[inner_start..].find(close)?;
    Some((start..inner_end + close.len(), inner_start..inner_end))
}

/// Drops every `<think>…</think>` block, then the newlines left at the start.
fn remove_thought(content: &str) -> String {
    let mut out = String::new();
    let mut rest = content;
    while let Some((whole, _)) = find_enclosed(rest, THOUGHT_OPEN, THOUGHT_CLOSE) {
        out.push_str(&rest[..whole.start]);
        rest = &rest[whole.end..];
    }
    out.push_str(rest);
    out.trim_start_matches('\n').to_string()
}

/// The calls of a function message: one `{"name", "arguments"}` object or a list of them.
fn parse_calls(json: &str) -> Encoded<Vec<FunctionCall>> {
    let parsed = PyValue::parse(json)
        .map_err(|e| format!("its function call is not valid JSON ({e}): {json:?}"))?;
    let items = match parsed {
        PyValue::List(items) => items,
        single => vec![single],
    };
    items
        .into_iter()
        .map(|call| {
            let field = |key: &str| {
                call.get(key)
                    .cloned()
                    .ok_or_else(|| format!("its function call has no `{key}`: {}", call.dumps()))
            };
            Ok(FunctionCall {
                name: field("name")?,
                arguments: field("arguments")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thoughts_are_removed_with_the_newlines_after_them() {
        assert_eq!(
            remove_thought("<think>\nA\n</think>\n\nB <think>\nC\n</think>\n\nD"),
            "B D"
        );
        assert_eq!(remove_thought("\n\nplain"), "plain");
        assert_eq!(remove_thought("<think>\nunclosed"), "<think>\nunclosed");
    }

    #[test]
    fn enclosed_spans_are_leftmost_and_shortest() {
        let text = "a<tool_call>x</tool_call>b<tool_call>y</tool_call>";
        let (whole, inner) = find_enclosed(text, TOOL_CALL_OPEN, TOOL_CALL_CLOSE).unwrap();
        assert_eq!(&text[whole], "<tool_call>x</tool_call>");
        assert_eq!(&text[inner], "x");
        assert_eq!(
            find_enclosed("no tags", TOOL_CALL_OPEN, TOOL_CALL_CLOSE),
            None
        );
    }

    #[test]
    fn calls_must_name_a_function_and_arguments() {
        assert_eq!(
            parse_calls(r#"[{"name": "f", "arguments": {}}]"#)
                .unwrap()
                .len(),
            1
        );
        assert!(parse_calls(r#"{"name": "f"}"#)
            .unwrap_err()
            .contains("`arguments`"));
        assert!(parse_calls("not json")
            .unwrap_err()
            .contains("not valid JSON"));
    }
}
