use std::path::PathBuf;

/// A mistake in a config file or override, stated in one sentence that says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{} is not valid YAML: {message}", path.display())]
    Syntax { path: PathBuf, message: String },

    #[error("{} must be a mapping of keys to values", path.display())]
    NotAMapping { path: PathBuf },

    #[error("unknown key `{key}`{}", suggestion.as_ref().map(|s| format!("; did you mean `{s}`?")).unwrap_or_default())]
    UnknownKey {
        key: String,
        suggestion: Option<String>,
    },

    #[error("`{key}` is a LLaMA-Factory key that ferrofactory does not support{}", if hint.is_empty() { String::new() } else { format!("; {hint}") })]
    UnsupportedKey { key: String, hint: String },

    #[error("override `{0}` must be written key=value")]
    BadOverride(String),

    #[error("`{key}` must be {expected}, got {got}")]
    BadValue {
        key: String,
        expected: &'static str,
        got: String,
    },

    #[error("`{key}` is {got} but must be {range}")]
    OutOfRange {
        key: String,
        got: String,
        range: String,
    },

    #[error("{0}")]
    Invalid(String),
}

/// The known key closest to `key` by edit distance, when it is close enough to be a typo.
pub fn closest<'a>(key: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    known
        .into_iter()
        .map(|k| (edit_distance(key, k), k))
        .filter(|(d, k)| *d <= (k.len().max(key.len()) / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key() {
        let known = ["learning_rate", "lora_rank", "lora_alpha", "output_dir"];
        assert_eq!(
            closest("learnig_rate", known).as_deref(),
            Some("learning_rate")
        );
        assert_eq!(closest("lora_rnak", known).as_deref(), Some("lora_rank"));
        assert_eq!(closest("completely_else", known), None);
    }
}
