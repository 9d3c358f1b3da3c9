//! `[[namespaces]]`: options chosen by topic pattern, for groups of topics that want other
//! defaults than the node's (a price ticker that conflates, a chat that clients may publish to).

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, MAX_HISTORY, SlowConsumerPolicy, source};
use crate::topic::Pattern;

/// One `[[namespaces]]` entry. Every option left out takes the node's own setting.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSettings {
    /// Its name in metrics (`namespace` label): 1–32 characters of `a-z 0-9 _`.
    pub name: String,
    /// The topics it takes (`prices.>`, `chat.*`); the first namespace whose pattern matches a
    /// topic is the topic's.
    pub pattern: String,
    /// Messages kept per topic for recovery; `history.size` when unset.
    pub history_size: Option<usize>,
    /// How long a message stays in history; `history.ttl` when unset.
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
    /// Whether WebSocket clients (and tokens, over HTTP) may publish here at all; API keys still may.
    #[serde(default = "yes")]
    pub client_publish: bool,
    /// What a subscriber whose queue is full gets; `limits.slow_consumer` when unset.
    pub slow_consumer: Option<NamespacePolicy>,
    /// With `slow_consumer = "conflate"`: a top-level field of `data` whose value tells apart
    /// messages that replace each other (e.g. `symbol`); unset: one latest message per topic.
    pub conflate_key: Option<String>,
    /// Largest `data` published here; at most `limits.max_message_size`, which it defaults to.
    pub max_message_size: Option<usize>,
    /// Whether wildcard subscriptions may reach into it.
    #[serde(default = "yes")]
    pub wildcards: bool,
}

fn yes() -> bool {
    true
}

/// A namespace's slow-consumer policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NamespacePolicy {
    /// As the node's policies (see [`SlowConsumerPolicy`]).
    Queue(SlowConsumerPolicy),
    /// A subscriber that falls behind gets the latest message per topic (or per
    /// `conflate_key`) instead of every one: intermediate values are skipped, never reordered.
    Conflate,
}

impl<'de> Deserialize<'de> for NamespacePolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use NamespacePolicy::*;
        source::one_of(
            d,
            &[
                ("disconnect", Queue(SlowConsumerPolicy::Disconnect)),
                ("drop_oldest", Queue(SlowConsumerPolicy::DropOldest)),
                ("conflate", Conflate),
            ],
        )
    }
}

/// Checks every namespace; `max_message_size` is `limits.max_message_size`.
pub(super) fn validate(
    list: &[NamespaceSettings],
    max_message_size: usize,
) -> Result<(), ConfigError> {
    for (i, ns) in list.iter().enumerate() {
        let bad = |field: &str, message: String| {
            Err(ConfigError::Invalid {
                key: format!("namespaces[{i}].{field}").into(),
                message,
            })
        };
        let name_ok = !ns.name.is_empty()
            && ns.name.len() <= 32
            && ns
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !name_ok {
            return bad("name", "must be 1-32 characters of a-z 0-9 _".into());
        }
        if ns.name == "default" {
            return bad(
                "name",
                "\"default\" names the topics no namespace takes".into(),
            );
        }
        if list[..i].iter().any(|other| other.name == ns.name) {
            return bad(
                "name",
                format!("{:?} is used by an earlier namespace", ns.name),
            );
        }
        if let Err(e) = Pattern::parse(&ns.pattern) {
            return bad("pattern", e.to_string());
        }
        if ns.history_size.is_some_and(|n| n > MAX_HISTORY) {
            return bad("history_size", "must be at most 1000000".into());
        }
        if ns.history_ttl.is_some_and(|t| t.is_zero()) {
            return bad("history_ttl", "must be greater than zero".into());
        }
        if let Some(size) = ns.max_message_size
            && (size == 0 || size > max_message_size)
        {
            return bad(
                "max_message_size",
                format!("must be 1 to limits.max_message_size ({max_message_size})"),
            );
        }
        if let Some(key) = &ns.conflate_key {
            if ns.slow_consumer != Some(NamespacePolicy::Conflate) {
                return bad("conflate_key", "needs slow_consumer = \"conflate\"".into());
            }
            let key_ok = !key.is_empty()
                && key.len() <= 64
                && !key.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20);
            if !key_ok {
                return bad(
                    "conflate_key",
                    "must be 1-64 characters, without quotes, backslashes or control characters"
                        .into(),
                );
            }
        }
    }
    Ok(())
}
