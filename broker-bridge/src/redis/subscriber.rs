//! The subscription side: one dedicated connection that carries every topic this node subscribed
//! to, kept alive by one task.
//!
//! The connection's pushes reach the task through two channels: messages through a bounded one
//! (so a node that cannot keep up holds a bounded backlog, never an unbounded one), everything else
//! (confirmations, disconnect notices, canaries) through its own, so neither waits behind a backlog
//! of messages. A message that does not fit is dropped on the spot and its topic is marked: the task
//! then fills that topic from history ([`super::fill`]), so the drop costs latency, not messages.
//!
//! The task replaces the connection when it breaks, when canaries stop coming back (wedged), or when
//! a subscribe on it failed; after that every topic fills what it missed. A subscription that Redis
//! drops on its own is restored for that topic alone; an `UNSUBSCRIBE` confirmation this node asked
//! for is expected and ignored (a client that unsubscribes and subscribes again at once must not
//! cost the node its connection).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::canary::Canaries;
use super::conn::{Conn, PushFn, broker_error, is_connection_error};
use super::link::lock;
use super::retry::{backoff, log_attempt};
use super::topics::Handled;
use super::wire::Names;
use super::{Inner, fill, wire};
use crate::BrokerError;
use crate::PrefixSet;

/// How often the task checks canaries and readiness.
const TICK: Duration = Duration::from_millis(100);

/// The subscription connection, guarded by `Inner::control`. Its generation (pushes carry the
/// generation of the connection they came from) is in `Inner::generation`.
#[derive(Default)]
pub struct Control {
    conn: Option<Conn>,
}

/// `UNSUBSCRIBE`s sent on the current connection whose confirmation the task has not seen, by
/// channel. A plain lock, not the control lock: the task must not wait for a command in flight.
pub(super) type Unsubscribing = Mutex<HashMap<Vec<u8>, u32>>;

/// A push from the subscription connection, tagged with that connection's generation.
type Tagged = (u64, PushInfo);

/// Messages pushed by Redis that the task has not handled yet, and those dropped for lack of room.
pub(super) struct Backlog {
    /// Bytes of message payloads waiting in the channel.
    bytes: AtomicUsize,
    max_bytes: usize,
    /// Set when `dropped` has entries.
    overflowed: AtomicBool,
    /// Channels that lost a message, and whether one of them was a raw message (which history
    /// never holds).
    dropped: Mutex<HashMap<Vec<u8>, bool>>,
}

impl Backlog {
    pub(super) fn new(max_bytes: usize) -> Self {
        Backlog {
            bytes: AtomicUsize::new(0),
            max_bytes,
            overflowed: AtomicBool::new(false),
            dropped: Mutex::new(HashMap::new()),
        }
    }

    /// Records a message push that did not fit.
    fn drop_push(&self, kind: &PushKind, data: &[Value]) {
        if let Some((channel, payload)) = message_parts_ref(kind, data) {
            let raw = !payload.starts_with(wire::MAGIC);
            *lock(&self.dropped).entry(channel.to_vec()).or_default() |= raw;
        }
        self.overflowed.store(true, Ordering::Release);
    }

    /// Takes the channels that lost messages since the last call.
    fn take_dropped(&self) -> Option<HashMap<Vec<u8>, bool>> {
        // Checked on every message: a plain load in the common case, the swap only after a drop.
        if !self.overflowed.load(Ordering::Relaxed)
            || !self.overflowed.swap(false, Ordering::Acquire)
        {
            return None;
        }
        Some(std::mem::take(&mut *lock(&self.dropped)))
    }
}

/// The sending ends a connection's push callback uses.
#[derive(Clone)]
struct PushRoute {
    messages: mpsc::Sender<Tagged>,
    control: mpsc::UnboundedSender<Tagged>,
    canary_channel: Arc<[u8]>,
    backlog: Arc<Backlog>,
    names: Arc<Names>,
    /// The prefixes whose pattern subscription this connection has confirmed, as of the push being
    /// routed: kept by the route itself, from the confirmations in the connection's own order
    /// (a fresh set per connection).
    active: Arc<PrefixSet>,
}

