//! One WebSocket connection: a reader task that handles client frames, and the writer
//! ([`crate::writer`]) that sends everything queued for the client.
//!
//! Data flows one way: the reader turns client requests into node calls (subscribe, publish) and
//! queues replies; fan-out queues messages; the writer drains the queue. The reader runs in a task
//! of its own because frame reads are not cancel-safe.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::auth::Identity;
use crate::deflate::{Agreement, Outbound};
use crate::frame::{self, OpCode};
use crate::node::{Admission, Node};
use crate::protocol::{self, ErrorCode, ProtocolError, Request};
use crate::registry::{ConnId, Subscription};
use crate::send_queue::{CloseReason, DirectWrite, SendQueue};
use crate::topic::{Pattern, Target};
use crate::writer::{self, Heartbeat, LastHeard, WriterEnd};
use crate::ws_read::{Incoming, ReadError, WsReader};

/// Largest message on the echo route, so conformance suites can send their 16 MiB cases.
const ECHO_MAX_MESSAGE: usize = 32 << 20;

/// Send queue bytes on the echo route: one echo of the largest message (plus its frame header) must
/// fit, or the slow-consumer policy would close the connection on every message over
/// `limits.send_queue_bytes` (Autobahn 9.1.4-9.4.9 failed that way with the 4 MiB default).
const ECHO_QUEUE_BYTES: usize = ECHO_MAX_MESSAGE + 64;

/// How long the reader may take to see the client's close reply after the writer finished.
const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// The close code of a connection whose token expired without a refresh: the client should get a
/// new token before it reconnects, not retry with the old one.
pub const TOKEN_EXPIRED: CloseReason = CloseReason {
    code: 4001,
    reason: "token expired",
    discard_queued: false,
};

/// The close of a connection that kept sending past its message rate limit.
const RATE_LIMITED: CloseReason = CloseReason {
    code: 1008,
    reason: "rate limit exceeded",
    discard_queued: false,
};

/// What the connection is for.
#[derive(Clone, Debug)]
pub enum Route {
    /// The pub/sub protocol, for a client with this identity.
    PubSub(Identity),
    /// The diagnostic echo route: every message comes back unchanged.
    Echo,
}

