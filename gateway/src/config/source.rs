//! Errors a person can act on: each one names the key, where its value came from (the file, an
//! environment variable or a flag) and what the key takes.
//!
//! The config crate merges the layers first and complains afterwards, without saying which layer a
//! bad value came from, and it converts strings to numbers on its own (`history.size = "100"` in a
//! file was taken as 100). So the file is first checked on its own, strictly, merged over the
//! defaults and deserialized with the `toml` crate; then the whole stack is deserialized through
//! `serde_path_to_error`, and a failure is pinned on the highest layer that set the key.

use std::path::Path;

use serde::de::DeserializeOwned;

use super::ConfigError;

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The built-in defaults.
    Defaults,
    /// The `--config` file.
    File(String),
    /// A `PUBGATE__…` variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Defaults => f.write_str("built-in defaults"),
            Source::File(path) => write!(f, "file {path}"),
            Source::Env(name) => write!(f, "environment variable {name}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// A key's value could not be used.
pub fn error(source: &Source, key: &str, problem: &str) -> ConfigError {
    ConfigError::Source {
        origin: source.to_string(),
        key: key.to_string(),
        problem: problem.to_string(),
    }
}

/// The dotted keys a TOML file sets (tables are walked; arrays, like `history.rules`, are values).
pub fn file_keys(path: &Path) -> Vec<String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                _ => out.push(key),
            }
        }
    }
    let mut out = Vec::new();
    if let Some(t) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| toml::from_str::<toml::Table>(&text).ok())
    {
        walk("", &t, &mut out);
    }
    out
}

/// Checks the config file strictly: TOML syntax, known keys, and the type of every value (a string
/// where a number belongs is an error, not a conversion). `defaults` is the built-in TOML.
pub fn check_file<T: DeserializeOwned>(path: &Path, defaults: &str) -> Result<(), ConfigError> {
    let source = Source::File(path.display().to_string());
    let text = std::fs::read_to_string(path).map_err(|e| error(&source, "", &e.to_string()))?;
    let file: toml::Table = toml::from_str(&text).map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!(" (line {line}, column {column})")
        });
        error(&source, "", &format!("not valid TOML{at}: {}", e.message()))
    })?;
    let mut merged: toml::Table =
        toml::from_str(defaults).map_err(|e| error(&Source::Defaults, "", &e.to_string()))?;
    merge(&mut merged, file);
    match serde_path_to_error::deserialize::<_, T>(toml::Value::Table(merged)) {
        Ok(_) => Ok(()),
        Err(e) => {
            let (key, problem) = explain(&e.path().to_string(), &e.inner().to_string());
            Err(error(&source, &key, &problem))
        }
    }
}

/// Deserializes the merged layers, pinning a failure on the layer that set the key: `origin(key)`
/// says which one did.
pub fn deserialize<T: DeserializeOwned>(
    merged: config::Config,
    origin: impl Fn(&str) -> Source,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize::<_, T>(merged).map_err(|e| {
        let (key, problem) = explain(&e.path().to_string(), &e.inner().to_string());
        error(&origin(&key), &key, &problem)
    })
}

/// Lays `over` onto `base`, table by table (a value in `over` replaces the one in `base`).
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Turns a serde error at `path` into the key it is about and a sentence a person can act on.
fn explain(path: &str, message: &str) -> (String, String) {
    // serde_path_to_error says "." for the root; config's own messages may end in "for key `x`".
    // The toml crate adds "\nin `key`" lines; the path says that already.
    let message = message
        .split(" for key `")
        .next()
        .unwrap_or(message)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    let key = if path == "." {
        String::new()
    } else {
        path.to_string()
    };
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((field, expected)) = rest.split_once('`')
    {
        // The path ends in the unknown field itself.
        let parent = key
            .strip_suffix(field)
            .map(|p| p.trim_end_matches('.'))
            .unwrap_or(&key)
            .to_string();
        let candidates: Vec<&str> = expected
            .split('`')
            .skip(1)
            .step_by(2)
            .filter(|c| !c.is_empty())
            .collect();
        let full = |c: &str| {
            if parent.is_empty() {
                c.to_string()
            } else {
                format!("{parent}.{c}")
            }
        };
        let hint = match candidates.iter().map(|c| (distance(field, c), *c)).min() {
            // Close enough to be a typo, and not just any short word two edits away.
            Some((d, c)) if d <= 2 && d * 3 <= field.len().max(c.len()) => {
                format!(" (did you mean {}?)", full(c))
            }
            _ if candidates.is_empty() => String::new(),
            _ => format!(
                " (known keys here: {})",
                candidates
                    .iter()
                    .map(|c| full(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        return (key, format!("unknown key{hint}"));
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let wanted = match expected {
            e if e.starts_with('u') || e.starts_with('i') && e[1..].parse::<u32>().is_ok() => {
                "an integer"
            }
            "a boolean" | "bool" => "true or false",
            "a sequence" => "a list",
            "a string" => "a string",
            other => other,
        };
        return (key, format!("must be {wanted}, not {found}"));
    }
    if let Some(rest) = message.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        let found = found.replace('`', "");
        let wanted = match expected {
            e if e.starts_with('u') && e[1..].parse::<u32>().is_ok() || e == "usize" => {
                "a whole number, 0 or more".to_string()
            }
            "a duration" => {
                "a duration with a unit, such as \"500ms\", \"10s\" or \"5m\"".to_string()
            }
            other => other.to_string(),
        };
        return (key, format!("must be {wanted}, not {found}"));
    }
    (key, message)
}

/// Levenshtein distance, for "did you mean".
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A deserializer for enum-valued keys whose error lists the values the key takes.
pub fn one_of<'de, D, T: Copy>(d: D, choices: &[(&str, T)]) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::Deserialize;
    let s = String::deserialize(d)?;
    choices
        .iter()
        .find(|(name, _)| *name == s)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            serde::de::Error::custom(format!("must be one of {}, not {s:?}", names.join(", ")))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_become_sentences() {
        assert_eq!(
            explain(
                "server.lisen",
                "unknown field `lisen`, expected one of `listen`, `metrics_listen`"
            ),
            (
                "server.lisen".into(),
                "unknown key (did you mean server.listen?)".into()
            )
        );
        assert_eq!(
            explain(
                "server.zzzzzz",
                "unknown field `zzzzzz`, expected `listen` or `x`"
            )
            .1,
            "unknown key (known keys here: server.listen, server.x)"
        );
        assert_eq!(
            explain(
                "history.size",
                "invalid type: string \"100\", expected usize\nin `history.size`\n"
            ),
            (
                "history.size".into(),
                "must be an integer, not string \"100\"".into()
            )
        );
        assert_eq!(
            explain(
                "history.size",
                "invalid value: integer `-1`, expected usize"
            )
            .1,
            "must be a whole number, 0 or more, not integer -1"
        );
        assert_eq!(
            explain(
                "history.ttl",
                "invalid value: string \"5\", expected a duration"
            )
            .1,
            "must be a duration with a unit, such as \"500ms\", \"10s\" or \"5m\", not string \"5\""
        );
        assert_eq!(
            explain("foo", "unknown field `foo`, expected `log` or `tls`").1,
            "unknown key (known keys here: log, tls)",
            "no far-fetched suggestion"
        );
        assert_eq!(distance("lisen", "listen"), 1);
        assert_eq!(distance("", "ab"), 2);
    }
}
