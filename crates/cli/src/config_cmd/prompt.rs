//! Asking questions: arrow-key menus and re-asked fields on a terminal; numbered prompts over
//! plain lines otherwise, so a script can pipe the answers (a wrong or missing answer there is
//! an error, since nobody is there to correct it).

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{anyhow, bail, Context, Result};
use console::{Key, Term};

/// Where answers come from.
pub enum Asker<'a> {
    Terminal(Term),
    Lines {
        input: Box<dyn BufRead + 'a>,
        output: Box<dyn Write + 'a>,
    },
}

/// Accepts an answer or says, in one sentence, why not.
pub type Check<'c, T> = &'c dyn Fn(&str) -> Result<T, String>;

impl Asker<'_> {
    /// A terminal when both standard input and standard error are one; plain lines otherwise.
    pub fn for_this_process() -> Asker<'static> {
        let term = Term::stderr();
        if term.is_term() && std::io::stdin().is_terminal() {
            Asker::Terminal(term)
        } else {
            Asker::Lines {
                input: Box::new(std::io::stdin().lock()),
                output: Box::new(std::io::stderr()),
            }
        }
    }

    /// One of `options` (index returned); `allowed` may refuse a choice with its reason.
    pub fn choose(
        &mut self,
        question: &str,
        options: &[&str],
        default: usize,
        allowed: &dyn Fn(usize) -> Result<(), String>,
    ) -> Result<usize> {
        match self {
            Asker::Terminal(term) => menu(term, question, options, default, allowed),
            Asker::Lines { input, output } => {
                writeln!(output, "{question}")?;
                writeln!(
                    output,
                    "Please input a choice index (starting from 0), and press enter"
                )?;
                for (i, option) in options.iter().enumerate() {
                    writeln!(output, "  {i}) {option}")?;
                }
                write!(output, "[{default}]: ")?;
                output.flush()?;
                let answer = read_answer(input.as_mut(), output.as_mut(), question)?;
                let chosen = if answer.is_empty() {
                    default
                } else {
                    option_index(options, &answer).ok_or_else(|| {
                        anyhow!(
                            "answer `{answer}` to \"{question}\" is not one of 0 to {} or an option's name",
                            options.len() - 1
                        )
                    })?
                };
                allowed(chosen).map_err(|reason| {
                    anyhow!("answer `{}` to \"{question}\": {reason}", options[chosen])
                })?;
                writeln!(output)?;
                Ok(chosen)
            }
        }
    }

    /// A typed answer; an empty one means `default` when there is one.
    pub fn field<T>(
        &mut self,
        question: &str,
        default: Option<&str>,
        check: Check<'_, T>,
    ) -> Result<T> {
        loop {
            let answer = match self {
                Asker::Terminal(term) => {
                    term.write_str(question)?;
                    term.read_line()
                        .context("reading an answer from the terminal")?
                }
                Asker::Lines { input, output } => {
                    write!(output, "{question}")?;
                    output.flush()?;
                    let answer = read_answer(input.as_mut(), output.as_mut(), question)?;
                    writeln!(output)?;
                    answer
                }
            };
            let answer = answer.trim();
            let answer = match default {
                Some(default) if answer.is_empty() => default,
                _ => answer,
            };
            match (check(answer), &*self) {
                (Ok(value), _) => return Ok(value),
                (Err(reason), Asker::Terminal(term)) => term.write_line(&reason)?,
                (Err(reason), Asker::Lines { .. }) => bail!(
                    "answer `{answer}` to \"{}\" is not valid: {reason}",
                    question.trim_end()
                ),
            }
        }
    }

    /// A `[yes/NO]` question, as accelerate asks them.
    pub fn yes_no(&mut self, question: &str, default: bool) -> Result<bool> {
        let default = if default { "yes" } else { "no" };
        self.field(question, Some(default), &yes_or_no)
    }
}

/// accelerate's yes/no answers, in any case.
pub fn yes_or_no(answer: &str) -> Result<bool, String> {
    match answer.to_ascii_lowercase().as_str() {
        "yes" | "y" => Ok(true),
        "no" | "n" => Ok(false),
        _ => Err("Please enter yes or no.".into()),
    }
}

