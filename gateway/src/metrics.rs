//! Every metric of a node, in one place. Names are documented in docs/metrics.md and are stable.

use std::time::Duration;

use broker_bridge::BrokerObserver;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder, exponential_buckets,
};

/// The node's metrics. Cheap to clone handles live inside; share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// The connection limit in force: `server.max_connections` fitted to the open-files limit.
    pub max_connections: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// Upgrades refused because `server.max_connections` was reached.
    pub connections_refused: IntCounter,
    /// Active (connection, topic) subscriptions.
    pub subscriptions: IntGauge,
    /// Topics with at least one local subscriber.
    pub topics: IntGauge,
    /// Messages accepted for publishing, by transport (`http`, `ws`).
    pub published: IntCounterVec,
    /// Message frames queued to subscribers.
    pub delivered: IntCounter,
    /// Message frames not delivered, by reason.
    pub dropped: IntCounterVec,
    /// Connections closed because they did not keep up.
    pub slow_consumer_disconnects: IntCounter,
    /// Failed WebSocket handshakes / HTTP connections, by reason.
    pub handshake_failures: IntCounterVec,
    /// Client frames refused with an error reply, by code.
    pub client_errors: IntCounterVec,
    /// Presented JWTs refused (upgrade, HTTP or refresh), by reason.
    pub token_rejections: IntCounterVec,
    /// Connections closed because their token expired without a refresh.
    pub token_expiries: IntCounter,
    /// Connections closed (1008) for sending past their message rate limit.
    pub rate_limit_disconnects: IntCounter,
    /// Time to fan one message out to all local subscribers' queues.
    pub fanout_seconds: Histogram,
    /// 1 while the broker path works, else 0.
    pub broker_up: IntGauge,
    /// Times the broker's subscription connection was re-established.
    pub broker_reconnects: IntCounter,
    /// Round trip of the canary a node sends itself through the broker.
    pub broker_roundtrip_seconds: Histogram,
    /// Topics that lost messages history could not fill in (their subscribers were told).
    pub broker_gaps: IntCounter,
    /// Messages from the broker that were not delivered, by reason (`forged`, `header`, `data`).
    pub broker_rejected: IntCounterVec,
    /// Messages waiting between the broker and the node's fan-out.
    pub broker_backlog: IntGauge,
    /// Payload bytes waiting between the broker and the node's fan-out.
    pub broker_backlog_bytes: IntGauge,
    /// Topics that lost messages to a full backlog (refilled from history).
    pub broker_backlog_overflows: IntCounter,
    /// 1 while the node accepts traffic, 0 while draining.
    pub ready: IntGauge,
    /// Subscribes with `since`, by result (`recovered`, `not_recovered`).
    pub resumes: IntCounterVec,
    /// Messages replayed from history to resuming subscribers.
    pub replayed: IntCounter,
    /// Gap frames queued to subscribers.
    pub gaps_signalled: IntCounter,
    /// Topics the node holds a broker subscription for, cooling down ones included.
    pub broker_topics: IntGauge,
    /// Wildcard patterns with at least one local subscriber.
    pub wildcards: IntGauge,
    /// Messages that arrived on the broker's subscription connection.
    pub broker_received: IntCounter,
    /// Messages published, by namespace.
    pub ns_published: IntCounterVec,
    /// Messages queued to subscribers, by namespace.
    pub ns_delivered: IntCounterVec,
    /// Messages a conflating queue replaced with a newer one, by namespace.
    pub ns_conflated: IntCounterVec,
    /// Messages from the broker dropped before fan-out (once per message), by reason.
    pub broker_dropped: IntCounterVec,
    /// Message frames compressed for fan-out: at most one per message per node, however many
    /// deflate subscribers it has.
    pub deflate_frames: IntCounter,
    /// Compressed message frames queued to subscribers.
    pub deflate_deliveries: IntCounter,
    /// Bytes the compressed deliveries saved against their plain frames.
    pub deflate_bytes_saved: IntCounter,
}

