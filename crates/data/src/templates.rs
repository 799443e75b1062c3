//! The built-in templates, defined as LLaMA-Factory 0.9.5 registers them, with its defaults for
//! every formatter a template leaves out.

use crate::error::{DataError, Result};
use crate::template::{text, Slot, Template, TemplateKind};
use crate::tools::ToolFormat;

pub const TEMPLATE_NAMES: &[&str] = &[
    "alpaca",
    "bailing",
    "breeze",
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

/// A template as registered: formatters left `None` take the defaults.
struct Definition {
    user: Option<Vec<Slot>>,
    assistant: Option<Vec<Slot>>,
    system: Option<Vec<Slot>>,
    function: Option<(Vec<Slot>, ToolFormat)>,
    observation: Option<Vec<Slot>>,
    tools: Option<ToolFormat>,
    prefix: Vec<Slot>,
    default_system: &'static str,
    stop_words: &'static [&'static str],
    efficient_eos: bool,
    replace_eos: bool,
    kind: TemplateKind,
}

impl Default for Definition {
    fn default() -> Self {
        Self {
            user: None,
            assistant: None,
            system: None,
            function: None,
            observation: None,
            tools: None,
            prefix: Vec::new(),
            default_system: "",
            stop_words: &[],
            efficient_eos: false,
            replace_eos: false,
            kind: TemplateKind::Plain,
        }
    }
}

const IM_USER: &str = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n";
const IM_ASSISTANT: &str = "{{content}}<|im_end|>\n";
const IM_SYSTEM: &str = "<|im_start|>system\n{{content}}<|im_end|>\n";
const QWEN_OBSERVATION: &str =
    "<|im_start|>user\n<tool_response>\n{{content}}\n</tool_response><|im_end|>\n<|im_start|>assistant\n";

fn slots(pieces: &[&str]) -> Option<Vec<Slot>> {
    Some(pieces.iter().map(|p| text(p)).collect())
}

