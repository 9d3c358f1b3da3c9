//! Subscribing a connection to a topic: the broker subscription, the ack, a resume's replay, and
//! turning the subscriber live.
//!
//! A resume's replay is read from history in pages, each one only when the client's send queue has
//! room ([`SendQueue::room`]): a client that reads slowly, or not at all, costs the node at most one
//! page on top of its bounded queue, however much it missed. Reading the whole replay at once (up
//! to 10,000 messages of up to `limits.max_message_size`) cost every resuming client its entire
//! replay in memory, which a few thousand reconnecting clients turned into gigabytes.
//!
//! Meanwhile the subscriber is pending: the topic's live messages are held back (see
//! [`crate::registry`]) and released after the replay, so the client sees one contiguous run of
//! offsets. When the held list overflows it is dropped and the replay simply reads further, up to
//! where the dropped messages went; a resuming client is never closed as a slow consumer for the
//! length of its replay. When a later page shows that history no longer holds what comes next
//! (trimmed while the client was reading), the client gets a gap frame and goes live: it is told,
//! never silently skipped.

use std::sync::Arc;

use broker_bridge::{HistoryRead, Message, Offset, Position, Replay};
use serde_json::value::RawValue;

use crate::config::Limits;
use crate::node::{Node, broker_error};
use crate::protocol::{self, ProtocolError, Since};
use crate::registry::{Activation, ConnId, Subscription};
use crate::send_queue::SendQueue;

/// Messages a resume may have missed at most; past it the ack says `recovered:false`.
const MAX_REPLAY: Offset = 10_000;
/// Messages per history page at most.
const PAGE_MESSAGES: usize = 100;
/// Frame bytes per history page, about (a message larger than this is a page of its own).
const PAGE_BYTES: usize = 256 << 10;
/// What a message frame adds to `data` besides the topic: the WebSocket header and the envelope.
const FRAME_ENVELOPE: usize = 64;

impl Node {
    /// Adds a pending subscriber of `topic` for connection `conn` and returns its guard. Call it
    /// before any await of the subscribe, and keep the guard until the subscription ends: dropping
    /// it (whenever, however) releases everything the subscription holds.
    pub fn join(&self, conn: ConnId, queue: &Arc<SendQueue>, topic: &str) -> Subscription {
        self.registry.join(topic, conn, queue.clone())
    }

    /// Starts a joined subscription: makes sure the broker delivers the topic, queues the ack (and
    /// a resume's replay, paced by the client's reading) and turns the subscriber live. An error
    /// (broker unavailable) means nothing was acknowledged; the caller drops the guard and replies
    /// with the error.
    pub async fn start(
        &self,
        sub: &Subscription,
        id: Option<&RawValue>,
        since: Option<Since>,
    ) -> Result<(), ProtocolError> {
        sub.link_broker().await.map_err(broker_error)?;
        if sub.is_wildcard() {
            // Live from its ack on: no position, no replay (the protocol refuses `since`).
            let ack = protocol::unsubscribe_ack(id, sub.topic());
            self.registry.activate_wildcard(sub, ack);
            return Ok(());
        }
        let topic = &**sub.topic();
        let mut pager = Pager::new(&self.settings.limits, topic.len());
        let Some(since) = since else {
            let position = self.broker.position(topic).await.map_err(broker_error)?;
            let ack = protocol::ack(id, topic, &position, None);
            self.registry.queue_frame(sub.queue(), ack);
            self.catch_up(sub, position.clone(), position, pager).await;
            return Ok(());
        };
        let first = self
            .broker
            .history(topic, pager.read(&since.epoch, since.offset))
            .await
            .map_err(broker_error)?;
        let missed = first.position.offset.saturating_sub(since.offset);
        if !first.complete || missed > MAX_REPLAY {
            self.metrics
                .resumes
                .with_label_values(&["not_recovered"])
                .inc();
            let ack = protocol::ack(id, topic, &first.position, Some(false));
            self.registry.queue_frame(sub.queue(), ack);
            self.catch_up(sub, first.position.clone(), first.position, pager)
                .await;
            return Ok(());
        }
        self.metrics.resumes.with_label_values(&["recovered"]).inc();
        let resumed = Position {
            epoch: first.position.epoch.clone(),
            offset: since.offset,
        };
        let ack = protocol::ack(id, topic, &resumed, Some(true));
        self.registry.queue_frame(sub.queue(), ack);
        // Messages up to the position read are in history; later ones were published after the
        // broker subscription was in place, so they are held back for the subscriber.
        let goal = first.position.clone();
        if let Some(cursor) = self.send_page(sub, resumed, &first, &mut pager).await {
            self.catch_up(sub, cursor, goal, pager).await;
        }
        Ok(())
    }

    /// Sends pages of history from `cursor` on until the subscriber reached `goal` and can turn
    /// live with what it held back; or, when history has a hole, a gap frame and then live.
    /// Returns early when the connection closes (its guard is dropped with it).
    async fn catch_up(
        &self,
        sub: &Subscription,
        mut cursor: Position,
        mut goal: Position,
        mut pager: Pager,
    ) {
        let topic = &**sub.topic();
        loop {
            if goal.epoch == cursor.epoch && cursor.offset >= goal.offset {
                match self.registry.try_activate(sub, &cursor) {
                    Activation::Live | Activation::Gone => return,
                    // Its held list overflowed: read on to where the dropped messages went (in
                    // another epoch, the next read finds the hole and ends with a gap).
                    Activation::Behind(newest) => goal = newest,
                }
            }
            let queue = sub.queue();
            queue.room().await;
            if queue.is_closing() {
                return;
            }
            let read = pager.read(cursor.epoch.as_str(), cursor.offset);
            let page = match self.broker.history(topic, read).await {
                Ok(page) if page.complete => page,
                Ok(page) => {
                    // Trimmed while the client was reading, or the epoch changed: tell it.
                    self.registry.activate_after_gap(sub, &page.position);
                    return;
                }
                Err(e) => {
                    tracing::warn!(topic, error = %e, "history read failed during a replay");
                    self.registry.activate_after_gap(sub, &goal);
                    return;
                }
            };
            if page.messages.is_empty() {
                // Complete and empty: the cursor is at the topic's latest offset.
                goal = cursor.clone();
                continue;
            }
            match self.queue_page(sub, cursor, &page, &mut pager) {
                Some(next) => cursor = next,
                None => return,
            }
        }
    }

