//! LLaMA-Factory's chat templates: how each role's text is wrapped, and the rules that turn a
//! conversation into (prompt, response) token pairs.

use crate::convert::{Message, Role};
use crate::error::{DataError, Result};
use crate::tokenizer::Tokenizer;

/// A piece of a formatter: literal text (with `{{content}}` filled in), or a special token.
#[derive(Clone, Debug, PartialEq)]
enum Slot {
    Text(&'static str),
    Bos,
    Eos,
}

type Slots = Vec<Slot>;

/// How the system prompt is placed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A system turn before the first user message.
    Plain,
    /// The system text is fused into the first user message (llama2, mistral, gemma).
    Llama2,
    /// Plain, plus an empty `<think>` block added to answers that have none (qwen3).
    Reasoning,
}

#[derive(Clone, Debug)]
pub struct Template {
    pub name: &'static str,
    user: Slots,
    assistant: Slots,
    system: Slots,
    observation: Slots,
    prefix: Slots,
    pub default_system: String,
    pub stop_words: Vec<String>,
    pub efficient_eos: bool,
    replace_eos: bool,
    kind: Kind,
    /// Whether an added empty thought is trained on (qwen3's `enable_thinking`).
    pub enable_thinking: bool,
}

const THOUGHT_OPEN: &str = "<think>\n";
const THOUGHT_CLOSE: &str = "\n</think>\n\n";

pub const TEMPLATE_NAMES: &[&str] = &[
    "alpaca",
    "chatml",
    "deepseek",
    "default",
    "empty",
    "gemma",
    "llama2",
    "llama3",
    "mistral",
    "phi",
    "qwen",
    "qwen3",
    "qwen3_nothink",
    "smollm2",
    "vicuna",
    "yi",
    "zephyr",
];

fn t(s: &'static str) -> Slot {
    Slot::Text(s)
}

struct Spec {
    user: Option<Slots>,
    assistant: Option<Slots>,
    system: Option<Slots>,
    observation: Option<Slots>,
    prefix: Slots,
    default_system: &'static str,
    stop_words: &'static [&'static str],
    replace_eos: bool,
    kind: Kind,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            user: None,
            assistant: None,
            system: None,
            observation: None,
            prefix: Vec::new(),
            default_system: "",
            stop_words: &[],
            replace_eos: false,
            kind: Kind::Plain,
        }
    }
}

const IM_USER: &str = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n";
const IM_ASSISTANT: &str = "{{content}}<|im_end|>\n";
const IM_SYSTEM: &str = "<|im_start|>system\n{{content}}<|im_end|>\n";
const QWEN_OBSERVATION: &str =
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";