/// The ChatML family (`<|im_start|>role ... <|im_end|>`).
fn im_start(default_system: &'static str, stop_words: &'static [&'static str]) -> Definition {
    Definition {
        user: slots(&[IM_USER]),
        assistant: slots(&[IM_ASSISTANT]),
        system: slots(&[IM_SYSTEM]),
        default_system,
        stop_words,
        ..Definition::default()
    }
}

/// Qwen 2.5 and Qwen 3: ChatML with Qwen's tool calling and tool responses.
fn qwen(default_system: &'static str, kind: TemplateKind) -> Definition {
    Definition {
        function: Some((vec![text(IM_ASSISTANT)], ToolFormat::Qwen)),
        observation: slots(&[QWEN_OBSERVATION]),
        tools: Some(ToolFormat::Qwen),
        replace_eos: true,
        kind,
        ..im_start(default_system, &["<|im_end|>"])
    }
}

fn definition(name: &str) -> Option<Definition> {
    let llama3_user = "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>\
                       <|start_header_id|>assistant<|end_header_id|>\n\n";
    let llama3_observation = "<|start_header_id|>ipython<|end_header_id|>\n\n{{content}}<|eot_id|>\
                              <|start_header_id|>assistant<|end_header_id|>\n\n";
    Some(match name {
        "empty" => Definition {
            assistant: slots(&["{{content}}"]),
            ..Definition::default()
        },
        "default" => Definition {
            user: Some(vec![text("Human: {{content}}"), Slot::Eos, text("\nAssistant:")]),
            assistant: Some(vec![text("{{content}}"), Slot::Eos, text("\n")]),
            system: Some(vec![text("System: {{content}}"), Slot::Eos, text("\n")]),
            ..Definition::default()
        },
        "alpaca" => Definition {
            user: slots(&["### Instruction:\n{{content}}\n\n### Response:\n"]),
            assistant: Some(vec![text("{{content}}"), Slot::Eos, text("\n\n")]),
            default_system: "Below is an instruction that describes a task. \
                             Write a response that appropriately completes the request.\n\n",
            ..Definition::default()
        },
        "bailing" => Definition {
            user: slots(&["<role>HUMAN</role>{{content}}<role>ASSISTANT</role>"]),
            system: slots(&["<role>SYSTEM</role>{{content}}"]),
            observation: slots(&["<role>OBSERVATION</role>{{content}}<role>ASSISTANT</role>"]),
            stop_words: &["<|endoftext|>"],
            efficient_eos: true,
            ..Definition::default()
        },
        "breeze" => Definition {
            user: slots(&["[INST] {{content}} [/INST] "]),
            prefix: vec![Slot::Bos],
            efficient_eos: true,
            ..Definition::default()
        },
        "chatml" => Definition {
            observation: slots(&[
                "<|im_start|>tool\n{{content}}<|im_end|>\n<|im_start|>assistant\n",
            ]),
            replace_eos: true,
            ..im_start("", &["<|im_end|>", "<|im_start|>"])
        },
        "qwen" => qwen(
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            TemplateKind::Plain,
        ),
        "qwen3" => qwen("", TemplateKind::Reasoning),
        "qwen3_nothink" => qwen("", TemplateKind::Plain),
        "smollm2" => im_start(
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
            &["<|im_end|>"],
        ),
        "yi" => im_start("", &["<|im_end|>"]),
        "llama2" => Definition {
            user: Some(vec![Slot::Bos, text("[INST] {{content}} [/INST]")]),
            system: slots(&["<<SYS>>\n{{content}}\n<</SYS>>\n\n"]),
            kind: TemplateKind::Llama2,
            ..Definition::default()
        },
        "llama3" => Definition {
            user: slots(&[llama3_user]),
            assistant: slots(&["{{content}}<|eot_id|>"]),
            system: slots(&["<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>"]),
            function: Some((vec![text("{{content}}<|eot_id|>")], ToolFormat::Llama3)),
            observation: slots(&[llama3_observation]),
            tools: Some(ToolFormat::Llama3),
            prefix: vec![Slot::Bos],
            stop_words: &["<|eot_id|>", "<|eom_id|>"],
            replace_eos: true,
            ..Definition::default()
        },
        "mistral" => Definition {
            user: slots(&["[INST] {{content}}[/INST]"]),
            assistant: Some(vec![text(" {{content}}"), Slot::Eos]),
            system: slots(&["{{content}}\n\n"]),
            function: Some((
                vec![text("[TOOL_CALLS] {{content}}"), Slot::Eos],
                ToolFormat::Mistral,
            )),
            observation: slots(&["[TOOL_RESULTS] {\"content\": {{content}}}[/TOOL_RESULTS]"]),
            tools: Some(ToolFormat::Mistral),
            prefix: vec![Slot::Bos],
            kind: TemplateKind::Llama2,
            ..Definition::default()
        },
        "gemma" => Definition {
            user: slots(&["<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n"]),
            assistant: slots(&["{{content}}<end_of_turn>\n"]),
            system: slots(&["{{content}}\n\n"]),
            observation: slots(&[
                "<start_of_turn>tool\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
            ]),
            prefix: vec![Slot::Bos],
            stop_words: &["<end_of_turn>"],
            replace_eos: true,
            kind: TemplateKind::Llama2,
            ..Definition::default()
        },
        "phi" => Definition {
            user: slots(&["<|user|>\n{{content}}<|end|>\n<|assistant|>\n"]),
            assistant: slots(&["{{content}}<|end|>\n"]),
            system: slots(&["<|system|>\n{{content}}<|end|>\n"]),
            stop_words: &["<|end|>"],
            replace_eos: true,
            ..Definition::default()
        },
        "deepseek" => Definition {
            user: slots(&["User: {{content}}\n\nAssistant:"]),
            system: slots(&["{{content}}\n\n"]),
            prefix: vec![Slot::Bos],
            ..Definition::default()
        },
        "vicuna" => Definition {
            user: slots(&["USER: {{content}} ASSISTANT:"]),
            default_system: "A chat between a curious user and an artificial intelligence assistant. \
                             The assistant gives helpful, detailed, and polite answers to the user's questions.",
            ..Definition::default()
        },
        "zephyr" => Definition {
            user: Some(vec![text("<|user|>\n{{content}}"), Slot::Eos, text("<|assistant|>\n")]),
            system: Some(vec![text("<|system|>\n{{content}}"), Slot::Eos]),
            default_system: "You are Zephyr, a helpful assistant.",
            ..Definition::default()
        },
        _ => return None,
    })
}

impl Template {
    /// A built-in template by its LLaMA-Factory name.
    pub fn by_name(name: &str) -> Result<Self> {
        let definition = definition(name).ok_or_else(|| DataError::UnknownTemplate {
            name: name.to_string(),
            available: TEMPLATE_NAMES.to_vec(),
        })?;
        Ok(Self::from_definition(name, definition))
    }

    fn from_definition(name: &str, d: Definition) -> Self {
        let plain_content = vec![text("{{content}}")];
        let assistant_default = Self::plain_function_slots(d.efficient_eos);
        // The default function formatter reuses the template's assistant slots when it has them.
        let (function, function_format) = d.function.unwrap_or_else(|| {
            (
                d.assistant
                    .clone()
                    .unwrap_or_else(|| assistant_default.clone()),
                ToolFormat::Default,
            )
        });
        Template {
            name: name.to_string(),
            kind: d.kind,
            observation: d
                .observation
                .or_else(|| d.user.clone())
                .unwrap_or_else(|| plain_content.clone()),
            user: d.user.unwrap_or_else(|| plain_content.clone()),
            assistant: d.assistant.unwrap_or(assistant_default),
            system: d.system.unwrap_or(plain_content),
            function,
            prefix: d.prefix,
            function_format,
            tool_format: d.tools.unwrap_or(ToolFormat::Default),
            default_system: d.default_system.to_string(),
            stop_words: d.stop_words.iter().map(|s| s.to_string()).collect(),
            efficient_eos: d.efficient_eos,
            replace_eos: d.replace_eos,
            enable_thinking: true,
            preserve_thinking: false,
            tool_date: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_defined() {
        for name in TEMPLATE_NAMES {
            assert_eq!(Template::by_name(name).unwrap().name, *name);
        }
    }

    #[test]
    fn unknown_template_lists_the_known_ones() {
        let message = Template::by_name("llama5").unwrap_err().to_string();
        assert!(
            message.contains("template `llama5` does not exist"),
            "{message}"
        );
        assert!(message.contains("qwen3_nothink"), "{message}");
    }

    #[test]
    fn omitted_formatters_take_llama_factory_defaults() {
        let vicuna = Template::by_name("vicuna").unwrap();
        assert_eq!(vicuna.assistant, vec![text("{{content}}"), Slot::Eos]);
        assert_eq!(vicuna.observation, vicuna.user);
        assert_eq!(vicuna.system, vec![text("{{content}}")]);
        let breeze = Template::by_name("breeze").unwrap();
        assert_eq!(breeze.assistant, vec![text("{{content}}")]);
        let phi = Template::by_name("phi").unwrap();
        assert_eq!(phi.function, phi.assistant);
        assert_eq!(phi.function_format, ToolFormat::Default);
    }
}
