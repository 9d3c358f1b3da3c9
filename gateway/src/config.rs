//! Layered settings: built-in defaults → TOML file → `PUBGATE__SECTION__KEY` env → command-line flags.
//!
//! Every key is lowercase snake_case (the config crate lowercases env keys) and every section rejects
//! unknown keys, so a typo fails start-up with the key's name instead of being ignored.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::borrow::Cow;
use std::sync::Arc;

use broker_bridge::{HistoryLimits, HistoryPolicy};
use clap::Parser;
use serde::Deserialize;

use crate::topic::Pattern;
pub use compression::Compression;

mod compression;
mod env;
mod namespaces;
mod source;
mod validate;

pub use namespaces::{NamespacePolicy, NamespaceSettings};

/// Command-line flags. Each one overrides the config key named in its help; flags that are not given
/// leave the lower layers alone.
#[derive(Debug, Default, Parser)]
#[command(
    name = "pubgate",
    version,
    about = "A horizontally scaled WebSocket pub/sub gateway."
)]
#[command(
    after_help = "Every config key can also be set by env: PUBGATE__SECTION__KEY (e.g. PUBGATE__SERVER__LISTEN=0.0.0.0:8080).\nSee docs/configuration.md for every key."
)]
pub struct Cli {
    /// TOML config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address for WebSocket and the HTTP API [server.listen, default 127.0.0.1:8080].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Separate plain listener for /metrics, /healthz, /readyz [server.metrics_listen].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Broker: memory, redis or redis-cluster [broker.kind, default memory].
    #[arg(long, value_name = "KIND")]
    pub broker: Option<String>,
    /// Redis URL (redis://, rediss://, redis+sentinel://host:port,…/master), or comma-separated seed
    /// nodes for a cluster [broker.url].
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// PEM certificate chain; TLS is on when both cert and key are set [tls.cert].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key [tls.key].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Diagnostic route that echoes WebSocket frames, off by default [server.echo_path].
    #[arg(long, value_name = "PATH")]
    pub echo_path: Option<String>,
    /// Log format: plain or json [log.format].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

/// All settings of one node.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Listeners and connection handling.
    pub server: Server,
    /// Per-connection and per-message limits.
    pub limits: Limits,
    /// Which broker carries messages between nodes.
    pub broker: BrokerSettings,
    /// TLS on the main listener.
    pub tls: Tls,
    /// Who may connect, subscribe and publish.
    pub auth: Auth,
    /// Graceful shutdown.
    pub drain: Drain,
    /// Message history for recovery.
    pub history: History,
    /// permessage-deflate toward clients.
    pub compression: Compression,
    /// Logging.
    pub log: Log,
    /// Options by topic pattern (`[[namespaces]]`), first match wins.
    pub namespaces: Vec<NamespaceSettings>,
}

/// `[server]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// WebSocket + HTTP API address.
    pub listen: SocketAddr,
    /// Optional plain listener for `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: Option<SocketAddr>,
    /// Diagnostic echo route (e.g. `/echo`); off when unset.
    pub echo_path: Option<String>,
    /// WebSocket connections this node holds at most; upgrades past it get 503. 0 (the default):
    /// as many as the open-files limit allows.
    pub max_connections: usize,
    /// Time a client has to send its HTTP request head (and, with TLS, finish the TLS handshake), and
    /// again to send a request body.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often the server pings an idle client.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A client that sends nothing (not even a pong) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Origins allowed to open WebSockets (`Origin` header); empty allows any.
    pub allowed_origins: Vec<String>,
    /// Serve the live page at `/` and its assets under `/_pubgate/`.
    pub page: bool,
    /// WebSocket connections one client address may hold at once; 0: no limit.
    pub max_connections_per_ip: usize,
    /// Proxies (IPs or CIDR ranges) whose `X-Forwarded-For` names the client's address.
    pub trusted_proxies: Vec<String>,
    /// Bytes of an HTTP request head (request line and headers) at most; larger ones get 431.
    pub max_header_bytes: usize,
    /// Every main-listener connection comes from one of `trusted_proxies` and starts with a PROXY
    /// protocol (v1 or v2) header naming the client.
    pub proxy_protocol: bool,
}