/// Runs a connection to its end. `admission` holds the connection slot until then. `direct`, when
/// given, is a handle to the same socket as `write` that fan-out may write through while the writer
/// is idle. `deflate` is what permessage-deflate negotiation agreed, if it did.
pub async fn run<R, W>(
    node: Arc<Node>,
    admission: Admission,
    read: R,
    write: W,
    direct: Option<Arc<dyn DirectWrite>>,
    route: Route,
    deflate: Option<Agreement>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = admission.id;
    // Compressed frames go out only with the full window they are built with (see Agreement).
    let takes_deflate = deflate.is_some_and(|a| a.takes_full_window());
    let queue = match route {
        Route::Echo => {
            let l = &node.settings.limits;
            Arc::new(
                SendQueue::with_direct(
                    l.send_queue_frames,
                    l.send_queue_bytes.max(ECHO_QUEUE_BYTES),
                    l.slow_consumer,
                    direct,
                )
                .with_deflate(takes_deflate),
            )
        }
        Route::PubSub(_) => node.new_queue(direct, takes_deflate),
    };
    let heard = Arc::new(LastHeard::new());
    // The token's expiry, moved by refreshes; a task of its own closes the connection when it
    // passes, because the reader sits in a frame read that cannot be cancelled.
    // Only where tokens exist: an open node's idle connections pay for neither the task nor the
    // channel (a few hundred bytes each).
    let (expiry, expirer) = match node.access.jwt() {
        Some(j) => {
            let (expiry, expiry_rx) = watch::channel(match &route {
                Route::PubSub(Identity::Token(g)) => Some(g.exp),
                _ => None,
            });
            let task = tokio::spawn(expire(expiry_rx, queue.clone(), j.leeway(), node.clone()));
            (Some(expiry), Some(task))
        }
        None => (None, None),
    };
    let max_message = match route {
        Route::Echo => ECHO_MAX_MESSAGE,
        Route::PubSub(_) => node.settings.limits.max_message_size,
    };
    let reader = Reader {
        ws: WsReader::new(read, max_message).with_inflate(deflate.is_some()),
        queue: queue.clone(),
        heard: heard.clone(),
        subs: Subscriptions {
            node: node.clone(),
            conn,
            list: Vec::new(),
        },
        churn: TokenBucket::new(
            node.settings.limits.subscribe_rate,
            node.settings.limits.subscribe_burst,
        ),
        messages: TokenBucket::new(
            node.settings.limits.message_rate,
            node.settings.limits.message_burst,
        ),
        refusals: TokenBucket::new(
            (node.settings.limits.message_rate / 10).max(1),
            node.settings.limits.message_burst,
        ),
        route,
        expiry,
    };
    let mut reader = tokio::spawn(reader.run());
    let heartbeat = Heartbeat {
        ping_interval: node.settings.server.ping_interval,
        idle_timeout: node.settings.server.idle_timeout,
    };
    let end = writer::run(write, queue.clone(), heard, heartbeat, node.drain.clone()).await;
    if let Some(expirer) = expirer {
        expirer.abort();
    }
    // Fan-out may still hold the queue until the unsubscribes run: stop it writing, and let the
    // socket close now.
    queue.detach();
    match &end {
        WriterEnd::Closed(reason) => {
            tracing::debug!(
                conn,
                code = reason.code,
                reason = reason.reason,
                "connection closed"
            )
        }
        WriterEnd::Failed(e) => tracing::debug!(conn, error = %e, "connection failed"),
    }
    if tokio::time::timeout(CLOSE_LINGER, &mut reader)
        .await
        .is_err()
    {
        reader.abort();
    }
    drop(admission);
}

/// Closes the connection with [`TOKEN_EXPIRED`] once the current expiry (plus the configured
/// leeway, as at the upgrade) has passed. Ends when the reader drops the sender.
async fn expire(
    mut expiry: watch::Receiver<Option<u64>>,
    queue: Arc<SendQueue>,
    leeway: Duration,
    node: Arc<Node>,
) {
    loop {
        let Some(exp) = *expiry.borrow_and_update() else {
            if expiry.changed().await.is_err() {
                return;
            }
            continue;
        };
        // An `exp` too far out to add to the clock (a signed token may say 2^64 - 1) never comes:
        // wait for the next refresh instead of overflowing (which killed this task, and with it
        // every later expiry of the connection).
        let Some(deadline) = UNIX_EPOCH
            .checked_add(Duration::from_secs(exp))
            .and_then(|t| t.checked_add(leeway))
        else {
            if expiry.changed().await.is_err() {
                return;
            }
            continue;
        };
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(left) => {
                node.metrics.token_expiries.inc();
                queue.close(TOKEN_EXPIRED);
                return;
            }
            changed = expiry.changed() => if changed.is_err() { return },
        }
    }
}

/// Unsent bytes the kernel may hold for a connection that subscribes to a conflating namespace.
const CONFLATION_UNSENT: u32 = 32 << 10;

/// The subscriptions of a connection, each a guard ([`Subscription`]) recorded before the first
/// await of its subscribe. Dropping them (when the reader ends, or its task is aborted in the middle
/// of a subscribe or a replay) releases every one.
struct Subscriptions {
    node: Arc<Node>,
    conn: ConnId,
    list: Vec<Subscription>,
}

impl Subscriptions {
    fn position(&self, topic: &str) -> Option<usize> {
        self.list.iter().position(|s| &**s.topic() == topic)
    }
}

