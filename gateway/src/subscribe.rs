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
use crate::protocol::{self, ProtocolError, Since, WildSince};
use crate::registry::{Activation, ConnId, Subscription};
use crate::send_queue::SendQueue;

/// Messages a resume may have missed at most; past it the ack says `recovered:false`.
pub(crate) const MAX_REPLAY: Offset = 10_000;
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
    /// with the error. `wild_since` resumes a wildcard ([`crate::wild_resume`]).
    pub async fn start(
        &self,
        sub: &Subscription,
        id: Option<&RawValue>,
        since: Option<Since>,
        wild_since: Option<WildSince>,
    ) -> Result<(), ProtocolError> {
        sub.link_broker().await.map_err(broker_error)?;
        if sub.is_wildcard() {
            return self.start_wildcard(sub, id, wild_since).await;
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
        if let Some(cursor) = self
            .send_page(sub.queue(), resumed, &first, &mut pager)
            .await
        {
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
        loop {
            let ranged = self
                .replay_range(sub.queue(), sub.topic(), cursor, goal, &mut pager)
                .await;
            match ranged {
                Ranged::Reached(at) => match self.registry.try_activate(sub, &at) {
                    Activation::Live | Activation::Gone => return,
                    // Its held list overflowed: read on to where the dropped messages went (in
                    // another epoch, the next read finds the hole and ends with a gap).
                    Activation::Behind(newest) => (cursor, goal) = (at, newest),
                },
                Ranged::Gap(resume) => {
                    self.registry.activate_after_gap(sub, &resume);
                    return;
                }
                Ranged::Closed => return,
            }
        }
    }

    /// Sends `topic`'s history from `cursor` on, a page whenever `queue` has room, until it
    /// reached `goal` (or the topic's latest offset); the one pager of every replay.
    pub(crate) async fn replay_range(
        &self,
        queue: &Arc<SendQueue>,
        topic: &str,
        mut cursor: Position,
        goal: Position,
        pager: &mut Pager,
    ) -> Ranged {
        loop {
            if goal.epoch == cursor.epoch && cursor.offset >= goal.offset {
                return Ranged::Reached(cursor);
            }
            queue.room().await;
            if queue.is_closing() {
                return Ranged::Closed;
            }
            let read = pager.read(cursor.epoch.as_str(), cursor.offset);
            let page = match self.broker.history(topic, read).await {
                Ok(page) if page.complete => page,
                // Trimmed while the client was reading, or the epoch changed: tell it.
                Ok(page) => return Ranged::Gap(page.position),
                Err(e) => {
                    tracing::warn!(topic, error = %e, "history read failed during a replay");
                    return Ranged::Gap(goal);
                }
            };
            if page.messages.is_empty() {
                // Complete and empty: the cursor is at the topic's latest offset.
                return Ranged::Reached(cursor);
            }
            match self.queue_page(queue, cursor, &page, pager) {
                Some(next) => cursor = next,
                None => return Ranged::Closed,
            }
        }
    }

    /// Waits until the client's queue has room, then queues `page`; returns where the subscriber
    /// then stands, or `None` when the connection is closing.
    pub(crate) async fn send_page(
        &self,
        queue: &Arc<SendQueue>,
        cursor: Position,
        page: &Replay,
        pager: &mut Pager,
    ) -> Option<Position> {
        if page.messages.is_empty() {
            return Some(cursor);
        }
        queue.room().await;
        self.queue_page(queue, cursor, page, pager)
    }

    /// Queues `page` (the queue has room); `None` when the connection is closing.
    fn queue_page(
        &self,
        queue: &Arc<SendQueue>,
        cursor: Position,
        page: &Replay,
        pager: &mut Pager,
    ) -> Option<Position> {
        if queue.is_closing() {
            return None;
        }
        let queued = self.registry.queue_replay(queue, &page.messages);
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

/// Where [`Node::replay_range`] ended.
pub(crate) enum Ranged {
    /// Everything up to this position was queued.
    Reached(Position),
    /// History has a hole (trimmed, another epoch, a failed read): the subscriber must be told
    /// that its stream continues after this position.
    Gap(Position),
    /// The connection is closing.
    Closed,
}

/// Sizes history pages: at most [`PAGE_MESSAGES`] and about [`PAGE_BYTES`] (both at most a quarter
/// of the send queue), judged by the largest message of the last page.
pub(crate) struct Pager {
    max_frames: usize,
    max_bytes: usize,
    /// The largest frame expected in the next page.
    largest: usize,
    /// Topic and envelope bytes of each frame.
    overhead: usize,
}

impl Pager {
    pub(crate) fn new(limits: &Limits, topic_len: usize) -> Self {
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
    pub(crate) fn read<'a>(&self, epoch: &'a str, since: Offset) -> HistoryRead<'a> {
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