/// What to do with a subscriber whose send queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Close the connection (1008, "slow consumer"); the client reconnects and resumes.
    Disconnect,
    /// Drop the oldest queued messages; the client sees the gap in the offsets.
    DropOldest,
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest client message (WebSocket, after reassembly) and largest publish body, in bytes.
    pub max_message_size: usize,
    /// Topics one connection may subscribe to at once.
    pub max_subscriptions: usize,
    /// Wildcard subscriptions one connection may hold at once (they count as subscriptions too);
    /// 0: none.
    pub max_wildcards: usize,
    /// Distinct wildcard patterns the node serves at most (each is a pattern subscription in Redis,
    /// checked on every publish, and a match on every message of its prefix).
    pub max_wildcard_patterns: usize,
    /// Frames queued for one connection at most.
    pub send_queue_frames: usize,
    /// Bytes queued for one connection at most.
    pub send_queue_bytes: usize,
    /// What happens when a connection's send queue is full.
    pub slow_consumer: SlowConsumerPolicy,
    /// Messages in one batch publish at most.
    pub max_batch_messages: usize,
    /// Bytes of one batch publish body at most.
    pub max_batch_bytes: usize,
    /// Levels of nesting a published `data` value may have at most (`[[1]]` has 2).
    pub max_json_depth: usize,
    /// Subscribe and unsubscribe requests one connection may make per second, on average.
    pub subscribe_rate: u32,
    /// Subscribe and unsubscribe requests one connection may make in a burst, above the rate.
    pub subscribe_burst: u32,
    /// Messages (text or binary, after reassembly) one pub/sub connection may send per second, on
    /// average; past it each gets `rate_limited`.
    pub message_rate: u32,
    /// Messages one connection may send in a burst, above the rate; also how many refused ones it
    /// may send (refilled at a tenth of the rate) before it is closed with 1008.
    pub message_burst: u32,
}

/// Broker implementations a node can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// Embedded, single node.
    Memory,
    /// Redis pub/sub (standalone or Sentinel).
    Redis,
    /// Redis Cluster sharded pub/sub.
    RedisCluster,
}

/// `[broker]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    /// Which broker.
    pub kind: BrokerKind,
    /// Redis URL(s): `redis://`, `rediss://`, `redis+sentinel://host:port,…/master`, or
    /// comma-separated cluster seeds. Required for the Redis kinds.
    pub url: Option<String>,
    /// Channel and key prefix in Redis.
    pub prefix: String,
    /// The longest a Redis command may take before the operation fails with `broker_unavailable`.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How often the node sends itself a canary through Redis.
    #[serde(with = "humantime_serde")]
    pub canary_interval: Duration,
    /// Not ready, and the subscription connection is replaced, when no canary came back for this
    /// long.
    #[serde(with = "humantime_serde")]
    pub canary_timeout: Duration,
    /// A topic unused for this long loses its epoch and offset in Redis (its next use starts a new
    /// epoch).
    #[serde(with = "humantime_serde")]
    pub topic_idle_ttl: Duration,
    /// Messages from Redis that may wait for the node's fan-out; past this (or `backlog_bytes`)
    /// a message is dropped and its topic refilled from history.
    pub backlog_messages: usize,
    /// Payload bytes from Redis that may wait for the node's fan-out.
    pub backlog_bytes: usize,
    /// How long the node keeps a topic's broker subscription after its last local subscriber left,
    /// so a client that comes back (or churns) does not cost a broker unsubscribe and subscribe.
    #[serde(with = "humantime_serde")]
    pub unsubscribe_delay: Duration,
    /// Redis Cluster: how long a wildcard prefix stays watched in the slots' watch sets unless the
    /// node renews it (publishes below it keep costing a broadcast this long after its last
    /// subscriber left).
    #[serde(with = "humantime_serde")]
    pub watch_lease: Duration,
    /// Redis Cluster: how often a node renews its wildcard watches (at most half the lease).
    #[serde(with = "humantime_serde")]
    pub watch_refresh: Duration,
    /// Redis Cluster: distinct wildcard prefixes one node may hold watches for at once (each
    /// costs every hash slot a member, about 0.5–2 MB of cluster memory, while its lease lasts).
    pub watch_prefixes: usize,
}