fn spec(name: &str) -> Option<Spec> {
    let im = |default_system: &'static str,
              stop_words: &'static [&'static str],
              replace_eos: bool| Spec {
        user: Some(vec![t(IM_USER)]),
        assistant: Some(vec![t(IM_ASSISTANT)]),
        system: Some(vec![t(IM_SYSTEM)]),
        default_system,
        stop_words,
        replace_eos,
        ..Spec::default()
    };
    Some(match name {
        "empty" => Spec { assistant: Some(vec![t("{{content}}")]), ..Spec::default() },
        "default" => Spec {
            user: Some(vec![t("Human: {{content}}"), Slot::Eos, t("\nAssistant:")]),
            assistant: Some(vec![t("{{content}}"), Slot::Eos, t("\n")]),
            system: Some(vec![t("System: {{content}}"), Slot::Eos, t("\n")]),
            ..Spec::default()
        },
        "alpaca" => Spec {
            user: Some(vec![t("### Instruction:\n{{content}}\n\n### Response:\n")]),
            assistant: Some(vec![t("{{content}}"), Slot::Eos, t("\n\n")]),
            default_system: "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n",
            ..Spec::default()
        },
        "chatml" => Spec {
            observation: Some(vec![t("<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n")]),
            ..im("", &["<|im_end|>", "<|im_start|>"], true)
        },
        "qwen" => Spec {
            observation: Some(vec![t(QWEN_OBSERVATION)]),
            ..im("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.", &["<|im_end|>"], true)
        },
        "qwen3" => Spec {
            observation: Some(vec![t(QWEN_OBSERVATION)]),
            kind: Kind::Reasoning,
            ..im("", &["<|im_end|>"], true)
        },
        "qwen3_nothink" => Spec { observation: Some(vec![t(QWEN_OBSERVATION)]), ..im("", &["<|im_end|>"], true) },
        "smollm2" => im("You are a helpful AI assistant named SmolLM, trained by Hugging Face.", &["<|im_end|>"], false),
        "yi" => im("", &["<|im_end|>"], false),
        "llama2" => Spec {
            user: Some(vec![Slot::Bos, t("[INST] {{content}} [/INST]")]),
            system: Some(vec![t("<<SYS>>\n{{content}}\n<</SYS>>\n\n")]),
            kind: Kind::Llama2,
            ..Spec::default()
        },
        "llama3" => Spec {
            user: Some(vec![t("<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")]),
            assistant: Some(vec![t("{{content}}<|eot_id|>")]),
            system: Some(vec![t("<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>")]),
            observation: Some(vec![t("<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")]),
            prefix: vec![Slot::Bos],
            stop_words: &["<|eot_id|>", "<|eom_id|>"],
            replace_eos: true,
            ..Spec::default()
        },
        "mistral" => Spec {
            user: Some(vec![t("[INST] {{content}}[/INST]")]),
            assistant: Some(vec![t(" {{content}}"), Slot::Eos]),
            system: Some(vec![t("{{content}}\n\n")]),
            observation: Some(vec![t("[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]")]),
            prefix: vec![Slot::Bos],
            kind: Kind::Llama2,
            ..Spec::default()
        },
        "gemma" => Spec {
            user: Some(vec![t("<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n")]),
            assistant: Some(vec![t("{{content}}<end_of_turn>\n")]),
            system: Some(vec![t("{{content}}\n\n")]),
            observation: Some(vec![t("<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n")]),
            prefix: vec![Slot::Bos],
            stop_words: &["<end_of_turn>"],
            replace_eos: true,
            kind: Kind::Llama2,
            ..Spec::default()
        },
        "phi" => Spec {
            user: Some(vec![t("<|user|>\n{{content}}<|end|>\n<|assistant|>\n")]),
            assistant: Some(vec![t("{{content}}<|end|>\n")]),
            system: Some(vec![t("<|system|>\n{{content}}<|end|>\n")]),
            stop_words: &["<|end|>"],
            replace_eos: true,
            ..Spec::default()
        },
        "deepseek" => Spec {
            user: Some(vec![t("User: {{content}}\n\nAssistant:")]),
            system: Some(vec![t("{{content}}\n\n")]),
            prefix: vec![Slot::Bos],
            ..Spec::default()
        },
        "vicuna" => Spec {
            user: Some(vec![t("USER: {{content}} ASSISTANT:")]),
            default_system: "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.",
            ..Spec::default()
        },
        "zephyr" => Spec {
            user: Some(vec![t("<|user|>\n{{content}}"), Slot::Eos, t("<|assistant|>\n")]),
            system: Some(vec![t("<|system|>\n{{content}}"), Slot::Eos]),
            default_system: "You are Zephyr, a helpful assistant.",
            ..Spec::default()
        },
        _ => return None,
    })
}

impl Template {
    /// A built-in template, with LLaMA-Factory's defaults for the formatters it leaves out.
    pub fn by_name(name: &str) -> Result<Self> {
        let spec = spec(name).ok_or_else(|| {
            DataError::Invalid(format!(
                "template `{name}` does not exist; available templates are {}",
                TEMPLATE_NAMES.join(", ")
            ))
        })?;
        let name = TEMPLATE_NAMES
            .iter()
            .find(|n| **n == name)
            .copied()
            .unwrap_or("custom");
        let user = spec.user.unwrap_or_else(|| vec![t("{{content}}")]);
        Ok(Self {
            name,
            assistant: spec
                .assistant
                .unwrap_or_else(|| vec![t("{{content}}"), Slot::Eos]),
            system: spec.system.unwrap_or_else(|| vec![t("{{content}}")]),
            observation: spec.observation.unwrap_or_else(|| user.clone()),
            user,
            prefix: spec.prefix,
            default_system: spec.default_system.to_string(),
            stop_words: spec.stop_words.iter().map(|s| s.to_string()).collect(),
            efficient_eos: false,
            replace_eos: spec.replace_eos,
            kind: spec.kind,
            enable_thinking: true,
        })
    }