impl PushRoute {
    /// Routes one push; called on the connection's own task, so it never waits.
    fn route(&self, generation: u64, info: PushInfo) -> Result<(), ()> {
        match info.kind {
            PushKind::PSubscribe | PushKind::PUnsubscribe => self.track_pattern(&info),
            PushKind::Message | PushKind::SMessage | PushKind::PMessage
                if !self.is_source(&info) =>
            {
                return Ok(());
            }
            _ => {}
        }
        let parts = message_parts_ref(&info.kind, &info.data);
        let size = match parts {
            Some((channel, payload)) if channel != &*self.canary_channel => payload.len(),
            // Control pushes and canaries never wait behind messages.
            _ => return self.control.send((generation, info)).map_err(|_| ()),
        };
        let before = self.backlog.bytes.fetch_add(size, Ordering::AcqRel);
        if before + size > self.backlog.max_bytes {
            self.backlog.bytes.fetch_sub(size, Ordering::AcqRel);
            self.backlog.drop_push(&info.kind, &info.data);
            return Ok(());
        }
        match self.messages.try_send((generation, info)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full((_, info))) => {
                self.backlog.bytes.fetch_sub(size, Ordering::AcqRel);
                self.backlog.drop_push(&info.kind, &info.data);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
        }
    }
}

impl PushRoute {
    /// Follows the connection's pattern subscriptions from their confirmations.
    fn track_pattern(&self, info: &PushInfo) {
        let Some(Value::BulkString(pattern)) = info.data.first() else {
            return;
        };
        let Some(prefix) = std::str::from_utf8(pattern)
            .ok()
            .and_then(|p| self.names.prefix_of_pattern(p))
        else {
            return;
        };
        if info.kind == PushKind::PSubscribe {
            self.active.add(prefix);
        } else {
            self.active.remove(prefix);
        }
    }

    /// Whether this copy of a message is the one the node takes. A topic can reach the node
    /// several times: on its own channel (subscribed by name) and once per subscribed prefix that
    /// covers it. A raw message has no offset to drop duplicates by, so exactly one source counts
    /// per topic: the shortest prefix covering it whose pattern subscription is confirmed, else its
    /// own channel. Decided here, in the connection's order, next to the confirmations: a copy
    /// published before a `PSUBSCRIBE` (or `PUNSUBSCRIBE`) took effect is judged by the sources of
    /// that moment, so changing them loses and duplicates nothing. Subscribing topics by name never
    /// changes a topic's source. Messages whose channel is no topic are let through (and refused
    /// later).
    fn is_source(&self, info: &PushInfo) -> bool {
        if self.names.is_cluster() {
            // A cluster's shard channels and watch channels come over different connections, in
            // no common order: every copy goes on, and duplicates are dropped by offset (only
            // gateway messages, which have offsets, are ever published on watch channels).
            return true;
        }
        let pattern = info.kind == PushKind::PMessage;
        let Some((channel, _)) = message_parts_ref(&info.kind, &info.data) else {
            return true;
        };
        let Some(topic) = std::str::from_utf8(channel)
            .ok()
            .and_then(|c| self.names.topic_of(c))
        else {
            return true;
        };
        match self.active.shortest_covering(topic) {
            None => !pattern,
            Some(len) => {
                pattern
                    && matches!(info.data.first(), Some(Value::BulkString(p))
                        if std::str::from_utf8(p).ok().and_then(|p| self.names.prefix_of_pattern(p))
                            == Some(&topic[..len]))
            }
        }
    }
}

