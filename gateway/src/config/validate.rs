//! Checks of a loaded configuration that serde cannot express; each error names its key.

use std::time::Duration;

use super::{BrokerKind, ConfigError, MAX_HISTORY, MESSAGE_FRAME_OVERHEAD, Settings};
use crate::topic::Pattern;

impl Settings {
    /// Refuses values that would fail later or silently misbehave, naming the key.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: &str| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message: message.to_string(),
            })
        };
        if self.tls.max_handshakes == 0 {
            return invalid("tls.max_handshakes", "must be at least 1");
        }
        if let Some(path) = &self.server.echo_path
            && (!path.starts_with('/') || path == "/ws" || path.starts_with("/v1/"))
        {
            return invalid(
                "server.echo_path",
                "must start with '/' and not collide with /ws or /v1/",
            );
        }
        if self.server.ping_interval.is_zero() {
            return invalid("server.ping_interval", "must be greater than zero");
        }
        if self.server.idle_timeout <= self.server.ping_interval {
            return invalid(
                "server.idle_timeout",
                "must be longer than server.ping_interval",
            );
        }
        if self.limits.max_message_size < 64 {
            return invalid("limits.max_message_size", "must be at least 64 bytes");
        }
        if self.limits.max_subscriptions == 0 {
            return invalid("limits.max_subscriptions", "must be at least 1");
        }
        if self.limits.send_queue_frames < 2 {
            return invalid("limits.send_queue_frames", "must be at least 2");
        }
        // A message is never larger than limits.max_message_size (publishes are refused past it and
        // the registry drops bigger ones from the broker), so an empty queue always takes it.
        if self.limits.send_queue_bytes < self.limits.max_message_size + MESSAGE_FRAME_OVERHEAD {
            return Err(ConfigError::Invalid {
                key: "limits.send_queue_bytes".into(),
                message: format!(
                    "must hold one message frame of limits.max_message_size ({}) plus {} bytes of \
                     frame header, topic and envelope: at least {}",
                    self.limits.max_message_size,
                    MESSAGE_FRAME_OVERHEAD,
                    self.limits.max_message_size + MESSAGE_FRAME_OVERHEAD
                ),
            });
        }
        if self.limits.max_batch_messages == 0 {
            return invalid("limits.max_batch_messages", "must be at least 1");
        }
        if self.limits.max_batch_bytes < self.limits.max_message_size {
            return invalid(
                "limits.max_batch_bytes",
                "must be at least limits.max_message_size",
            );
        }
        if self.limits.max_json_depth == 0 {
            return invalid("limits.max_json_depth", "must be at least 1");
        }
        if self.limits.subscribe_rate == 0 {
            return invalid("limits.subscribe_rate", "must be at least 1");
        }
        if self.limits.subscribe_burst == 0 {
            return invalid("limits.subscribe_burst", "must be at least 1");
        }
        // hyper's own floor: it refuses (panics on) a smaller read buffer.
        if !(8192..=1 << 20).contains(&self.server.max_header_bytes) {
            return invalid(
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            );
        }
        if self.server.proxy_protocol && self.server.trusted_proxies.is_empty() {
            return invalid(
                "server.trusted_proxies",
                "must name the load balancers when server.proxy_protocol is on",
            );
        }
        for (i, p) in self.server.trusted_proxies.iter().enumerate() {
            if let Err(e) = crate::per_ip::Cidr::parse(p) {
                return Err(ConfigError::Invalid {
                    key: format!("server.trusted_proxies[{i}]").into(),
                    message: e.to_string(),
                });
            }
        }
        if self.limits.message_rate == 0 {
            return invalid("limits.message_rate", "must be at least 1");
        }
        if self.limits.message_burst == 0 {
            return invalid("limits.message_burst", "must be at least 1");
        }
        if self.auth.api_keys.iter().any(|k| k.trim().is_empty()) {
            return invalid("auth.api_keys", "keys must not be empty");
        }
        for (i, k) in self.auth.scoped_api_keys.iter().enumerate() {
            let bad = |field: &str, message: String| {
                Err(ConfigError::Invalid {
                    key: format!("auth.scoped_api_keys[{i}].{field}").into(),
                    message,
                })
            };
            if k.key.trim().is_empty() {
                return bad("key", "must not be empty".into());
            }
            for (field, list) in [("publish", &k.publish), ("subscribe", &k.subscribe)] {
                if let Some(e) = list.iter().find_map(|p| Pattern::parse(p).err()) {
                    return bad(field, e.to_string());
                }
            }
        }
        match (&self.tls.cert, &self.tls.key) {
            (Some(_), None) => return invalid("tls.key", "must be set when tls.cert is set"),
            (None, Some(_)) => return invalid("tls.cert", "must be set when tls.key is set"),
            _ => {}
        }
        match self.broker.kind {
            BrokerKind::Memory => {}
            BrokerKind::Redis | BrokerKind::RedisCluster => {
                if self
                    .broker
                    .url
                    .as_deref()
                    .is_none_or(|u| u.trim().is_empty())
                {
                    return invalid(
                        "broker.url",
                        "is required when broker.kind is \"redis\" or \"redis-cluster\" (e.g. redis://127.0.0.1:6379)",
                    );
                }
                if let Err(e) = broker_bridge::RedisConfig::new(
                    self.broker.url.clone().unwrap_or_default(),
                    self.broker.kind == BrokerKind::RedisCluster,
                )
                .validate()
                {
                    return Err(ConfigError::Invalid {
                        key: "broker.url".into(),
                        message: e.to_string(),
                    });
                }
            }
        }
        if let Some(bad) = super::bad_log_directive(&self.log.level) {
            return Err(ConfigError::Invalid {
                key: "log.level".into(),
                message: format!(
                    "must be a level (error, warn, info, debug, trace, off) or a list of \
                     target=level, not {bad:?}"
                ),
            });
        }
        if self.broker.prefix.is_empty() {
            return invalid("broker.prefix", "must not be empty");
        }
        if self.broker.command_timeout.is_zero() {
            return invalid("broker.command_timeout", "must be greater than zero");
        }
        if self.broker.backlog_messages == 0 {
            return invalid("broker.backlog_messages", "must be greater than zero");
        }
        if self.broker.backlog_bytes < self.limits.max_message_size {
            return invalid(
                "broker.backlog_bytes",
                "must hold at least one message of limits.max_message_size",
            );
        }
        if self.broker.watch_prefixes == 0 {
            return invalid("broker.watch_prefixes", "must be at least 1");
        }
        if self.broker.watch_refresh.is_zero() {
            return invalid("broker.watch_refresh", "must be greater than zero");
        }
        if self.broker.watch_lease < self.broker.watch_refresh * 2 {
            return invalid(
                "broker.watch_lease",
                "must be at least twice broker.watch_refresh",
            );
        }
        if self.broker.canary_interval.is_zero() {
            return invalid("broker.canary_interval", "must be greater than zero");
        }
        if self.broker.canary_timeout <= self.broker.canary_interval {
            return invalid(
                "broker.canary_timeout",
                "must be longer than broker.canary_interval",
            );
        }
        if self
            .auth
            .jwt_secret
            .as_deref()
            .is_some_and(|s| s.len() < 32)
        {
            return invalid(
                "auth.jwt_secret",
                "must be at least 32 bytes (HS256 keys shorter than the hash are guessable)",
            );
        }
        if self.auth.jwks_refresh_interval < Duration::from_secs(1) {
            return invalid("auth.jwks_refresh_interval", "must be at least 1s");
        }
        if self.auth.jwt_leeway > Duration::from_secs(300) {
            return invalid("auth.jwt_leeway", "must be at most 5m");
        }
        if self.drain.delay >= self.drain.grace {
            return invalid("drain.delay", "must be shorter than drain.grace");
        }
        if self.compression.level > super::Compression::MAX_LEVEL {
            return invalid("compression.level", "must be 0 to 9");
        }
        if self.history.size > MAX_HISTORY {
            return invalid("history.size", "must be at most 1000000");
        }
        if let Err(e) = check_idle_ttl(self.broker.topic_idle_ttl) {
            return invalid("broker.topic_idle_ttl", e);
        }
        if let Err(e) = check_ttl(self.history.directory_window) {
            return invalid("history.directory_window", e);
        }
        if let Err(e) = check_ttl(self.history.ttl) {
            return invalid("history.ttl", e);
        }
        for (i, rule) in self.history.rules.iter().enumerate() {
            let bad = |field: &str, message: String| {
                Err(ConfigError::Invalid {
                    key: format!("history.rules[{i}].{field}").into(),
                    message,
                })
            };
            if let Err(e) = Pattern::parse(&rule.pattern) {
                return bad("pattern", e.to_string());
            }
            if rule.size.is_some_and(|n| n > MAX_HISTORY) {
                return bad("size", "must be at most 1000000".into());
            }
            if let Some(Err(e)) = rule.ttl.map(check_ttl) {
                return bad("ttl", e.into());
            }
        }
        super::namespaces::validate(&self.namespaces, self.limits.max_message_size)
    }
}

