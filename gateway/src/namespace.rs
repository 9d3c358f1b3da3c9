//! Namespaces at run time: the options and the metrics of the group a topic belongs to
//! (`[[namespaces]]`, first pattern that matches; topics no namespace takes are in `default`).
//!
//! A topic's namespace is looked up once per message per node (delivery) or per request (publish,
//! subscribe): a short list of patterns, nothing at all when none is configured. Metrics are
//! labelled by namespace, never by topic, so their cardinality is the config's, not the traffic's.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use serde::Deserializer as _;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::{NamespacePolicy, NamespaceSettings};
use crate::metrics::Metrics;
use crate::send_queue::Policy;
use crate::topic::Pattern;

/// One namespace's options, resolved against the node's settings.
pub struct Namespace {
    /// Its name (the `namespace` label of its metrics).
    pub name: String,
    /// `None` for `default`, which takes every topic no other namespace does.
    pattern: Option<Pattern>,
    /// Whether WebSocket clients and tokens may publish to its topics.
    pub client_publish: bool,
    /// Its slow-consumer policy; `None`: each connection's own (`limits.slow_consumer`).
    pub policy: Option<NamespacePolicy>,
    /// With conflation: the `data` field whose value tells messages of a topic apart.
    conflate_key: Option<String>,
    /// Largest `data` of its topics.
    pub max_message_size: usize,
    /// Whether wildcard subscriptions may reach into it.
    pub wildcards: bool,
    /// `pubgate_namespace_messages_published_total{namespace}`.
    pub published: IntCounter,
    /// `pubgate_namespace_messages_delivered_total{namespace}`.
    pub delivered: IntCounter,
    /// `pubgate_namespace_messages_conflated_total{namespace}`.
    pub conflated: IntCounter,
}

/// Every namespace of the node, in config order, then `default`.
pub struct Namespaces {
    list: Vec<Namespace>,
    default: Namespace,
}

impl Namespaces {
    /// Resolves `[[namespaces]]` (validated settings; `max_message_size` is
    /// `limits.max_message_size`) and registers their metrics.
    pub fn new(
        namespaces: &[NamespaceSettings],
        max_message_size: usize,
        metrics: &Metrics,
    ) -> Namespaces {
        let labelled = |name: &str| {
            let l = [name];
            (
                metrics.ns_published.with_label_values(&l),
                metrics.ns_delivered.with_label_values(&l),
                metrics.ns_conflated.with_label_values(&l),
            )
        };
        let max = max_message_size;
        let list = namespaces
            .iter()
            .filter_map(|n| {
                let (published, delivered, conflated) = labelled(&n.name);
                Some(Namespace {
                    name: n.name.clone(),
                    pattern: Some(Pattern::parse(&n.pattern).ok()?),
                    client_publish: n.client_publish,
                    policy: n.slow_consumer,
                    conflate_key: n.conflate_key.clone(),
                    max_message_size: n.max_message_size.unwrap_or(max),
                    wildcards: n.wildcards,
                    published,
                    delivered,
                    conflated,
                })
            })
            .collect();
        let (published, delivered, conflated) = labelled("default");
        let default = Namespace {
            name: "default".into(),
            pattern: None,
            client_publish: true,
            policy: None,
            conflate_key: None,
            max_message_size: max,
            wildcards: true,
            published,
            delivered,
            conflated,
        };
        Namespaces { list, default }
    }

    /// The namespace of `topic`.
    pub fn of(&self, topic: &str) -> &Namespace {
        self.list
            .iter()
            .find(|n| n.pattern.as_ref().is_some_and(|p| p.matches(topic)))
            .unwrap_or(&self.default)
    }

