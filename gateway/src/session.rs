//! One WebSocket connection: a reader task that handles client frames, and the writer
//! ([`crate::writer`]) that sends everything queued for the client.
//!
//! Data flows one way: the reader turns client requests into node calls (subscribe, publish) and
//! queues replies; fan-out queues messages; the writer drains the queue. The reader runs in a task
//! of its own because frame reads are not cancel-safe.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::auth::Identity;
use crate::frame::{self, OpCode};
use crate::node::{Admission, Node};
use crate::protocol::{self, ErrorCode, ProtocolError, Request};
use crate::registry::ConnId;
use crate::send_queue::{CloseReason, DirectWrite, SendQueue};
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

/// What the connection is for.
#[derive(Clone, Copy, Debug)]
pub enum Route {
    /// The pub/sub protocol, for a client with this identity.
    PubSub(Identity),
    /// The diagnostic echo route: every message comes back unchanged.
    Echo,
}

/// Runs a connection to its end. `admission` holds the connection slot until then. `direct`, when
/// given, is a handle to the same socket as `write` that fan-out may write through while the writer
/// is idle.
pub async fn run<R, W>(
    node: Arc<Node>,
    admission: Admission,
    read: R,
    write: W,
    direct: Option<Arc<dyn DirectWrite>>,
    route: Route,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = admission.id;
    let queue = match route {
        Route::Echo => {
            let l = &node.settings.limits;
            Arc::new(SendQueue::with_direct(
                l.send_queue_frames,
                l.send_queue_bytes.max(ECHO_QUEUE_BYTES),
                l.slow_consumer,
                direct,
            ))
        }
        Route::PubSub(_) => node.new_queue(direct),
    };
    let heard = Arc::new(LastHeard::new());
    let max_message = match route {
        Route::Echo => ECHO_MAX_MESSAGE,
        Route::PubSub(_) => node.settings.limits.max_message_size,
    };
    let reader = Reader {
        ws: WsReader::new(read, max_message),
        queue: queue.clone(),
        heard: heard.clone(),
        subs: Subscriptions {
            node: node.clone(),
            conn,
            topics: Vec::new(),
        },
        route,
    };
    let mut reader = tokio::spawn(reader.run());
    let heartbeat = Heartbeat {
        ping_interval: node.settings.server.ping_interval,
        idle_timeout: node.settings.server.idle_timeout,
    };
    let end = writer::run(write, queue.clone(), heard, heartbeat, node.drain.clone()).await;
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

/// The topics a connection is subscribed to. Dropping it (when the reader ends or is aborted)
/// unsubscribes them all.
struct Subscriptions {
    node: Arc<Node>,
    conn: ConnId,
    topics: Vec<Arc<str>>,
}

impl Subscriptions {
    fn position(&self, topic: &str) -> Option<usize> {
        self.topics.iter().position(|t| &**t == topic)
    }
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        if self.topics.is_empty() {
            return;
        }
        let topics = std::mem::take(&mut self.topics);
        let (node, conn) = (self.node.clone(), self.conn);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for topic in topics {
                    node.unsubscribe(&topic, conn).await;
                }
            });
        }
    }
}

struct Reader<R> {
    ws: WsReader<R>,
    queue: Arc<SendQueue>,
    heard: Arc<LastHeard>,
    subs: Subscriptions,
    route: Route,
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
            match incoming {
                Ok(Incoming::Text(data)) => match self.route {
                    Route::Echo => {
                        self.queue.push(frame::frame(OpCode::Text, &data));
                    }
                    Route::PubSub(who) => {
                        // WsReader has validated UTF-8 already.
                        let text = std::str::from_utf8(&data).unwrap_or_default();
                        // Boxed: requests are rare next to idle time, and keeping their state out of
                        // the reader's future keeps every idle connection smaller.
                        Box::pin(self.handle(who, text)).await;
                    }
                },
                Ok(Incoming::Binary(data)) => match self.route {
                    Route::Echo => {
                        self.queue.push(frame::frame(OpCode::Binary, &data));
                    }
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

    fn reply_error(&self, id: Option<&serde_json::value::RawValue>, err: ProtocolError) {
        self.subs
            .node
            .metrics
            .client_errors
            .with_label_values(&[err.code.as_str()])
            .inc();
        self.reply(protocol::error(id, &err));
    }

    async fn handle(&mut self, who: Identity, text: &str) {
        let parsed = protocol::parse(text);
        let id = parsed.id;
        let result = match parsed.request {
            Err(e) => Err(e),
            Ok(request) => self.execute(who, id, request).await,
        };
        if let Err(e) = result {
            self.reply_error(id, e);
        }
    }

    async fn execute(
        &mut self,
        who: Identity,
        id: Option<&serde_json::value::RawValue>,
        request: Request<'_>,
    ) -> Result<(), ProtocolError> {
        let node = self.subs.node.clone();
        match request {
            Request::Subscribe { topic, since } => {
                if !node.access.may_subscribe(who, &topic) {
                    return Err(ProtocolError::new(
                        ErrorCode::Forbidden,
                        format!("not allowed to subscribe to {topic}"),
                    ));
                }
                if self.subs.position(&topic).is_some() {
                    return Err(ProtocolError::new(
                        ErrorCode::AlreadySubscribed,
                        format!("already subscribed to {topic}"),
                    ));
                }
                let max = node.settings.limits.max_subscriptions;
                if self.subs.topics.len() >= max {
                    return Err(ProtocolError::new(
                        ErrorCode::TooManySubscriptions,
                        format!("at most {max} subscriptions per connection"),
                    ));
                }
                let name = node
                    .subscribe(self.subs.conn, &self.queue, &topic, id, since)
                    .await?;
                self.subs.topics.push(name);
                Ok(())
            }
            Request::Unsubscribe { topic } => {
                let Some(i) = self.subs.position(&topic) else {
                    return Err(ProtocolError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {topic}"),
                    ));
                };
                self.subs.topics.swap_remove(i);
                node.unsubscribe(&topic, self.subs.conn).await;
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
        }
    }
}