/// The longest history TTL: Redis takes TTLs in milliseconds, and nothing needs more than a year.
const MAX_HISTORY_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// Checks a history TTL: more than zero, at most a year.
pub(super) fn check_ttl(ttl: Duration) -> Result<(), &'static str> {
    if ttl.is_zero() {
        return Err("must be greater than zero");
    }
    check_millis(ttl, MAX_HISTORY_TTL, "must be at most 366d")
}

/// The longest `broker.topic_idle_ttl`: a century, far inside what Redis's `PEXPIRE` accepts (past
/// it, every publish failed with "value is not an integer or out of range").
const MAX_IDLE_TTL: Duration = Duration::from_secs(36_500 * 24 * 3600);

/// Checks `broker.topic_idle_ttl`: 0 (the keys never expire) or 1ms to 36500d.
fn check_idle_ttl(ttl: Duration) -> Result<(), &'static str> {
    if ttl.is_zero() {
        return Ok(());
    }
    check_millis(ttl, MAX_IDLE_TTL, "must be at most 36500d")
}

/// Checks a non-zero TTL that Redis keeps in milliseconds: less than one would become 0, "no
/// TTL"; more than `max` is `too_long`.
fn check_millis(ttl: Duration, max: Duration, too_long: &'static str) -> Result<(), &'static str> {
    if ttl < Duration::from_millis(1) {
        Err("must be at least 1ms (Redis counts in milliseconds)")
    } else if ttl > max {
        Err(too_long)
    } else {
        Ok(())
    }
}