/// One line of answer; the question's line is ended first when the answers have run out.
fn read_answer(input: &mut dyn BufRead, output: &mut dyn Write, question: &str) -> Result<String> {
    let mut line = String::new();
    if input.read_line(&mut line)? == 0 {
        writeln!(output)?;
        bail!(
            "the answers ended before \"{}\" was answered; nothing was written",
            question.trim_end()
        );
    }
    Ok(line.trim().to_string())
}

/// An option by its index, or by its text in any case.
fn option_index(options: &[&str], answer: &str) -> Option<usize> {
    match answer.parse::<usize>() {
        Ok(i) => (i < options.len()).then_some(i),
        Err(_) => options.iter().position(|o| o.eq_ignore_ascii_case(answer)),
    }
}

/// An arrow-key menu: up/down or a digit moves, enter selects, Ctrl-C or Esc cancels.
fn menu(
    term: &Term,
    question: &str,
    options: &[&str],
    default: usize,
    allowed: &dyn Fn(usize) -> Result<(), String>,
) -> Result<usize> {
    term.write_line(question)?;
    term.write_line(
        "Please select a choice using the arrow or number keys, and selecting with enter",
    )?;
    term.hide_cursor()?;
    let result = run_menu(term, options, default, allowed);
    term.show_cursor()?;
    let chosen = result?;
    term.write_line(&console::style(options[chosen]).green().to_string())?;
    Ok(chosen)
}

fn run_menu(
    term: &Term,
    options: &[&str],
    default: usize,
    allowed: &dyn Fn(usize) -> Result<(), String>,
) -> Result<usize> {
    let mut position = default;
    let mut refusal: Option<String> = None;
    loop {
        for (i, option) in options.iter().enumerate() {
            if i == position {
                term.write_line(&format!(" ➔ {}", console::style(option).green()))?;
            } else {
                term.write_line(&format!("    {option}"))?;
            }
        }
        if let Some(reason) = &refusal {
            term.write_line(&console::style(reason).red().to_string())?;
        }
        let drawn = options.len() + usize::from(refusal.is_some());
        let key = term.read_key().context("reading a key from the terminal")?;
        term.clear_last_lines(drawn)?;
        refusal = None;
        match key {
            Key::ArrowUp => position = position.saturating_sub(1),
            Key::ArrowDown => position = (position + 1).min(options.len() - 1),
            Key::Char(c) if c.is_ascii_digit() => {
                let index = c as usize - '0' as usize;
                if index < options.len() {
                    position = index;
                }
            }
            Key::Enter => match allowed(position) {
                Ok(()) => return Ok(position),
                Err(reason) => refusal = Some(reason),
            },
            Key::CtrlC | Key::Escape => bail!("configuration cancelled; nothing was written"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Asker<'_> {
        Asker::Lines {
            input: Box::new(text.as_bytes()),
            output: Box::new(std::io::sink()),
        }
    }

    #[test]
    fn piped_menus_take_an_index_a_name_or_the_default() {
        let options = ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD"];
        let mut asker = lines("1\nno_shard\n\n");
        let any = |_: usize| Ok(());
        assert_eq!(asker.choose("q?", &options, 0, &any).unwrap(), 1);
        assert_eq!(asker.choose("q?", &options, 0, &any).unwrap(), 2);
        assert_eq!(asker.choose("q?", &options, 0, &any).unwrap(), 0);
        let err = asker.choose("q?", &options, 0, &any).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the answers ended before \"q?\" was answered; nothing was written"
        );
    }

    #[test]
    fn piped_answers_that_do_not_fit_are_errors() {
        let options = ["a", "b"];
        let err = lines("7\n")
            .choose("Pick?", &options, 0, &|_| Ok(()))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "answer `7` to \"Pick?\" is not one of 0 to 1 or an option's name"
        );
        let err = lines("1\n")
            .choose("Pick?", &options, 0, &|i| {
                if i == 1 {
                    Err("b needs two machines".into())
                } else {
                    Ok(())
                }
            })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "answer `b` to \"Pick?\": b needs two machines"
        );
        let err = lines("maybe\n")
            .yes_no("Offload? [yes/NO]: ", false)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "answer `maybe` to \"Offload? [yes/NO]:\" is not valid: Please enter yes or no."
        );
    }

    #[test]
    fn piped_fields_fall_back_to_their_default() {
        let mut asker = lines("\nYES\n");
        assert!(!asker.yes_no("x? [yes/NO]: ", false).unwrap());
        assert!(asker.yes_no("y? [yes/NO]: ", false).unwrap());
    }
}