/// Bounds how fast one connection subscribes and unsubscribes: `rate` per second on average, up to
/// `burst` at once. Each costs the node a registry change and possibly broker commands; a client
/// churning thousands per second must not turn into broker traffic for everyone.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u32, burst: u32) -> Self {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes one token if there is one.
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl<R> Reader<R> {
    /// What a wildcard subscription must pass besides the permissions: namespaces that refuse
    /// wildcards, the connection's `limits.max_wildcards` and the node's
    /// `limits.max_wildcard_patterns` (each pattern costs Redis on every publish).
    fn check_wildcard(&self, topic: &str, pattern: &Pattern) -> Result<(), ProtocolError> {
        let node = &self.subs.node;
        if let Some(ns) = node.namespaces.refusing_wildcard(pattern) {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                format!(
                    "{topic} reaches into namespace {}, which takes no wildcard subscriptions: subscribe to its topics by name",
                    ns.name
                ),
            ));
        }
        let limits = &node.settings.limits;
        let held = self.subs.list.iter().filter(|s| s.is_wildcard()).count();
        if held >= limits.max_wildcards {
            return Err(ProtocolError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "at most {} wildcard subscriptions per connection",
                    limits.max_wildcards
                ),
            ));
        }
        if !node
            .registry
            .has_room_for_pattern(topic, limits.max_wildcard_patterns)
        {
            return Err(ProtocolError::new(
                ErrorCode::TooManySubscriptions,
                format!(
                    "this node serves {} wildcard patterns already (limits.max_wildcard_patterns): use a pattern others use, or subscribe by name",
                    limits.max_wildcard_patterns
                ),
            ));
        }
        Ok(())
    }
}