/// `[tls]`
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain, leaf first. Reloaded when the file changes.
    pub cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1). Reloaded when the file changes.
    pub key: Option<PathBuf>,
    /// TLS handshakes in progress at most; a connection past it is closed before any crypto.
    pub max_handshakes: usize,
}

/// `[auth]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// Allow connections without a token. Default: true while no key or secret is configured.
    pub anonymous: Option<bool>,
    /// Topic patterns anonymous clients may subscribe to. Default: `[">"]` while no key is configured.
    pub anonymous_subscribe: Option<Vec<String>>,
    /// Topic patterns anonymous clients may publish to over WebSocket. Default: `[">"]` while no key
    /// is configured, else none.
    pub anonymous_publish: Option<Vec<String>>,
    /// HS256 secret for JWTs.
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS256 (RSA key) or ES256 (EC P-256 key) JWTs.
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS file (`{"keys":[…]}`): several keys, each chosen by the token's `kid`.
    pub jwks_file: Option<PathBuf>,
    /// JWKS URL (https, or http to loopback) fetched at start, every `jwks_refresh_interval`, and
    /// when a token names an unknown `kid`.
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// Fetches of `jwks_url` for unknown key ids happen at most this often.
    #[serde(with = "humantime_serde")]
    pub jwks_min_interval: Duration,
    /// When set, a token's `aud` must contain it.
    pub jwt_audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub jwt_issuer: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub jwt_leeway: Duration,
    /// Keys accepted by the HTTP publish API (`Authorization: Bearer <key>`); empty: no key needed.
    pub api_keys: Vec<String>,
    /// API keys limited to topic patterns (TOML `[[auth.scoped_api_keys]]`).
    pub scoped_api_keys: Vec<ScopedApiKey>,
}

/// One `[[auth.scoped_api_keys]]`: a key for the HTTP API that may publish to and read only the
/// topics of its patterns.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedApiKey {
    /// The key (`Authorization: Bearer <key>`).
    pub key: String,
    /// Topic patterns it may publish to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns whose history it may read.
    #[serde(default)]
    pub subscribe: Vec<String>,
}

/// `[drain]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drain {
    /// Total time from SIGTERM to exit.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// How long the node stays up, not ready but still serving, before it closes clients.
    #[serde(with = "humantime_serde")]
    pub delay: Duration,
}

/// `[history]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// Messages kept per topic (0: none), for topics no rule matches.
    pub size: usize,
    /// How long a message stays in history, for topics no rule matches.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Per-topic limits by topic pattern (`[[history.rules]]`); the first match wins.
    pub rules: Vec<HistoryRule>,
    /// How far back a wildcard resume may reach: the broker's directory of recently published
    /// topics keeps this long (a longer absence gets `recovered:false`).
    #[serde(with = "humantime_serde")]
    pub directory_window: Duration,
}

/// One `[[history.rules]]` entry: the history of topics matching `pattern`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRule {
    /// A topic pattern (`chat.>`, `scores.*`, `ticker.btc`).
    pub pattern: String,
    /// Messages kept per matching topic (0: no history); `history.size` when unset.
    pub size: Option<usize>,
    /// How long a message stays; `history.ttl` when unset.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
}

impl History {
    /// The limits for topics no rule matches.
    pub fn default_limits(&self) -> HistoryLimits {
        HistoryLimits {
            size: self.size,
            ttl: self.ttl,
        }
    }