    /// Whether a subscription to `name` (a topic or a wildcard) can receive messages of a
    /// conflating namespace.
    pub fn reaches_conflation(&self, name: &str) -> bool {
        let conflates = |n: &Namespace| n.policy == Some(NamespacePolicy::Conflate);
        match Pattern::parse(name) {
            Ok(p) if crate::topic::is_wildcard(name) => self
                .list
                .iter()
                .any(|n| conflates(n) && n.pattern.as_ref().is_some_and(|np| np.overlaps(&p))),
            _ => conflates(self.of(name)),
        }
    }

    /// The first namespace that refuses wildcards and has topics `wildcard` could match.
    pub fn refusing_wildcard(&self, wildcard: &Pattern) -> Option<&Namespace> {
        self.list
            .iter()
            .find(|n| !n.wildcards && n.pattern.as_ref().is_some_and(|p| p.overlaps(wildcard)))
    }
}

impl Namespace {
    /// How a message of `topic` with `data` is queued to a subscriber that is behind; `key` holds
    /// what the message's conflation key borrows.
    pub fn queue_policy<'k>(
        &self,
        topic: &str,
        data: &[u8],
        key: &'k mut Option<Bytes>,
    ) -> Policy<'k> {
        match self.policy {
            None => Policy::Own,
            Some(NamespacePolicy::Queue(p)) => Policy::Queue(p),
            Some(NamespacePolicy::Conflate) => {
                Policy::Conflate(key.insert(self.conflation_key(topic, data)))
            }
        }
    }

    /// What a message of `topic` with `data` replaces in a conflating queue: the topic, and the
    /// raw JSON of the `conflate_key` field of `data` when it has one.
    pub fn conflation_key(&self, topic: &str, data: &[u8]) -> Bytes {
        let field = self
            .conflate_key
            .as_deref()
            .and_then(|key| top_level_field(data, key));
        // A key value is a short identifier (`"EURUSD"`); a publisher's huge one would make every
        // waiting message keep a large key: such messages share the topic's slot instead.
        let field = field
            .as_deref()
            .map(|f| f.get().as_bytes())
            .filter(|f| f.len() <= MAX_KEY_VALUE)
            .unwrap_or_default();
        let mut key = BytesMut::with_capacity(topic.len() + 1 + field.len());
        key.put_slice(topic.as_bytes());
        key.put_u8(0);
        key.put_slice(field);
        key.freeze()
    }
}

/// Bytes of a `conflate_key` value (its raw JSON) that tell messages apart; longer values do not.
const MAX_KEY_VALUE: usize = 256;

/// The raw value of `key` in a JSON object, without parsing the other values. With the key twice,
/// the last one counts, as in browsers' `JSON.parse`.
fn top_level_field(data: &[u8], key: &str) -> Option<Box<RawValue>> {
    struct Find<'k>(&'k str);
    impl<'de> Visitor<'de> for Find<'_> {
        type Value = Option<Box<RawValue>>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut found = None;
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                if k == self.0 {
                    found = Some(map.next_value::<Box<RawValue>>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(found)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(data);
    de.deserialize_map(Find(key)).ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_found_at_the_top_level_only() {
        let raw = |d: &str, k| top_level_field(d.as_bytes(), k).map(|v| v.get().to_string());
        assert_eq!(
            raw(r#"{"symbol":"EURUSD","p":1.1}"#, "symbol").as_deref(),
            Some(r#""EURUSD""#)
        );
        assert_eq!(
            raw(r#"{"p":{"symbol":"x"},"symbol":7}"#, "symbol").as_deref(),
            Some("7")
        );
        assert_eq!(raw(r#"{"p":{"symbol":"x"}}"#, "symbol"), None);
        assert_eq!(
            raw(r#"{"sym\u0062ol":"esc"}"#, "symbol").as_deref(),
            Some(r#""esc""#)
        );
        assert_eq!(
            raw(r#"{"symbol":"a","symbol":"b"}"#, "symbol").as_deref(),
            Some(r#""b""#),
            "the last one, as JSON.parse reads it"
        );
        assert_eq!(raw("[1,2]", "symbol"), None);
        assert_eq!(raw("42", "symbol"), None);
    }
}
