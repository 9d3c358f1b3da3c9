//! The subscription side: one dedicated connection that carries every topic this node subscribed
//! to, kept alive by one task.
//!
//! The task reads the connection's pushes and hands messages to the sink in order, sends a canary
//! to itself every `canary_interval`, and replaces the connection whenever it breaks (a disconnect
//! push), stops carrying canaries for `canary_timeout` (wedged), or a subscribe on it failed. After
//! a replacement every wanted topic is subscribed again and history fills the messages published in
//! between; what history cannot fill is reported as a gap.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::conn::{Conn, PushFn, broker_error, is_connection_error};
use super::link::{backoff, lock, log_attempt};
use super::{Inner, wire};
use crate::{BrokerError, HistoryRead, Message, Position};

/// How many messages a gap fill asks history for, per topic.
const MAX_FILL: usize = 10_000;
/// How often the task checks canaries and readiness.
const TICK: Duration = Duration::from_millis(100);

/// The subscription connection, guarded by `Inner::control`. Its generation (pushes carry the
/// generation of the connection they came from) is in `Inner::generation`.
#[derive(Default)]
pub struct Control {
    conn: Option<Conn>,
}

/// What the node knows about one wanted topic.
#[derive(Default)]
pub struct Track {
    /// The last gateway message delivered.
    last: Option<Position>,
    /// The topic's position as last read (subscribe ack), the fill start when nothing was delivered.
    hint: Option<Position>,
}

/// A push from the subscription connection, tagged with that connection's generation.
type Tagged = (u64, PushInfo);