    /// The per-topic policy the broker applies: the first rule whose pattern matches, else the
    /// defaults; then the topic's namespace (the first whose pattern matches) overrides what it
    /// sets. The settings must have been validated (every pattern parses).
    pub fn policy(&self, namespaces: &[NamespaceSettings]) -> Arc<dyn HistoryPolicy> {
        let default = self.default_limits();
        let parse = |p: &str| Pattern::parse(p).ok();
        let rules: Vec<(Pattern, HistoryLimits)> = self
            .rules
            .iter()
            .filter_map(|r| {
                let limits = HistoryLimits {
                    size: r.size.unwrap_or(default.size),
                    ttl: r.ttl.unwrap_or(default.ttl),
                };
                Some((parse(&r.pattern)?, limits))
            })
            .collect();
        // Every namespace counts, those without history options too: a topic belongs to the
        // first namespace that matches, whatever later ones say.
        let overrides: Vec<(Pattern, Option<usize>, Option<Duration>)> = namespaces
            .iter()
            .filter_map(|n| Some((parse(&n.pattern)?, n.history_size, n.history_ttl)))
            .collect();
        if rules.is_empty() && overrides.iter().all(|(_, s, t)| s.is_none() && t.is_none()) {
            return Arc::new(default);
        }
        Arc::new(move |topic: &str| {
            let base = rules
                .iter()
                .find(|(p, _)| p.matches(topic))
                .map_or(default, |(_, limits)| *limits);
            match overrides.iter().find(|(p, _, _)| p.matches(topic)) {
                Some((_, size, ttl)) => HistoryLimits {
                    size: size.unwrap_or(base.size),
                    ttl: ttl.unwrap_or(base.ttl),
                },
                None => base,
            }
        })
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    /// plain or json.
    pub format: LogFormat,
    /// A tracing filter (`info`, `pubgate=debug,warn`); `RUST_LOG` overrides it.
    pub level: String,
}

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or a value did not fit its key.
    #[error("config: {0}")]
    Load(#[from] config::ConfigError),
    /// A key's value from one layer cannot be used: the layer, the key and what it takes.
    #[error("config: {origin}: {}{problem}", if key.is_empty() { String::new() } else { format!("{key}: ") })]
    Source {
        /// Where the value came from: `file <path>`, `environment variable <NAME>`, `flag --x`.
        origin: String,
        /// The dotted key (empty for the file as a whole).
        key: String,
        /// What is wrong, in words.
        problem: String,
    },
    /// The values parsed but do not make sense together.
    #[error("config: {key}: {message}")]
    Invalid {
        /// The offending key.
        key: Cow<'static, str>,
        /// What is wrong with it.
        message: String,
    },
}

// Enum-valued keys name the values they take when given another.
impl<'de> Deserialize<'de> for BrokerKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use BrokerKind::*;
        source::one_of(
            d,
            &[
                ("memory", Memory),
                ("redis", Redis),
                ("redis-cluster", RedisCluster),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for SlowConsumerPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use SlowConsumerPolicy::*;
        source::one_of(
            d,
            &[("disconnect", Disconnect), ("drop_oldest", DropOldest)],
        )
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use LogFormat::*;
        source::one_of(d, &[("plain", Plain), ("json", Json)])
    }
}

/// The most messages `history.size` (or a rule's `size`) may keep per topic.
const MAX_HISTORY: usize = 1_000_000;

/// What a message frame adds to its `data` at most: the WebSocket frame header (14 bytes), a topic
/// name of 200 characters (they never need escaping) and the JSON envelope around them (`op`,
/// `offset` up to 20 digits, quotes and commas: under 100 bytes).
pub const MESSAGE_FRAME_OVERHEAD: usize = 14 + 200 + 100;

/// Built-in defaults, the lowest layer. Kept as TOML so it reads like the example file.
const DEFAULTS: &str = r#"
namespaces = []

[server]
listen = "127.0.0.1:8080"
max_connections = 0
handshake_timeout = "10s"
ping_interval = "25s"
idle_timeout = "60s"
allowed_origins = []
page = true
max_connections_per_ip = 0
trusted_proxies = []
max_header_bytes = 65536
proxy_protocol = false

[limits]
max_message_size = 65536
max_subscriptions = 100
max_wildcards = 10
max_wildcard_patterns = 1000
send_queue_frames = 1024
send_queue_bytes = 4194304
slow_consumer = "disconnect"
max_batch_messages = 1000
max_batch_bytes = 1048576
max_json_depth = 128
subscribe_rate = 50
subscribe_burst = 200
message_rate = 1000
message_burst = 5000

[broker]
kind = "memory"
prefix = "pubgate:"
command_timeout = "1s"
canary_interval = "1s"
canary_timeout = "3s"
topic_idle_ttl = "24h"
backlog_messages = 65536
backlog_bytes = 67108864
unsubscribe_delay = "1s"
watch_lease = "60s"
watch_refresh = "15s"
watch_prefixes = 64

[tls]
max_handshakes = 1024

[auth]
api_keys = []
scoped_api_keys = []
jwt_leeway = "5s"
jwks_refresh_interval = "5m"
jwks_min_interval = "30s"

[drain]
grace = "30s"
delay = "0s"

[history]
size = 100
ttl = "5m"
rules = []
directory_window = "1h"

[compression]
enabled = true
min_size = 256
level = 6

[log]
format = "plain"
level = "info"
"#;

impl Settings {
    /// Loads the layers in order, with the process's environment, and validates the result.
    pub fn load(cli: &Cli) -> Result<Settings, ConfigError> {
        Settings::load_with_env(cli, std::env::vars_os())
    }