    /// What LLaMA-Factory's `fix_special_tokens` does: the first stop word becomes EOS when the
    /// template replaces it, the remaining stop words become special tokens, and the pad token
    /// falls back to EOS.
    pub fn fix_tokenizer(&self, tokenizer: &mut Tokenizer) -> Result<()> {
        let mut stop_words = self.stop_words.as_slice();
        if self.replace_eos {
            let eos = &stop_words[0];
            tokenizer.add_special_tokens(std::slice::from_ref(eos))?;
            tokenizer.eos_token_id = tokenizer.token_id(eos);
            stop_words = &stop_words[1..];
        }
        if tokenizer.eos_token_id.is_none() {
            return Err(DataError::Invalid(
                "the tokenizer has no eos_token and the template names none; set eos_token in tokenizer_config.json".into(),
            ));
        }
        if tokenizer.pad_token_id.is_none() {
            tokenizer.pad_token_id = tokenizer.eos_token_id;
        }
        if !stop_words.is_empty() {
            tokenizer.add_special_tokens(stop_words)?;
        }
        Ok(())
    }

    fn render(&self, tokenizer: &Tokenizer, slots: &[Slot], content: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for slot in slots {
            match slot {
                Slot::Text(text) => {
                    ids.extend(tokenizer.encode(&text.replace("{{content}}", content))?)
                }
                Slot::Bos => ids.extend(tokenizer.bos_token_id),
                Slot::Eos => ids.extend(tokenizer.eos_token_id),
            }
        }
        Ok(ids)
    }

    /// The text of the system formatter, for templates that fuse it into the first user turn.
    fn system_text(&self, content: &str) -> String {
        match self.system.first() {
            Some(Slot::Text(text)) => text.replace("{{content}}", content),
            _ => String::new(),
        }
    }

    /// Token ids of each message: turn 0 gets prefix and system before the query.
    fn encode_messages(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<Vec<Vec<u32>>> {
        if !tools.is_empty() {
            return Err(DataError::Invalid(
                "examples with tools are not supported yet; remove the `tools` column from dataset_info.json".into(),
            ));
        }
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
                ids.extend(self.render(tokenizer, &self.prefix, "")?);
                if !system.is_empty() {
                    match self.kind {
                        Kind::Llama2 => fused_system = self.system_text(system),
                        _ => ids.extend(self.render(tokenizer, &self.system, system)?),
                    }
                }
            }
            let (slots, content) = match message.role {
                Role::User => (&self.user, format!("{fused_system}{}", message.content)),
                Role::Assistant => (&self.assistant, message.content.clone()),
                Role::Observation => (&self.observation, message.content.clone()),
                Role::Function => return Err(DataError::Invalid(
                    "function-call turns are not supported yet; remove tool calls from the dataset"
                        .into(),
                )),
            };
            ids.extend(self.render(tokenizer, slots, &content)?);
            encoded.push(ids);
        }
        Ok(encoded)
    }

    /// (prompt, response) token pairs of every turn.
    pub fn encode_multiturn(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        system: &str,
        tools: &str,
    ) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let mut messages = messages.to_vec();
        let reasoning = self.kind == Kind::Reasoning;
        if reasoning && !self.enable_thinking {
            for m in messages.iter_mut().skip(1).step_by(2) {
                m.content = remove_thought(&m.content);
            }
        }
        let mut encoded = self.encode_messages(tokenizer, &messages, system, tools)?;
        if reasoning {
            let empty_thought = tokenizer.encode(&format!("{THOUGHT_OPEN}{THOUGHT_CLOSE}"))?;
            for i in (0..messages.len().saturating_sub(1)).step_by(2) {
                let answer = &messages[i + 1].content;
                if !answer.contains(THOUGHT_OPEN.trim()) && !answer.contains(THOUGHT_CLOSE.trim()) {
                    if self.enable_thinking {
                        let mut with = empty_thought.clone();
                        with.extend(&encoded[i + 1]);
                        encoded[i + 1] = with;
                    } else {
                        encoded[i].extend(&empty_thought);
                    }
                }
            }
        }
        let mut pairs = Vec::with_capacity(encoded.len() / 2);
        let mut it = encoded.into_iter();
        while let (Some(prompt), Some(response)) = (it.next(), it.next()) {
            pairs.push((prompt, response));
        }
        Ok(pairs)
    }
}

/// Drops `<think>…</think>` blocks and the newlines after them.
fn remove_thought(content: &str) -> String {
    let (open, close) = (THOUGHT_OPEN, THOUGHT_CLOSE);
    let mut out = String::new();
    let mut rest = content;
    while let Some(start) = rest.find(open) {
        match rest[start + open.len()..].find(close) {
            Some(end) => {
                out.push_str(&rest[..start]);
                rest = &rest[start + open.len() + end + close.len()..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.trim_start_matches('\n').to_string()
}