impl Metrics {
    /// Registers every metric under the `pubgate_` prefix, plus process metrics.
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("pubgate".into()), None).expect("a constant prefix is valid");
        let r = &registry;
        let m = Metrics {
            connections: gauge(r, "connections", "Open WebSocket connections."),
            max_connections: gauge(
                r,
                "max_connections",
                "WebSocket connections the node holds at most (server.max_connections as fitted).",
            ),
            connections_total: counter(r, "connections_total", "WebSocket connections accepted."),
            connections_refused: counter(
                r,
                "connections_refused_total",
                "WebSocket upgrades refused at server.max_connections.",
            ),
            subscriptions: gauge(
                r,
                "subscriptions",
                "Active (connection, topic) subscriptions.",
            ),
            topics: gauge(r, "topics", "Topics with at least one local subscriber."),
            published: counter_vec(
                r,
                "messages_published_total",
                "Messages accepted for publishing.",
                "transport",
            ),
            delivered: counter(
                r,
                "messages_delivered_total",
                "Message frames queued to local subscribers.",
            ),
            dropped: counter_vec(
                r,
                "messages_dropped_total",
                "Message frames not delivered to a subscriber.",
                "reason",
            ),
            slow_consumer_disconnects: counter(
                r,
                "slow_consumer_disconnects_total",
                "Connections closed because their send queue overflowed.",
            ),
            handshake_failures: counter_vec(
                r,
                "handshake_failures_total",
                "Connections that failed before a WebSocket session started.",
                "reason",
            ),
            token_rejections: counter_vec(
                r,
                "token_rejections_total",
                "Presented JWTs refused, by reason (expired, bad_signature, unknown_kid, ...).",
                "reason",
            ),
            token_expiries: counter(
                r,
                "token_expiries_total",
                "Connections closed with 4001 because their token expired without a refresh.",
            ),
            rate_limit_disconnects: counter(
                r,
                "rate_limit_disconnects_total",
                "Connections closed with 1008 for sending past limits.message_rate.",
            ),
            client_errors: counter_vec(
                r,
                "client_errors_total",
                "Client requests answered with an error.",
                "code",
            ),
            fanout_seconds: {
                let opts = HistogramOpts::new(
                    "fanout_seconds",
                    "Time to queue one message to every local subscriber.",
                )
                .buckets(exponential_buckets(1e-6, 2.0, 22).expect("valid buckets"));
                let h = Histogram::with_opts(opts).expect("valid histogram");
                r.register(Box::new(h.clone())).expect("unique name");
                h
            },
            broker_up: gauge(r, "broker_up", "1 while the broker path works."),
            broker_reconnects: counter(
                r,
                "broker_reconnects_total",
                "Times the broker subscription connection was re-established.",
            ),
            broker_roundtrip_seconds: {
                let opts = HistogramOpts::new(
                    "broker_roundtrip_seconds",
                    "Round trip of the node's canary through the broker (publish to delivery).",
                )
                .buckets(exponential_buckets(5e-5, 2.0, 18).expect("valid buckets"));
                let h = Histogram::with_opts(opts).expect("valid histogram");
                r.register(Box::new(h.clone())).expect("unique name");
                h
            },
            broker_gaps: counter(
                r,
                "broker_gaps_total",
                "Topics that lost messages history could not fill in (subscribers were told).",
            ),
            broker_rejected: counter_vec(
                r,
                "broker_rejected_total",
                "Messages from the broker not delivered, by reason (forged, header, data).",
                "reason",
            ),
            broker_backlog: gauge(
                r,
                "broker_backlog",
                "Messages waiting between the broker and the node's fan-out.",
            ),
            broker_backlog_bytes: gauge(
                r,
                "broker_backlog_bytes",
                "Payload bytes waiting between the broker and the node's fan-out.",
            ),
            broker_backlog_overflows: counter(
                r,
                "broker_backlog_overflows_total",
                "Topics that lost messages to a full backlog (refilled from history).",
            ),
            ready: gauge(
                r,
                "ready",
                "1 while the node accepts traffic, 0 while draining.",
            ),
            resumes: {
                let v = counter_vec(
                    r,
                    "resumes_total",
                    "Subscribes with since, by result (recovered, not_recovered).",
                    "result",
                );
                v.with_label_values(&["recovered"]);
                v.with_label_values(&["not_recovered"]);
                v
            },
            replayed: counter(
                r,
                "messages_replayed_total",
                "Messages replayed from history to resuming subscribers.",
            ),
            gaps_signalled: counter(
                r,
                "gaps_signalled_total",
                "Gap frames sent to subscribers (messages they may have missed for good).",
            ),
            broker_topics: gauge(
                r,
                "broker_topics",
                "Topics the node is subscribed to in the broker, including those cooling down.",
            ),
            wildcards: gauge(
                r,
                "wildcards",
                "Wildcard patterns (scores.*, scores.>) with at least one local subscriber.",
            ),
            broker_received: counter(
                r,
                "broker_messages_received_total",
                "Messages taken from the Redis subscription connection (one copy per topic), before any other check.",
            ),
            ns_published: counter_vec(
                r,
                "namespace_messages_published_total",
                "Messages published through this node, by namespace.",
                "namespace",
            ),
            ns_delivered: counter_vec(
                r,
                "namespace_messages_delivered_total",
                "Messages queued to subscribers on this node, by namespace.",
                "namespace",
            ),
            ns_conflated: counter_vec(
                r,
                "namespace_messages_conflated_total",
                "Queued messages a slow subscriber skipped because a newer one of the same topic (and key) replaced them, by namespace.",
                "namespace",
            ),
            broker_dropped: {
                let v = counter_vec(
                    r,
                    "broker_messages_dropped_total",
                    "Messages from the broker dropped before fan-out, once per message.",
                    "reason",
                );
                v.with_label_values(&["too_large"]);
                v.with_label_values(&["too_deep"]);
                v
            },
            deflate_frames: counter(
                r,
                "deflate_frames_total",
                "Message frames compressed for fan-out (at most once per message per node).",
            ),
            deflate_deliveries: counter(
                r,
                "deflate_deliveries_total",
                "Compressed message frames queued to subscribers.",
            ),
            deflate_bytes_saved: counter(
                r,
                "deflate_bytes_saved_total",
                "Bytes compressed deliveries saved against their plain frames.",
            ),
            registry,
        };
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = m.registry.register(Box::new(pc));
        }
        m
    }

    /// Registers the TLS metrics. Called once, only when TLS is on, so a plaintext node does not
    /// export a certificate expiry of zero that alert rules would fire on.
    pub fn register_tls(&self) -> TlsMetrics {
        let r = &self.registry;
        let reloads = counter_vec(
            r,
            "tls_reloads_total",
            "Certificate reloads after start, by result (ok, error).",
            "result",
        );
        // Both series exist from the start, so `increase()` sees the first error too.
        reloads.with_label_values(&["ok"]);
        reloads.with_label_values(&["error"]);
        TlsMetrics {
            cert_expiry: gauge(
                r,
                "tls_cert_expiry_timestamp_seconds",
                "notAfter of the certificate in service, as a Unix timestamp.",
            ),
            reloads,
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on a malformed metric family, which registration prevents.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// The broker reports its connection events straight into the metrics.
impl BrokerObserver for Metrics {
    fn state_changed(&self, up: bool) {
        self.broker_up.set(up as i64);
    }

    fn reconnected(&self) {
        self.broker_reconnects.inc();
    }

    fn canary_roundtrip(&self, rtt: Duration) {
        self.broker_roundtrip_seconds.observe(rtt.as_secs_f64());
    }

    fn gap(&self, topics: usize) {
        self.broker_gaps.inc_by(topics as u64);
    }

    fn rejected(&self, reason: &'static str) {
        self.broker_rejected.with_label_values(&[reason]).inc();
    }

    fn received(&self) {
        self.broker_received.inc();
    }

    fn backlog(&self, messages: usize, bytes: usize) {
        self.broker_backlog.set(messages as i64);
        self.broker_backlog_bytes.set(bytes as i64);
    }

    fn backlog_overflow(&self, topics: usize) {
        self.broker_backlog_overflows.inc_by(topics as u64);
    }
}

/// Metrics of the TLS terminator; see [`Metrics::register_tls`].
#[derive(Clone)]
pub struct TlsMetrics {
    /// notAfter of the certificate new handshakes get, in seconds since the Unix epoch.
    pub cert_expiry: IntGauge,
    /// Reload attempts after start, by result (`ok`, `error`).
    pub reloads: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique name");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique name");
    c
}

fn counter_vec(r: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique name");
    c
}
