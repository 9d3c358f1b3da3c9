//! The environment layer: `PUBGATE__SECTION__KEY` variables.
//!
//! List values are read the way people write them: `PUBGATE__AUTH__API_KEYS="k1, k2"` is split on
//! commas, each entry trimmed, empty entries dropped, and every entry kept as a string. The config
//! crate's own list parsing does none of that: it kept the space of `" k2"` (a key no request can
//! match), turned an empty value into one empty entry, and, guessing types before it splits lists,
//! read `12345` as a number that then failed to load as a list. So list keys are read here, and only
//! the other keys go through the crate's `Environment` (which still turns `"true"` and `"5"` into
//! the types their keys want).

use std::ffi::OsString;

use config::{ConfigError, Environment, Map, Source, Value, ValueKind};

/// The variables' prefix: `PUBGATE__SECTION__KEY`.
const PREFIX: &str = "PUBGATE";
/// Between the prefix, the section and the key.
const SEPARATOR: &str = "__";
/// Where values of this layer come from, in error messages.
const ORIGIN: &str = "the environment";

/// Every list-valued key that can be set from the environment (lowercase, dotted).
pub const LIST_KEYS: &[&str] = &[
    "auth.api_keys",
    "auth.anonymous_subscribe",
    "auth.anonymous_publish",
    "server.allowed_origins",
    "server.trusted_proxies",
];

/// Splits a list value from the environment: on commas, each entry trimmed, empty ones dropped.
/// `""` is the empty list; `"12345"` is one string entry.
pub fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(String::from)
        .collect()
}

/// The keys the `PUBGATE__…` variables among `vars` set (lowercase, dotted), with each variable's
/// name, so an error can name the variable a bad value came from.
pub fn keys(vars: &[(OsString, OsString)]) -> Vec<(String, String)> {
    let prefix = format!("{PREFIX}{SEPARATOR}").to_lowercase();
    vars.iter()
        .filter_map(|(name, _)| {
            let name = name.to_str()?;
            let key = name
                .to_lowercase()
                .strip_prefix(&prefix)?
                .replace(SEPARATOR, ".");
            Some((key, name.to_string()))
        })
        .collect()
}

/// The environment layer read from `vars` (the process's variables, or a test's): the config
/// crate's [`Environment`] for plain keys, and [`Lists`] for the keys of [`LIST_KEYS`]. Both go in
/// at the same layer; no key is in both.
pub fn sources(
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<(Environment, Lists), ConfigError> {
    // Env keys are case-insensitive (the config crate lowercases them), so the prefix is too.
    let prefix = format!("{PREFIX}{SEPARATOR}").to_lowercase();
    let mut plain = Map::new();
    let mut lists = Vec::new();
    for (name, value) in vars {
        // The config crate skips names that are not Unicode, and so does this.
        let Ok(name) = name.into_string() else {
            continue;
        };
        let lower = name.to_lowercase();
        let Some(key) = lower.strip_prefix(&prefix) else {
            continue;
        };
        let value = value.into_string().map_err(|v| {
            ConfigError::Message(format!(
                "env variable {name} contains non-Unicode data: {v:?}"
            ))
        })?;
        let key = key.replace(SEPARATOR, ".");
        if LIST_KEYS.contains(&key.as_str()) {
            lists.push((key, split_list(&value)));
        } else {
            plain.insert(name, value);
        }
    }
    let env = Environment::with_prefix(PREFIX)
        .prefix_separator(SEPARATOR)
        .separator(SEPARATOR)
        .try_parsing(true)
        .source(Some(plain));
    Ok((env, Lists(lists)))
}

/// List-valued keys from the environment, already split (see [`split_list`]).
#[derive(Clone, Debug)]
pub struct Lists(Vec<(String, Vec<String>)>);

impl Source for Lists {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, ConfigError> {
        let origin = ORIGIN.to_string();
        Ok(self
            .0
            .iter()
            .map(|(key, entries)| {
                let entries = entries
                    .iter()
                    .map(|e| Value::new(Some(&origin), ValueKind::String(e.clone())))
                    .collect();
                (
                    key.clone(),
                    Value::new(Some(&origin), ValueKind::Array(entries)),
                )
            })
            .collect())
    }
}