impl Inner {
    /// Adds `topic` to the wanted set and subscribes it on the current connection.
    pub(super) async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        let mut control = self.control.lock().await;
        let Some(conn) = control.conn.as_mut() else {
            return Err(BrokerError::Unavailable(
                "no subscription connection to Redis (reconnecting)".into(),
            ));
        };
        self.topics.want(topic);
        let channel = self.names.channel(topic);
        let result =
            tokio::time::timeout(self.config.command_timeout, conn.subscribe(&channel)).await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if !is_connection_error(&e) => {
                // Refused (e.g. an ACL without this channel): the connection itself is fine.
                self.topics.forget(topic);
                return Err(broker_error(e));
            }
            Ok(Err(e)) => broker_error(e),
            Err(_) => {
                BrokerError::Unavailable("Redis did not confirm the subscription in time".into())
            }
        };
        self.topics.forget(topic);
        // The connection is suspect: make the task replace it, and fail fast meanwhile.
        control.conn = None;
        self.health.sub_up.store(false, Ordering::Relaxed);
        self.kick.notify_one();
        Err(error)
    }

    /// Removes `topic` from the wanted set and unsubscribes it.
    pub(super) async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        let mut control = self.control.lock().await;
        self.topics.forget(topic);
        let channel = self.names.channel(topic);
        let Some(conn) = control.conn.as_mut() else {
            // The next connection will not subscribe it.
            return Ok(());
        };
        *lock(&self.unsubscribing)
            .entry(channel.as_bytes().to_vec())
            .or_default() += 1;
        match tokio::time::timeout(self.config.command_timeout, conn.unsubscribe(&channel)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(broker_error(e)),
            Err(_) => Err(BrokerError::Unavailable(
                "Redis did not confirm the unsubscription in time".into(),
            )),
        }
    }

    /// Counts a prefix subscription; the first one pattern-subscribes its channels. True for the
    /// prefix's first. (On a cluster, [`Inner::subscribe_prefix`] then writes its watch.)
    pub(super) async fn psubscribe_prefix(&self, prefix: &str) -> Result<bool, BrokerError> {
        let mut control = self.control.lock().await;
        let Some(conn) = control.conn.as_mut() else {
            return Err(BrokerError::Unavailable(
                "no subscription connection to Redis (reconnecting)".into(),
            ));
        };
        if !self.topics.want_prefix(prefix) {
            return Ok(false);
        }
        let pattern = self.names.prefix_pattern(prefix);
        let result =
            tokio::time::timeout(self.config.command_timeout, conn.psubscribe(&pattern)).await;
        let error = match result {
            Ok(Ok(())) => return Ok(true),
            Ok(Err(e)) if !is_connection_error(&e) => {
                self.topics.forget_prefix(prefix);
                return Err(broker_error(e));
            }
            Ok(Err(e)) => broker_error(e),
            Err(_) => BrokerError::Unavailable(
                "Redis did not confirm the pattern subscription in time".into(),
            ),
        };
        self.topics.forget_prefix(prefix);
        control.conn = None;
        self.health.sub_up.store(false, Ordering::Relaxed);
        self.kick.notify_one();
        Err(error)
    }

    /// Counts a prefix subscription less; the last one pattern-unsubscribes its channels.
    pub(super) async fn unsubscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        let mut control = self.control.lock().await;
        if !self.topics.forget_prefix(prefix) {
            return Ok(());
        }
        self.watches.forget(prefix);
        let Some(conn) = control.conn.as_mut() else {
            return Ok(());
        };
        let pattern = self.names.prefix_pattern(prefix);
        match tokio::time::timeout(self.config.command_timeout, conn.punsubscribe(&pattern)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(broker_error(e)),
            Err(_) => Err(BrokerError::Unavailable(
                "Redis did not confirm the pattern unsubscription in time".into(),
            )),
        }
    }

    /// Whether an unsubscribe confirmation for `channel` is one this node asked for (and so not a
    /// subscription Redis dropped on its own).
    fn expected_unsubscribe(&self, channel: &[u8]) -> bool {
        let mut unsubscribing = lock(&self.unsubscribing);
        match unsubscribing.get_mut(channel) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                unsubscribing.remove(channel);
                true
            }
            None => false,
        }
    }

    /// Redis dropped the subscription of a topic this node still wants (a slot moved, an operator
    /// ran `CLIENT KILL`-like surgery): subscribe it again and fill what it missed, without
    /// touching any other topic.
    async fn restore(self: Arc<Self>, topic: Arc<str>) {
        let start = self.topics.fill_one(&topic, false);
        let channel = self.names.channel(&topic);
        let mut attempt = 0u32;
        loop {
            if self.health.is_closed() || !self.topics.is_wanted(&topic) {
                return;
            }
            let mut control = self.control.lock().await;
            let Some(conn) = control.conn.as_mut() else {
                // A new connection is coming; it subscribes and fills every topic.
                return;
            };
            match tokio::time::timeout(self.config.command_timeout, conn.subscribe(&channel)).await
            {
                Ok(Ok(())) => break,
                Ok(Err(e)) => log_attempt(attempt, "restoring a subscription", &e.to_string()),
                Err(_) => log_attempt(attempt, "restoring a subscription", "timed out"),
            }
            drop(control);
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
        tracing::warn!(%topic, "Redis dropped a subscription; restored it and filling the gap");
        if start {
            fill::fill(self, topic).await;
        }
    }

    /// Opens a new subscription connection and subscribes everything wanted on it, retrying with
    /// backoff until it works or the broker is dropped. Returns false when dropped.
    async fn connect_subscription(&self, route: &PushRoute) -> bool {
        let mut attempt = 0u32;
        loop {
            if self.health.is_closed() {
                return false;
            }
            // Connect without holding the control lock, so subscribes meanwhile fail fast.
            self.control.lock().await.conn = None;
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
            // A new connection confirms its pattern subscriptions anew.
            let push_route = PushRoute {
                active: Arc::default(),
                ..route.clone()
            };
            let push: PushFn = Box::new(move |info| push_route.route(generation, info));
            let name = format!("pubgate-sub-{}", self.node_id);
            let budget = self.timeouts.connect + self.timeouts.response * 3;
            let connected = tokio::time::timeout(
                budget,
                self.target.connect(self.timeouts, Some(push), &name),
            )
            .await;
            match connected {
                Ok(Ok(mut conn)) => {
                    // Subscribing everything and installing the connection happen under the lock:
                    // a concurrent subscribe either is in the snapshot or sees the new connection.
                    let mut control = self.control.lock().await;
                    let mut channels = vec![self.names.canary_channel(&self.node_id)];
                    channels.extend(self.topics.exact().iter().map(|t| self.names.channel(t)));
                    let patterns: Vec<String> = self
                        .topics
                        .prefixes()
                        .iter()
                        .map(|p| self.names.prefix_pattern(p))
                        .collect();
                    let subscribed = tokio::time::timeout(budget, async {
                        conn.subscribe_all(&channels).await?;
                        if !patterns.is_empty() {
                            conn.psubscribe_all(&patterns).await?;
                        }
                        Ok::<(), redis::RedisError>(())
                    })
                    .await;
                    match subscribed {
                        Ok(Ok(())) => {
                            control.conn = Some(conn);
                            lock(&self.unsubscribing).clear();
                            self.generation.store(generation, Ordering::Relaxed);
                            return true;
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "Redis resubscribe failed"),
                        Err(_) => tracing::warn!("Redis resubscribe timed out"),
                    }
                }
                Ok(Err(e)) => log_attempt(attempt, "Redis subscription connection", &e.to_string()),
                Err(_) => log_attempt(attempt, "Redis subscription connection", "timed out"),
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    fn report(&self, was_ready: &mut bool) {
        let ready = self.health.is_ready();
        if ready != *was_ready {
            *was_ready = ready;
            if ready {
                tracing::info!("Redis broker path is up");
            } else {
                tracing::warn!("Redis broker path is down");
            }
            self.observer.state_changed(ready);
        }
    }
}

/// Where a message push's channel is in its data: a pattern message starts with its pattern.
/// `None` for a push that is not a message.
fn channel_index(kind: &PushKind) -> Option<usize> {
    match kind {
        PushKind::Message | PushKind::SMessage => Some(0),
        PushKind::PMessage => Some(1),
        _ => None,
    }
}

/// `(channel, payload)` of a message push, borrowed.
fn message_parts_ref<'a>(kind: &PushKind, data: &'a [Value]) -> Option<(&'a [u8], &'a [u8])> {
    fn bytes(v: &Value) -> Option<&[u8]> {
        match v {
            Value::BulkString(b) => Some(b),
            Value::SimpleString(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
    let i = channel_index(kind)?;
    Some((bytes(data.get(i)?)?, bytes(data.get(i + 1)?)?))
}

/// Extracts `(channel, payload)` from a message push.
fn message_parts(kind: &PushKind, data: Vec<Value>) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut it = data.into_iter().skip(channel_index(kind)?);
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    };
    let channel = bytes(it.next()?)?;
    let payload = bytes(it.next()?)?;
    Some((channel, payload))
}

/// What the subscription task keeps between events.
struct Task {
    inner: Arc<Inner>,
    route: PushRoute,
    canaries: Canaries,
    was_ready: bool,
    connected_at: Instant,
    last_canary_sent: Option<Instant>,
}

impl Task {
    /// Replaces the subscription connection; every topic fills what it may have missed. Returns
    /// false when the broker was dropped.
    async fn reconnect(&mut self, first: bool) -> bool {
        let inner = &self.inner;
        inner.health.sub_up.store(false, Ordering::Relaxed);
        inner.health.reset_canary();
        inner.report(&mut self.was_ready);
        // From here until its fill is done, each topic holds its live messages back.
        let to_fill = if first {
            Vec::new()
        } else {
            inner.topics.fill_all()
        };
        if !inner.connect_subscription(&self.route).await {
            return false;
        }
        self.connected_at = Instant::now();
        inner.health.sub_up.store(true, Ordering::Relaxed);
        self.last_canary_sent = None;
        if !first {
            tracing::info!("Redis subscription connection re-established");
            inner.observer.reconnected();
            fill::spawn(inner, to_fill);
            if inner.names.is_cluster() {
                // Redis may have lost the watches along with the connection (a restart).
                let inner = inner.clone();
                tokio::spawn(async move { inner.rewrite_watches().await });
            }
        }
        true
    }

    /// Handles one message push (not a canary).
    fn on_message(&mut self, mut push: PushInfo) {
        // A pattern message starts with its pattern.
        let pattern = match push.kind {
            PushKind::PMessage if !push.data.is_empty() => match push.data.remove(0) {
                Value::BulkString(b) => Some(b),
                _ => return,
            },
            _ => None,
        };
        push.kind = PushKind::Message;
        let Some((channel, payload)) = message_parts(&push.kind, push.data) else {
            return;
        };
        self.inner
            .backlog
            .bytes
            .fetch_sub(payload.len(), Ordering::AcqRel);
        self.inner.observer.received();
        self.take_dropped();
        if pattern.is_some() && self.inner.names.is_cluster() && !payload.starts_with(wire::MAGIC) {
            // Only the publish script writes to watch channels, always with an offset: a raw
            // message there was made up by someone else.
            self.inner.observer.rejected("header");
            return;
        }
        let Some(topic) = std::str::from_utf8(&channel)
            .ok()
            .and_then(|c| self.inner.names.topic_of(c))
        else {
            let internal = channel
                .strip_prefix(self.inner.names.prefix().as_bytes())
                .is_some_and(|rest| rest.starts_with(b"#") || rest.starts_with(b"{#"));
            if pattern.is_some() && !internal {
                // A raw publisher's channel below a prefix that is no topic name (other nodes'
                // canaries, which a root pattern brings too, are not counted).
                self.inner.observer.rejected("topic");
            }
            return;
        };
        if self.inner.topics.on_wire(topic, Bytes::from(payload)) == Handled::StartFill
            && let Some(name) = self.inner.topics.name(topic)
        {
            fill::spawn(&self.inner, vec![name]);
        }
    }

    /// Starts fills for the topics that lost pushes to a full backlog.
    fn take_dropped(&self) {
        let Some(dropped) = self.inner.backlog.take_dropped() else {
            return;
        };
        let inner = &self.inner;
        inner.observer.backlog_overflow(dropped.len());
        let mut start = Vec::new();
        for (channel, raw) in dropped {
            let Some(topic) = std::str::from_utf8(&channel)
                .ok()
                .and_then(|c| inner.names.topic_of(c))
            else {
                continue;
            };
            if inner.topics.fill_one(topic, raw)
                && let Some(name) = inner.topics.name(topic)
            {
                start.push(name);
            }
        }
        tracing::warn!(
            topics = start.len(),
            "the node fell behind Redis and dropped messages; filling them from history"
        );
        fill::spawn(inner, start);
    }

    /// Handles a control push; returns true when the connection must be replaced.
    fn on_control(&mut self, generation: u64, push: PushInfo) -> bool {
        let inner = &self.inner;
        let current = generation == inner.generation.load(Ordering::Relaxed);
        match push.kind {
            PushKind::Message | PushKind::SMessage | PushKind::PMessage => {
                if let Some((_, payload)) = message_parts(&push.kind, push.data)
                    && let Some(rtt) = self.canaries.arrived(&payload)
                {
                    inner.health.canary_arrived();
                    inner.observer.canary_roundtrip(rtt);
                }
                false
            }
            PushKind::Disconnection if current => {
                tracing::warn!("Redis subscription connection lost; reconnecting");
                true
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe if current => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    return false;
                };
                if inner.expected_unsubscribe(channel) {
                    return false;
                }
                let wanted = std::str::from_utf8(channel)
                    .ok()
                    .and_then(|c| inner.names.topic_of(c))
                    .and_then(|t| inner.topics.name(t));
                if let Some(topic) = wanted {
                    tokio::spawn(inner.clone().restore(topic));
                }
                false
            }
            _ => false,
        }
    }

    /// The periodic work: a canary, the wedge check, readiness and backlog reports.
    fn tick(&mut self) -> bool {
        let inner = &self.inner;
        let now = Instant::now();
        self.take_dropped();
        inner.observer.backlog(
            self.route.messages.max_capacity() - self.route.messages.capacity(),
            inner.backlog.bytes.load(Ordering::Relaxed),
        );
        if self
            .last_canary_sent
            .is_none_or(|at| now.duration_since(at) >= inner.config.canary_interval)
        {
            self.last_canary_sent = Some(now);
            let seq = self.canaries.send();
            let inner2 = inner.clone();
            let channel = self.canaries.channel.clone();
            tokio::spawn(async move {
                let command = if inner2.names.is_cluster() {
                    "SPUBLISH"
                } else {
                    "PUBLISH"
                };
                let sent = inner2
                    .with_cmd(|mut c| async move {
                        c.query::<()>(redis::cmd(command).arg(&channel).arg(seq))
                            .await
                    })
                    .await;
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "canary not sent");
                }
                inner2.ping_reads().await;
            });
        }
        let since = inner
            .health
            .canary_age()
            .unwrap_or_else(|| now.duration_since(self.connected_at));
        let wedged = since > inner.config.canary_timeout
            && now.duration_since(self.connected_at) > inner.config.canary_timeout;
        if wedged {
            tracing::warn!(silent_for = ?since, "no canary came back through Redis; replacing the subscription connection");
        }
        inner.report(&mut self.was_ready);
        wedged
    }
}