struct Reader<R> {
    ws: WsReader<R>,
    queue: Arc<SendQueue>,
    heard: Arc<LastHeard>,
    subs: Subscriptions,
    churn: TokenBucket,
    /// Bounds the messages of the connection (`limits.message_rate`): each costs a parse and
    /// possibly a publish, and one client must not take the node's time from the others.
    messages: TokenBucket,
    /// Bounds the messages refused by `messages`: a client that keeps sending past its limit is
    /// closed rather than answered with errors forever.
    refusals: TokenBucket,
    route: Route,
    /// The expiry of the connection's token, for [`expire`]; `None` on a node without JWT, where
    /// no token (and no refresh) exists.
    expiry: Option<watch::Sender<Option<u64>>>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    async fn run(mut self) {
        loop {
            // Replies to this client's requests wait for room in its queue rather than overflow
            // it: a client that pipelines requests (pings, publishes…) faster than the writer
            // sends the replies would otherwise be closed as a slow consumer while it reads all
            // it can. Waiting leaves its requests unread, so TCP slows it down; one that never
            // reads is dropped by the writer's stall limit.
            self.queue.room().await;
            let incoming = self.ws.next().await;
            self.heard.touch();
            if matches!(self.route, Route::PubSub(_))
                && matches!(incoming, Ok(Incoming::Text(_) | Incoming::Binary(_)))
                && !self.messages.take()
            {
                if self.refusals.take() {
                    let l = &self.subs.node.settings.limits;
                    let message = format!(
                        "at most {} messages per second (bursts of {}); this one was not read",
                        l.message_rate, l.message_burst
                    );
                    self.reply_error(None, ProtocolError::new(ErrorCode::RateLimited, message));
                    continue;
                }
                self.subs.node.metrics.rate_limit_disconnects.inc();
                self.queue.close(RATE_LIMITED);
                // Keep reading (and dropping) what the flood already sent: closing a socket with
                // unread data resets it, and the client would lose the close frame and its code.
                // The session aborts this after its close linger.
                loop {
                    match self.ws.next().await {
                        Ok(Incoming::Close(_)) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
            }
            match incoming {
                Ok(Incoming::Text(data)) => match self.route {
                    Route::Echo => self.echo(OpCode::Text, &data),
                    Route::PubSub(_) => {
                        // WsReader has validated UTF-8 already.
                        let text = std::str::from_utf8(&data).unwrap_or_default();
                        // Boxed: requests are rare next to idle time, and keeping their state out of
                        // the reader's future keeps every idle connection smaller.
                        Box::pin(self.handle(text)).await;
                    }
                },
                Ok(Incoming::Binary(data)) => match self.route {
                    Route::Echo => self.echo(OpCode::Binary, &data),
                    Route::PubSub(_) => self.reply_error(
                        None,
                        ProtocolError::new(
                            ErrorCode::BadRequest,
                            "binary frames are not supported; send JSON text frames",
                        ),
                    ),
                },
                Ok(Incoming::Ping(payload)) => {
                    self.queue.push(frame::frame(OpCode::Pong, &payload));
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close(code)) => {
                    self.queue.close(CloseReason {
                        code,
                        reason: "",
                        discard_queued: true,
                    });
                    return;
                }
                Err(ReadError::Violation(code, reason)) => {
                    tracing::debug!(conn = self.subs.conn, code, reason, "protocol violation");
                    self.queue.close(CloseReason {
                        code,
                        reason,
                        discard_queued: false,
                    });
                    return;
                }
                Err(ReadError::Gone) => {
                    self.queue.close(CloseReason::PEER_GONE);
                    return;
                }
            }
            if self.queue.is_closing() {
                return;
            }
        }
    }

    fn reply(&self, frame: Bytes) {
        self.queue.push(frame);
    }

    /// Echoes a message (echo route), compressed when the connection negotiated deflate.
    fn echo(&self, opcode: OpCode, data: &[u8]) {
        let out = self.subs.node.settings.compression.outbound();
        let deflate = self.queue.takes_deflate();
        self.queue
            .push(Outbound::frame(out.as_ref(), deflate, opcode, data));
    }

    fn reply_error(&self, id: Option<&serde_json::value::RawValue>, err: ProtocolError) {
        self.subs
            .node
            .metrics
            .client_errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        self.reply(protocol::error(id, &err));
    }

    async fn handle(&mut self, text: &str) {
        let parsed = protocol::parse(text);
        let id = parsed.id;
        // A cheap clone (an Arc at most): a refresh may replace the identity while it is used.
        let who = match &self.route {
            Route::PubSub(who) => who.clone(),
            Route::Echo => return,
        };
        let result = match parsed.request {
            Err(e) => Err(e),
            Ok(request) => self.execute(&who, id, request).await,
        };
        if let Err(e) = result {
            self.reply_error(id, e);
        }
    }

    async fn execute(
        &mut self,
        who: &Identity,
        id: Option<&serde_json::value::RawValue>,
        request: Request<'_>,
    ) -> Result<(), ProtocolError> {
        let node = self.subs.node.clone();
        // A refresh verifies a signature (tens of µs for RS256/ES256): it shares the subscribe
        // budget, so no client can spend a core on refreshes while inside the message rate.
        if matches!(request, Request::Refresh { .. }) && !self.churn.take() {
            let l = &node.settings.limits;
            return Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!(
                    "at most {} refreshes, subscribes and unsubscribes per second (bursts of {})",
                    l.subscribe_rate, l.subscribe_burst
                ),
            ));
        }
        if matches!(
            request,
            Request::Subscribe { .. } | Request::Unsubscribe { .. }
        ) && !self.churn.take()
        {
            let l = &node.settings.limits;
            return Err(ProtocolError::new(
                ErrorCode::RateLimited,
                format!(
                    "at most {} subscribes and unsubscribes per second (bursts of {})",
                    l.subscribe_rate, l.subscribe_burst
                ),
            ));
        }
        match request {
            Request::Subscribe {
                topic,
                since,
                wild_since,
            } => {
                if !node.access.may_subscribe(who, &topic) {
                    return Err(ProtocolError::new(
                        ErrorCode::Forbidden,
                        format!("not allowed to subscribe to {topic}"),
                    ));
                }
                if let Ok(Target::Wildcard(pattern)) = crate::topic::parse_target(&topic) {
                    self.check_wildcard(&topic, &pattern)?;
                }
                if self.subs.position(&topic).is_some() {
                    return Err(ProtocolError::new(
                        ErrorCode::AlreadySubscribed,
                        format!("already subscribed to {topic}"),
                    ));
                }
                let max = node.settings.limits.max_subscriptions;
                if self.subs.list.len() >= max {
                    return Err(ProtocolError::new(
                        ErrorCode::TooManySubscriptions,
                        format!("at most {max} subscriptions per connection"),
                    ));
                }
                if node.namespaces.reaches_conflation(&topic) {
                    // What the reader has not taken must wait here, where conflation replaces it,
                    // not in a kernel buffer of megabytes that delivers stale values for seconds.
                    self.queue.limit_unsent(CONFLATION_UNSENT);
                }
                // Recorded before anything is awaited: if this task is aborted from here on, the
                // guard goes with `self.subs`.
                let i = self.subs.list.len();
                self.subs
                    .list
                    .push(node.join(self.subs.conn, &self.queue, &topic));
                let started = node.start(&self.subs.list[i], id, since, wild_since).await;
                if started.is_err() {
                    self.subs.list.swap_remove(i);
                }
                started
            }
            Request::Unsubscribe { topic } => {
                let Some(i) = self.subs.position(&topic) else {
                    return Err(ProtocolError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {topic}"),
                    ));
                };
                // Leaves the topic now: nothing of it is queued after the ack.
                drop(self.subs.list.swap_remove(i));
                self.reply(protocol::unsubscribe_ack(id, &topic));
                Ok(())
            }
            Request::Publish { topic, data } => {
                if !node.access.may_publish(who, &topic) {
                    return Err(ProtocolError::new(
                        ErrorCode::Forbidden,
                        format!("not allowed to publish to {topic}"),
                    ));
                }
                node.check_namespace(who, &topic, data.get().len())?;
                crate::json_depth::check(
                    data.get().as_bytes(),
                    node.settings.limits.max_json_depth,
                )?;
                let data = Bytes::copy_from_slice(data.get().as_bytes());
                let pos = node.publish(&topic, data, "ws").await?;
                self.reply(protocol::ack(id, &topic, &pos, None));
                Ok(())
            }
            Request::Ping => {
                self.reply(protocol::pong(id));
                Ok(())
            }
            Request::Refresh { token } => self.refresh(who, id, &token).await,
        }
    }

    /// Replaces the connection's token. Subscriptions the new token does not allow end first, each
    /// with an `unsubscribed` frame, then the `ack` carries the new expiry. A token that does not
    /// verify, or names another `sub`, changes nothing.
    async fn refresh(
        &mut self,
        who: &Identity,
        id: Option<&serde_json::value::RawValue>,
        token: &str,
    ) -> Result<(), ProtocolError> {
        let node = self.subs.node.clone();
        let new = node
            .access
            .with_fresh_keys(|| node.access.verify_token(token))
            .await
            .map_err(|d| {
                if let Some(e) = &d.token {
                    node.metrics
                        .token_rejections
                        .with_label_values(&[e.label()])
                        .inc();
                }
                ProtocolError::new(ErrorCode::InvalidToken, d.message)
            })?;
        let Identity::Token(grant) = &new else {
            return Err(ProtocolError::new(
                ErrorCode::Internal,
                "token without grant",
            ));
        };
        if let Identity::Token(old) = who
            && old.sub != grant.sub
        {
            return Err(ProtocolError::new(
                ErrorCode::Forbidden,
                "a refreshed token must have the same sub",
            ));
        }
        let mut i = 0;
        while i < self.subs.list.len() {
            if node.access.may_subscribe(&new, self.subs.list[i].topic()) {
                i += 1;
                continue;
            }
            let sub = self.subs.list.swap_remove(i);
            let topic = sub.topic().clone();
            // Left before the frame is queued: nothing of the topic follows it.
            drop(sub);
            self.reply(protocol::unsubscribed(&topic, "forbidden"));
        }
        if let Some(expiry) = &self.expiry {
            expiry.send_replace(Some(grant.exp));
        }
        self.reply(protocol::refresh_ack(id, grant.exp));
        self.route = Route::PubSub(new);
        Ok(())
    }
}