    /// Waits until the client's queue has room, then queues `page`; returns where the subscriber
    /// then stands, or `None` when the connection is closing.
    async fn send_page(
        &self,
        sub: &Subscription,
        cursor: Position,
        page: &Replay,
        pager: &mut Pager,
    ) -> Option<Position> {
        if page.messages.is_empty() {
            return Some(cursor);
        }
        sub.queue().room().await;
        self.queue_page(sub, cursor, page, pager)
    }

    /// Queues `page` (the queue has room); `None` when the connection is closing.
    fn queue_page(
        &self,
        sub: &Subscription,
        cursor: Position,
        page: &Replay,
        pager: &mut Pager,
    ) -> Option<Position> {
        if sub.queue().is_closing() {
            return None;
        }
        let queued = self.registry.queue_replay(sub.queue(), &page.messages);
        self.metrics.replayed.inc_by(queued as u64);
        pager.observe(&page.messages);
        Some(
            page.messages
                .last()
                .and_then(|m| m.position.clone())
                .unwrap_or(cursor),
        )
    }
}

/// Sizes history pages: at most [`PAGE_MESSAGES`] and about [`PAGE_BYTES`] (both at most a quarter
/// of the send queue), judged by the largest message of the last page.
struct Pager {
    max_frames: usize,
    max_bytes: usize,
    /// The largest frame expected in the next page.
    largest: usize,
    /// Topic and envelope bytes of each frame.
    overhead: usize,
}

impl Pager {
    fn new(limits: &Limits, topic_len: usize) -> Self {
        let overhead = topic_len + FRAME_ENVELOPE;
        Pager {
            max_frames: (limits.send_queue_frames / 4).clamp(1, PAGE_MESSAGES),
            max_bytes: (limits.send_queue_bytes / 4).min(PAGE_BYTES),
            // Until a page shows how large the topic's messages are, assume the largest allowed.
            largest: limits.max_message_size + overhead,
            overhead,
        }
    }

    /// The next page: messages after `since` in `epoch`, as many as fit.
    fn read<'a>(&self, epoch: &'a str, since: Offset) -> HistoryRead<'a> {
        HistoryRead {
            epoch: Some(epoch),
            since: Some(since),
            limit: (self.max_bytes / self.largest.max(1)).clamp(1, self.max_frames),
            whole: false,
        }
    }

    /// Learns from a page: the next one expects frames as large as its largest, or half the
    /// previous guess if that is more (so a run of small messages grows pages gradually).
    fn observe(&mut self, page: &[Message]) {
        if let Some(largest) = page.iter().map(|m| m.data.len()).max() {
            self.largest = (largest + self.overhead).max(self.largest / 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn limits(frames: usize, bytes: usize, max_message: usize) -> Limits {
        Limits {
            max_message_size: max_message,
            max_subscriptions: 100,
            max_wildcards: 10,
            max_wildcard_patterns: 1000,
            send_queue_frames: frames,
            send_queue_bytes: bytes,
            slow_consumer: crate::config::SlowConsumerPolicy::Disconnect,
            max_batch_messages: 1000,
            max_batch_bytes: 1 << 20,
            subscribe_rate: 50,
            subscribe_burst: 200,
            message_rate: 1000,
            message_burst: 5000,
            max_json_depth: 128,
        }
    }

    fn page(sizes: &[usize]) -> Vec<Message> {
        sizes
            .iter()
            .map(|&n| Message {
                topic: "t".into(),
                position: None,
                data: Bytes::from(vec![b'1'; n]),
            })
            .collect()
    }

    #[test]
    fn pages_start_small_and_grow_to_the_byte_budget() {
        let mut p = Pager::new(&limits(1024, 4 << 20, 65536), 36);
        // Assume 64 KiB messages: 256 KiB / 64 KiB = 3 (with the envelope).
        assert_eq!(p.read("e", 0).limit, 3);
        p.observe(&page(&[20_000; 3]));
        assert_eq!(p.read("e", 0).limit, 7, "half the previous guess first");
        p.observe(&page(&[20_000; 7]));
        assert_eq!(p.read("e", 0).limit, 13, "then ~256 KiB of 20 KB messages");
        for _ in 0..10 {
            p.observe(&page(&[10; 5]));
        }
        assert_eq!(p.read("e", 0).limit, PAGE_MESSAGES, "small messages: 100");
    }

    #[test]
    fn pages_stay_within_a_quarter_of_a_small_queue() {
        let p = Pager::new(&limits(8, 1 << 20, 1024), 1);
        assert_eq!(p.read("e", 0).limit, 2);
        let p = Pager::new(&limits(2, 4096, 1024), 1);
        assert_eq!(p.read("e", 0).limit, 1, "never less than one message");
    }
}
