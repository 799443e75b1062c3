//! Each template renders a two-turn conversation with a system prompt into the text its
//! LLaMA-Factory definition gives, segment by segment (prompt 1, answer 1, prompt 2, answer 2).
//! The expected strings are written out by hand from LLaMA-Factory 0.9.5's template.py; the
//! SmolLM2 tokenizer's BOS is `<|im_start|>` and its EOS `<|im_end|>` unless a template replaces
//! EOS.

use std::path::PathBuf;

use ff_data::convert::{Message, Role};
use ff_data::{load_template, DataArgs, TEMPLATE_NAMES};

fn tokenizer_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/smollm2-135m-config")
}

fn rendered(template: &str) -> Vec<String> {
    let args = DataArgs {
        template: template.to_string(),
        ..DataArgs::default()
    };
    let (template, tokenizer) = load_template(&args, &tokenizer_dir()).unwrap();
    let messages = [
        Message::new(Role::User, "Hi"),
        Message::new(Role::Assistant, "Hello!"),
        Message::new(Role::User, "Bye"),
        Message::new(Role::Assistant, "Goodbye."),
    ];
    let pairs = template
        .encode_multiturn(&tokenizer, &messages, "Be brief.", "", false)
        .unwrap();
    pairs
        .iter()
        .flat_map(|(prompt, answer)| [prompt, answer])
        .map(|ids| tokenizer.decode(ids).unwrap())
        .collect()
}

fn expected(template: &str) -> [&'static str; 4] {
    match template {
        "empty" => ["Be brief.Hi", "Hello!", "Bye", "Goodbye."],
        "default" => [
            "System: Be brief.<|im_end|>\nHuman: Hi<|im_end|>\nAssistant:",
            "Hello!<|im_end|>\n",
            "Human: Bye<|im_end|>\nAssistant:",
            "Goodbye.<|im_end|>\n",
        ],
        "alpaca" => [
            "Be brief.### Instruction:\nHi\n\n### Response:\n",
            "Hello!<|im_end|>\n\n",
            "### Instruction:\nBye\n\n### Response:\n",
            "Goodbye.<|im_end|>\n\n",
        ],
        "bailing" => [
            "<role>SYSTEM</role>Be brief.<role>HUMAN</role>Hi<role>ASSISTANT</role>",
            "Hello!",
            "<role>HUMAN</role>Bye<role>ASSISTANT</role>",
            "Goodbye.",
        ],
        "breeze" => [
            "<|im_start|>Be brief.[INST] Hi [/INST] ",
            "Hello!",
            "[INST] Bye [/INST] ",
            "Goodbye.",
        ],
        "chatml" | "qwen" | "qwen3_nothink" | "smollm2" | "yi" => [
            concat!(
                "<|im_start|>system\nBe brief.<|im_end|>\n",
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            ),
            "Hello!<|im_end|>\n",
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            "Goodbye.<|im_end|>\n",
        ],
        "qwen3" => [
            concat!(
                "<|im_start|>system\nBe brief.<|im_end|>\n",
                "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
            ),
            "<think>\n\n</think>\n\nHello!<|im_end|>\n",
            "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n",
            "<think>\n\n</think>\n\nGoodbye.<|im_end|>\n",
        ],
        "llama2" => [
            "<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]",
            "Hello!<|im_end|>",
            "<|im_start|>[INST] Bye [/INST]",
            "Goodbye.<|im_end|>",
        ],
        "llama3" => [
            concat!(
                "<|im_start|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>",
                "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            "Hello!<|eot_id|>",
            concat!(
                "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>",
                "<|start_header_id|>assistant<|end_header_id|>\n\n"
            ),
            "Goodbye.<|eot_id|>",
        ],
        "mistral" => [
            "<|im_start|>[INST] Be brief.\n\nHi[/INST]",
            " Hello!<|im_end|>",
            "[INST] Bye[/INST]",
            " Goodbye.<|im_end|>",
        ],
        "gemma" => [
            "<|im_start|><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n",
            "Hello!<end_of_turn>\n",
            "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n",
            "Goodbye.<end_of_turn>\n",
        ],
        "phi" => [
            "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n",
            "Hello!<|end|>\n",
            "<|user|>\nBye<|end|>\n<|assistant|>\n",
            "Goodbye.<|end|>\n",
        ],
        "deepseek" => [
            "<|im_start|>Be brief.\n\nUser: Hi\n\nAssistant:",
            "Hello!<|im_end|>",
            "User: Bye\n\nAssistant:",
            "Goodbye.<|im_end|>",
        ],
        "vicuna" => [
            "Be brief.USER: Hi ASSISTANT:",
            "Hello!<|im_end|>",
            "USER: Bye ASSISTANT:",
            "Goodbye.<|im_end|>",
        ],
        "zephyr" => [
            "<|system|>\nBe brief.<|im_end|><|user|>\nHi<|im_end|><|assistant|>\n",
            "Hello!<|im_end|>",
            "<|user|>\nBye<|im_end|><|assistant|>\n",
            "Goodbye.<|im_end|>",
        ],
        other => panic!("no expected rendering for template {other}"),
    }
}

macro_rules! renders {
    ($($template:ident),* $(,)?) => {
        $(
            #[test]
            fn $template() {
                let name = stringify!($template);
                assert_eq!(rendered(name), expected(name));
            }
        )*

        #[test]
        fn every_template_has_a_rendering_test() {
            let tested = [$(stringify!($template)),*];
            for name in TEMPLATE_NAMES {
                assert!(tested.contains(name), "template {name} has no rendering test");
            }
        }
    };
}

renders!(
    alpaca,
    bailing,
    breeze,
    chatml,
    deepseek,
    default,
    empty,
    gemma,
    llama2,
    llama3,
    mistral,
    phi,
    qwen,
    qwen3,
    qwen3_nothink,
    smollm2,
    vicuna,
    yi,
    zephyr,
);
