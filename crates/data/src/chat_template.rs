//! A template read from the tokenizer's own Jinja chat template, for configs that name no
//! `template`: LLaMA-Factory's `parse_template` renders a few probe conversations whose contents
//! are the literal `{{content}}` and cuts the slots out of the results.

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

use crate::error::{DataError, Result};
use crate::pyjson::PyValue;
use crate::template::{text, Slot, Template, TemplateKind};
use crate::tokenizer::Tokenizer;
use crate::tools::ToolFormat;

/// Renders a chat template the way transformers does: blocks trimmed, loop controls, Python
/// string methods, `raise_exception`, `strftime_now` and a `tojson` that writes like
/// `json.dumps(..., ensure_ascii=False)`.
struct ChatTemplate<'a> {
    env: Environment<'a>,
    special_tokens: Vec<(String, String)>,
}

impl<'a> ChatTemplate<'a> {
    fn new(
        source: &'a str,
        special_tokens: &[(String, String)],
    ) -> std::result::Result<Self, Error> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template("chat", source)?;
        Ok(Self {
            env,
            special_tokens: special_tokens.to_vec(),
        })
    }

    fn render(
        &self,
        messages: &[(&str, &str)],
        add_generation_prompt: bool,
    ) -> std::result::Result<String, Error> {
        let messages: Vec<Value> = messages
            .iter()
            .map(|(role, content)| {
                Value::from_iter([
                    ("role", Value::from(*role)),
                    ("content", Value::from(*content)),
                ])
            })
            .collect();
        let mut context: Vec<(String, Value)> = vec![
            ("messages".into(), Value::from(messages)),
            (
                "add_generation_prompt".into(),
                Value::from(add_generation_prompt),
            ),
            ("tools".into(), Value::from(())),
            ("documents".into(), Value::from(())),
        ];
        for (key, token) in &self.special_tokens {
            context.push((key.clone(), Value::from(token.as_str())));
        }
        self.env
            .get_template("chat")?
            .render(Value::from_iter(context))
    }
}

/// A minijinja value as the Python object transformers would hand to `json.dumps`.
fn to_py(value: &Value) -> std::result::Result<PyValue, Error> {
    Ok(match value.kind() {
        ValueKind::Undefined | ValueKind::None => PyValue::Null,
        ValueKind::Bool => PyValue::Bool(value.is_true()),
        ValueKind::Number if value.is_integer() => PyValue::Int(i128::try_from(value.clone())?),
        ValueKind::Number => PyValue::Float(f64::try_from(value.clone())?),
        ValueKind::String => PyValue::Str(value.as_str().unwrap_or_default().to_string()),
        ValueKind::Map => {
            let mut items = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                items.push((key.to_string(), to_py(&item)?));
            }
            PyValue::Dict(items)
        }
        ValueKind::Seq | ValueKind::Iterable => PyValue::List(
            value
                .try_iter()?
                .map(|v| to_py(&v))
                .collect::<std::result::Result<_, _>>()?,
        ),
        _ => PyValue::Str(value.to_string()),
    })
}

fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<String, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let value = to_py(&value)?;
    Ok(match indent {
        Some(4) => value.dumps_indented(),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson supports indent=4 only",
            ))
        }
        None => value.dumps(),
    })
}