    /// Like [`Settings::load`], with the environment layer read from `vars` instead of the
    /// process's environment.
    pub fn load_with_env(
        cli: &Cli,
        vars: impl IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    ) -> Result<Settings, ConfigError> {
        use config::{Config, File, FileFormat};

        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        let mut file_keys = Vec::new();
        if let Some(path) = &cli.config {
            source::check_file::<Settings>(path, DEFAULTS)?;
            file_keys = source::file_keys(path);
            builder = builder.add_source(File::from(path.as_path()).format(FileFormat::Toml));
        }
        let vars: Vec<_> = vars.into_iter().collect();
        let env_keys = env::keys(&vars);
        let (plain, lists) = env::sources(vars)?;
        builder = builder.add_source(plain).add_source(lists);
        let flags = [
            ("server.listen", cli.listen.clone()),
            ("server.metrics_listen", cli.metrics_listen.clone()),
            ("broker.kind", cli.broker.clone()),
            ("broker.url", cli.redis_url.clone()),
            ("server.echo_path", cli.echo_path.clone()),
            ("log.format", cli.log_format.clone()),
            ("tls.cert", path_string(&cli.tls_cert)),
            ("tls.key", path_string(&cli.tls_key)),
        ];
        let mut flag_keys = Vec::new();
        for (key, value) in flags {
            if value.is_some() {
                flag_keys.push(key);
            }
            builder = builder.set_override_option(key, value)?;
        }
        // A key, or a section that holds it (an unknown section is reported by its own name).
        let sets = |set: &str, key: &str| {
            set == key
                || set
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.'))
        };
        let origin = |key: &str| {
            if let Some(k) = flag_keys.iter().find(|k| sets(k, key)) {
                source::Source::Flag(flag_of(k))
            } else if let Some((_, name)) = env_keys.iter().find(|(k, _)| sets(k, key)) {
                source::Source::Env(name.clone())
            } else if let (Some(path), true) = (&cli.config, file_keys.iter().any(|k| sets(k, key)))
            {
                source::Source::File(path.display().to_string())
            } else {
                source::Source::Defaults
            }
        };
        let settings: Settings = source::deserialize(builder.build()?, origin)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Whether any credential is configured (which turns anonymous defaults off).
    pub fn has_credentials(&self) -> bool {
        !self.auth.api_keys.is_empty()
            || !self.auth.scoped_api_keys.is_empty()
            || self.auth.jwt_secret.is_some()
            || self.auth.jwt_public_key.is_some()
            || self.auth.jwks_file.is_some()
            || self.auth.jwks_url.is_some()
    }
}

/// The first directive of a `log.level` filter that names no level. A bare word that is not a level
/// parses as a target name at the most verbose level, and matches nothing: a typo such as `verbose`
/// silenced every log line.
fn bad_log_directive(filter: &str) -> Option<&str> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    filter.split(',').map(str::trim).find(|d| {
        let level = d.rsplit_once('=').map_or(*d, |(_, level)| level);
        !LEVELS.contains(&level.to_ascii_lowercase().as_str())
    })
}

/// The flag that sets a key.
fn flag_of(key: &str) -> &'static str {
    match key {
        "server.listen" => "--listen",
        "server.metrics_listen" => "--metrics-listen",
        "broker.kind" => "--broker",
        "broker.url" => "--redis-url",
        "server.echo_path" => "--echo-path",
        "log.format" => "--log-format",
        "tls.cert" => "--tls-cert",
        "tls.key" => "--tls-key",
        _ => "--?",
    }
}

fn path_string(p: &Option<PathBuf>) -> Option<String> {
    p.as_ref().map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests;