/// The subscription task.
pub(super) async fn run(inner: Arc<Inner>) {
    let (msg_tx, mut msg_rx) = mpsc::channel::<Tagged>(inner.config.backlog_messages.max(1));
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel::<Tagged>();
    let canary_channel = inner.names.canary_channel(&inner.node_id);
    let mut task = Task {
        route: PushRoute {
            messages: msg_tx,
            control: ctl_tx,
            canary_channel: canary_channel.as_bytes().into(),
            backlog: inner.backlog.clone(),
            names: inner.names.clone(),
            active: Arc::default(),
        },
        canaries: Canaries::new(canary_channel),
        inner,
        was_ready: false,
        connected_at: Instant::now(),
        last_canary_sent: None,
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnect = true;
    let mut first = true;
    loop {
        if reconnect {
            if !task.reconnect(first).await {
                return;
            }
            first = false;
            reconnect = false;
        }
        tokio::select! {
            biased;
            pushed = ctl_rx.recv() => {
                let Some((generation, push)) = pushed else { return };
                reconnect = task.on_control(generation, push);
            }
            pushed = msg_rx.recv() => {
                let Some((_, push)) = pushed else { return };
                task.on_message(push);
            }
            _ = tick.tick() => {
                reconnect = task.tick();
            }
            _ = task.inner.kick.notified() => {
                reconnect = true;
            }
        }
    }
}