/// The current UTC time through a `strftime` format; %Y %y %m %d %b %B %H %M %S and %% are
/// understood, other directives are kept as written.
fn strftime_now(format: String) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let date = crate::tools::civil_date(secs / 86_400);
    let seconds_of_day = secs % 86_400;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&date.year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", date.year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{:02}", date.month)),
            Some('d') => out.push_str(&format!("{:02}", date.day)),
            Some('b') => out.push_str(&MONTHS[date.month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[date.month as usize - 1]),
            Some('H') => out.push_str(&format!("{:02}", seconds_of_day / 3600)),
            Some('M') => out.push_str(&format!("{:02}", seconds_of_day / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", seconds_of_day % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `s` without its first `n` characters (Python's `s[n:]`).
fn skip_chars(s: &str, n: usize) -> &str {
    s.char_indices().nth(n).map_or("", |(i, _)| &s[i..])
}

/// The characters of `long` that are not matched, in order, by `short`.
fn find_diff(short: &str, long: &str) -> String {
    let short: Vec<char> = short.chars().collect();
    let mut i = 0;
    let mut diff = String::new();
    for c in long.chars() {
        if i < short.len() && short[i] == c {
            i += 1;
        } else if i < short.len() {
            diff.push(c);
        } else {
            break;
        }
    }
    diff
}

impl Template {
    /// The template LLaMA-Factory derives from the tokenizer's chat template; `None` when the
    /// tokenizer has none.
    pub fn from_tokenizer(tokenizer: &Tokenizer) -> Result<Option<Self>> {
        let Some(source) = &tokenizer.chat_template else {
            return Ok(None);
        };
        let failed = |e: Error| DataError::Tokenizer {
            path: tokenizer.dir().to_path_buf(),
            reason: format!("its chat template cannot be rendered ({e:#})"),
        };
        let chat = ChatTemplate::new(source, &tokenizer.special_tokens).map_err(failed)?;
        let prefix = tokenizer.round_trip_with_special_tokens("")?;
        let skip_prefix = |s: String| skip_chars(&s, prefix.chars().count()).to_string();
        let placeholder = "{{content}}";
        let system_slot = skip_prefix(
            chat.render(&[("system", placeholder)], false)
                .map_err(failed)?,
        );
        let user_slot_empty_system = skip_prefix(
            chat.render(&[("system", ""), ("user", placeholder)], true)
                .map_err(failed)?,
        );
        let mut user_slot = skip_prefix(
            chat.render(&[("user", placeholder)], true)
                .map_err(failed)?,
        );
        let conversation = chat
            .render(&[("user", placeholder), ("assistant", placeholder)], false)
            .map_err(failed)?;
        let assistant_slot = skip_chars(
            &conversation,
            prefix.chars().count() + user_slot.chars().count(),
        );
        let kind = if assistant_slot.contains("<think>") {
            TemplateKind::Reasoning
        } else {
            TemplateKind::Plain
        };
        let assistant_slot = assistant_slot
            .replace("<think>", "")
            .replace("</think>", "")
            .trim_start_matches('\n')
            .to_string();
        // A user turn rendered alone is longer than after an empty system turn when the
        // template inserts a default system prompt.
        let default_system = if user_slot.chars().count() > user_slot_empty_system.chars().count() {
            let default_system = find_diff(&user_slot_empty_system, &user_slot);
            let sole_system = system_slot.replacen(placeholder, &default_system, 1);
            user_slot = skip_chars(&user_slot, sole_system.chars().count()).to_string();
            default_system
        } else {
            String::new()
        };
        Ok(Some(Template {
            name: "the tokenizer's chat template".to_string(),
            kind,
            user: vec![text(&user_slot)],
            assistant: vec![text(&assistant_slot)],
            system: vec![text(&system_slot)],
            function: vec![text(&assistant_slot)],
            observation: vec![text(&user_slot)],
            prefix: if prefix.is_empty() {
                Vec::new()
            } else {
                vec![Slot::Text(prefix)]
            },
            function_format: ToolFormat::Default,
            tool_format: ToolFormat::Default,
            default_system,
            stop_words: Vec::new(),
            efficient_eos: false,
            replace_eos: false,
            enable_thinking: true,
            preserve_thinking: false,
            tool_date: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_collects_the_extra_characters() {
        assert_eq!(find_diff("ac", "abc"), "b");
        assert_eq!(find_diff("<s>U", "<s>SYS U"), "SYS ");
        assert_eq!(skip_chars("héllo", 2), "llo");
        assert_eq!(skip_chars("ab", 5), "");
    }

    #[test]
    fn renders_like_transformers() {
        let source = "{%- for m in messages %}\n  {{ m['role'] | upper }}:{{ m['content'].strip() }}\n{% endfor %}{{ {'a': 1.0, 'b': [true, none]} | tojson }}";
        let chat = ChatTemplate::new(source, &[]).unwrap();
        assert_eq!(
            chat.render(&[("user", " hi ")], false).unwrap(),
            // What transformers' jinja2 environment renders for the same source.
            "  USER:hi\n{\"a\": 1.0, \"b\": [true, null]}"
        );
        let failing = ChatTemplate::new("{{ raise_exception('no system role') }}", &[]).unwrap();
        assert!(failing
            .render(&[], false)
            .unwrap_err()
            .to_string()
            .contains("no system role"));
    }
}