impl Inner {
    /// Adds `topic` to the wanted set and subscribes it on the current connection.
    pub(super) async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        let mut control = self.control.lock().await;
        let Some(conn) = control.conn.as_mut() else {
            return Err(BrokerError::Unavailable(
                "no subscription connection to Redis (reconnecting)".into(),
            ));
        };
        lock(&self.topics).entry(topic.into()).or_default();
        let channel = self.names.channel(topic);
        let result =
            tokio::time::timeout(self.config.command_timeout, conn.subscribe(&channel)).await;
        let error = match result {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if !is_connection_error(&e) => {
                // Refused (e.g. an ACL without this channel): the connection itself is fine.
                lock(&self.topics).remove(topic);
                return Err(broker_error(e));
            }
            Ok(Err(e)) => broker_error(e),
            Err(_) => {
                BrokerError::Unavailable("Redis did not confirm the subscription in time".into())
            }
        };
        lock(&self.topics).remove(topic);
        // The connection is suspect: make the task replace it, and fail fast meanwhile.
        control.conn = None;
        self.health.sub_up.store(false, Ordering::Relaxed);
        self.kick.notify_one();
        Err(error)
    }

    /// Removes `topic` from the wanted set and unsubscribes it.
    pub(super) async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        let mut control = self.control.lock().await;
        lock(&self.topics).remove(topic);
        let Some(conn) = control.conn.as_mut() else {
            // The next connection will not subscribe it.
            return Ok(());
        };
        let channel = self.names.channel(topic);
        match tokio::time::timeout(self.config.command_timeout, conn.unsubscribe(&channel)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(broker_error(e)),
            Err(_) => Err(BrokerError::Unavailable(
                "Redis did not confirm the unsubscription in time".into(),
            )),
        }
    }

    /// Remembers a freshly read position of a wanted topic, as the start of a gap fill.
    ///
    /// The first position read after subscribing is kept (a later one only replaces it in a new
    /// epoch): a later read may come after messages that never arrived because the subscription
    /// connection broke unnoticed, and filling from there would skip them. Filling from the
    /// earlier position is always safe: what was already delivered is dropped as a duplicate
    /// (`Track::last`) and the registry's cursors skip what a subscriber's ack already covers.
    pub(super) fn hint(&self, topic: &str, position: &Position) {
        if let Some(track) = lock(&self.topics).get_mut(topic)
            && track
                .hint
                .as_ref()
                .is_none_or(|h| h.epoch != position.epoch)
        {
            track.hint = Some(position.clone());
        }
    }

    /// Hands one message push to the sink, dropping duplicates of what was already delivered.
    fn on_message(&self, channel: &[u8], payload: Bytes, canaries: &mut Canaries) {
        let Ok(channel) = std::str::from_utf8(channel) else {
            return;
        };
        if channel == canaries.channel {
            if let Some(rtt) = canaries.arrived(&payload) {
                self.health.canary_arrived();
                self.observer.canary_roundtrip(rtt);
            }
            return;
        }
        let Some(topic) = self.names.topic_of(channel) else {
            return;
        };
        let decoded = wire::decode(payload);
        self.deliver(topic, decoded.position, decoded.data);
    }

    /// Delivers one message of a wanted topic, unless it repeats what was already delivered.
    fn deliver(&self, topic: &str, position: Option<Position>, data: Bytes) {
        let name = {
            let mut topics = lock(&self.topics);
            let Some((name, _)) = topics.get_key_value(topic) else {
                return;
            };
            let name = name.clone();
            if let (Some(p), Some(track)) = (&position, topics.get_mut(topic)) {
                if track
                    .last
                    .as_ref()
                    .is_some_and(|l| l.epoch == p.epoch && p.offset <= l.offset)
                {
                    return;
                }
                track.last = Some(p.clone());
            }
            name
        };
        self.sink.deliver(Message {
            topic: name,
            position,
            data,
        });
    }

    /// Opens a new subscription connection and subscribes everything wanted on it, retrying with
    /// backoff until it works or the broker is dropped. Returns false when dropped.
    async fn connect_subscription(&self, tx: &mpsc::UnboundedSender<Tagged>) -> bool {
        let mut attempt = 0u32;
        loop {
            if self.health.is_closed() {
                return false;
            }
            // Connect without holding the control lock, so subscribes meanwhile fail fast.
            self.control.lock().await.conn = None;
            let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
            let push_tx = tx.clone();
            let push: PushFn =
                Box::new(move |info| push_tx.send((generation, info)).map_err(|_| ()));
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
                    channels.extend(lock(&self.topics).keys().map(|t| self.names.channel(t)));
                    let subscribed =
                        tokio::time::timeout(budget, conn.subscribe_all(&channels)).await;
                    match subscribed {
                        Ok(Ok(())) => {
                            control.conn = Some(conn);
                            self.generation.store(generation, Ordering::Relaxed);
                            return true;
                        }
                        Ok(Err(e)) => tracing::warn!(error = %e, "Redis resubscribe failed"),
                        Err(_) => tracing::warn!("Redis resubscribe timed out"),
                    }
                }
                Ok(Err(e)) => log_attempt(attempt, "subscription", &e.to_string()),
                Err(_) => log_attempt(attempt, "subscription", "timed out"),
            }
            tokio::time::sleep(backoff(attempt)).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// After a reconnect: asks history for everything published after what each topic last saw, and
    /// delivers what was missed. Topics whose gap history cannot cover are reported to the observer.
    async fn fill_gaps(&self) {
        let wanted: Vec<(Arc<str>, Position)> = lock(&self.topics)
            .iter()
            .filter_map(|(t, tr)| Some((t.clone(), tr.last.clone().or_else(|| tr.hint.clone())?)))
            .collect();
        if wanted.is_empty() {
            return;
        }
        let mut gaps = 0usize;
        let mut fills =
            futures_util::stream::iter(wanted.into_iter().map(|(topic, from)| async move {
                let read = HistoryRead {
                    epoch: Some(from.epoch.as_str()),
                    since: Some(from.offset),
                    limit: MAX_FILL,
                    whole: true,
                };
                let r = self.history(&topic, read).await;
                (topic, from, r)
            }))
            .buffer_unordered(16);
        while let Some((topic, from, result)) = fills.next().await {
            match result {
                Ok(replay) if replay.complete => {
                    for m in replay.messages {
                        self.deliver(&topic, m.position, m.data);
                    }
                }
                Ok(replay) => {
                    if replay.position != from {
                        gaps += 1;
                        tracing::warn!(%topic, from = from.offset, now = replay.position.offset, "messages may have been lost during the reconnect");
                    }
                }
                Err(e) => {
                    gaps += 1;
                    tracing::warn!(%topic, error = %e, "could not fill the reconnect gap");
                }
            }
        }
        if gaps > 0 {
            self.observer.gap(gaps);
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

/// Canaries in flight: what was sent when, to measure the round trip.
struct Canaries {
    channel: String,
    next: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl Canaries {
    fn new(channel: String) -> Self {
        Canaries {
            channel,
            next: 1,
            sent: VecDeque::new(),
        }
    }

    fn send(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.sent.push_back((seq, Instant::now()));
        while self.sent.len() > 32 {
            self.sent.pop_front();
        }
        seq
    }

    fn arrived(&mut self, payload: &[u8]) -> Option<Duration> {
        let seq: u64 = std::str::from_utf8(payload).ok()?.parse().ok()?;
        let i = self.sent.iter().position(|(s, _)| *s == seq)?;
        let (_, at) = self.sent.remove(i)?;
        Some(at.elapsed())
    }
}

/// Extracts `(channel, payload)` from a message push.
fn message_parts(data: Vec<Value>) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut it = data.into_iter();
    let bytes = |v: Value| match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    };
    let channel = bytes(it.next()?)?;
    let payload = bytes(it.next()?)?;
    Some((channel, payload))
}

fn first_channel(data: &[Value]) -> Option<&[u8]> {
    match data.first()? {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The subscription task.
pub(super) async fn run(inner: Arc<Inner>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Tagged>();
    let canary_channel = inner.names.canary_channel(&inner.node_id);
    let mut canaries = Canaries::new(canary_channel.clone());
    let mut was_ready = false;
    let mut first = true;
    let mut reconnect = true;
    let mut connected_at = Instant::now();
    let mut last_canary_sent: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if reconnect {
            inner.health.sub_up.store(false, Ordering::Relaxed);
            inner.health.reset_canary();
            inner.report(&mut was_ready);
            if !inner.connect_subscription(&tx).await {
                return;
            }
            reconnect = false;
            connected_at = Instant::now();
            inner.health.sub_up.store(true, Ordering::Relaxed);
            last_canary_sent = None;
            if first {
                first = false;
            } else {
                tracing::info!("Redis subscription connection re-established");
                inner.observer.reconnected();
                inner.fill_gaps().await;
            }
        }
        tokio::select! {
            pushed = rx.recv() => {
                let Some((generation, push)) = pushed else { return };
                let current = generation == inner.generation.load(Ordering::Relaxed);
                match push.kind {
                    PushKind::Message | PushKind::SMessage => {
                        if let Some((channel, payload)) = message_parts(push.data) {
                            inner.on_message(&channel, Bytes::from(payload), &mut canaries);
                        }
                    }
                    PushKind::Disconnection if current => {
                        tracing::warn!("Redis subscription connection lost; reconnecting");
                        reconnect = true;
                    }
                    PushKind::Unsubscribe | PushKind::SUnsubscribe if current => {
                        // The server dropped a subscription we still want (e.g. a slot moved).
                        let wanted = first_channel(&push.data)
                            .and_then(|c| std::str::from_utf8(c).ok())
                            .and_then(|c| inner.names.topic_of(c))
                            .is_some_and(|t| lock(&inner.topics).contains_key(t));
                        if wanted {
                            tracing::warn!("Redis dropped a wanted subscription; resubscribing everything");
                            reconnect = true;
                        }
                    }
                    _ => {}
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if last_canary_sent.is_none_or(|at| now.duration_since(at) >= inner.config.canary_interval) {
                    last_canary_sent = Some(now);
                    let seq = canaries.send();
                    let inner2 = inner.clone();
                    let channel = canary_channel.clone();
                    tokio::spawn(async move {
                        let command = if inner2.names.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
                        let sent = inner2
                            .with_cmd(|mut c| async move {
                                c.query::<()>(redis::cmd(command).arg(&channel).arg(seq)).await
                            })
                            .await;
                        if let Err(e) = sent {
                            tracing::debug!(error = %e, "canary not sent");
                        }
                    });
                }
                let since = inner.health.canary_age().unwrap_or_else(|| now.duration_since(connected_at));
                if since > inner.config.canary_timeout && now.duration_since(connected_at) > inner.config.canary_timeout {
                    tracing::warn!(silent_for = ?since, "no canary came back through Redis; replacing the subscription connection");
                    reconnect = true;
                }
                inner.report(&mut was_ready);
            }
            _ = inner.kick.notified() => {
                reconnect = true;
            }
        }
    }
}
