//! A wildcard subscription's start: the ack with the broker's `time`, and a resume that replays
//! what every matching topic got since the client's previous ack, including topics it never saw.
//!
//! The pattern subscription is in place before anything is read, and the subscriber holds its
//! topics' live messages back ([`crate::registry`]) until the replay is done, so each topic's
//! replay runs into its held messages without a gap, and the held ones are released deduplicated
//! per topic by offset. The ack goes first (as for a named resume), then the replay topic by
//! topic, then the held live messages.
//!
//! Which topics to replay comes from the broker's directory of topics published since the moment
//! ([`Broker::directory`]): a topic the client saw replays after the position it sent (the rules of
//! a named `since`); a topic it never saw replays its messages stamped at or after the moment
//! ([`Broker::seek`]). A topic history cannot cover gets a gap frame naming it; a directory that
//! cannot answer makes the ack say `recovered:false` and nothing is replayed.
//!
//! [`Broker::directory`]: broker_bridge::Broker::directory
//! [`Broker::seek`]: broker_bridge::Broker::seek

use std::collections::HashMap;
use std::sync::Arc;

use broker_bridge::{Directory, EMPTY_EPOCH, Epoch, Position};
use serde_json::value::RawValue;

use crate::node::{Node, broker_error};
use crate::protocol::{ProtocolError, Since, WildSince, wildcard_ack};
use crate::registry::Subscription;
use crate::send_queue::SendQueue;
use crate::subscribe::{MAX_REPLAY, Pager, Ranged};
use crate::topic::Pattern;

impl Node {
    /// Starts a wildcard subscription whose broker subscription is in place (see the module doc).
    pub(crate) async fn start_wildcard(
        &self,
        sub: &Subscription,
        id: Option<&RawValue>,
        since: Option<WildSince>,
    ) -> Result<(), ProtocolError> {
        // Read after the pattern subscription is confirmed: every message stamped at or after it
        // reaches this node, and is held for the subscriber until its ack is queued.
        let pattern = &**sub.topic();
        let time = match self.broker.clock().await {
            Ok(time) => Some(time),
            // A plain subscribe does not need the clock to be served: it goes live without a
            // `time` (it cannot be resumed later, as against an older server).
            Err(e) if since.is_none() => {
                tracing::warn!(pattern, error = %e, "broker clock unreadable: wildcard ack without time");
                None
            }
            Err(e) => return Err(broker_error(e)),
        };
        let Some(since) = since else {
            let ack = wildcard_ack(id, pattern, time, None);
            self.registry
                .activate_wildcard(sub, Some(ack), HashMap::new());
            return Ok(());
        };
        let parsed = Pattern::parse(pattern).map_err(|e| {
            ProtocolError::new(crate::protocol::ErrorCode::InvalidTopic, e.to_string())
        })?;
        let directory = self
            .broker
            .directory(&parsed.literal_prefix(), since.time)
            .await
            .map_err(broker_error)?;
        let topics = match directory {
            Directory::Topics(topics) => topics,
            Directory::Unknown(why) => {
                tracing::debug!(pattern, why, "wildcard resume not served");
                self.metrics
                    .resumes
                    .with_label_values(&["not_recovered"])
                    .inc();
                let ack = wildcard_ack(id, pattern, time, Some(false));
                self.registry
                    .activate_wildcard(sub, Some(ack), HashMap::new());
                return Ok(());
            }
        };
        self.metrics.resumes.with_label_values(&["recovered"]).inc();
        let ack = wildcard_ack(id, pattern, time, Some(true));
        self.registry.queue_frame(sub.queue(), ack);
        let mut sent = HashMap::new();
        for topic in topics.into_iter().filter(|t| parsed.matches(t)) {
            let seen = since.topics.get(&*topic);
            let Some(end) = self
                .replay_topic(sub.queue(), &topic, seen, since.time)
                .await
            else {
                // The connection is closing; its guard releases the subscriber.
                return Ok(());
            };
            sent.insert(topic, end);
        }
        self.registry.activate_wildcard(sub, None, sent);
        Ok(())
    }

    /// Replays one topic of a wildcard resume: after `seen` when the client saw it, else its
    /// messages stamped at or after `time`. Returns where the topic's replay ended (after a gap
    /// frame when history could not cover it), or `None` when the connection is closing.
    async fn replay_topic(
        &self,
        queue: &Arc<SendQueue>,
        topic: &Arc<str>,
        seen: Option<&Since>,
        time: u64,
    ) -> Option<Position> {
        let mut pager = Pager::new(&self.settings.limits, topic.len());
        let (cursor, goal) = match seen {
            Some(seen) => {
                let read = pager.read(&seen.epoch, seen.offset);
                let first = match self.broker.history(topic, read).await {
                    Ok(first) => first,
                    Err(e) => return Some(self.failed(queue, topic, seen_position(seen), &e)),
                };
                let missed = first.position.offset.saturating_sub(seen.offset);
                if !first.complete || missed > MAX_REPLAY {
                    return Some(self.gap(queue, topic, first.position));
                }
                let from = Position {
                    epoch: first.position.epoch.clone(),
                    offset: seen.offset,
                };
                let goal = first.position.clone();
                (self.send_page(queue, from, &first, &mut pager).await?, goal)
            }
            None => {
                let seek = match self.broker.seek(topic, time, MAX_REPLAY).await {
                    Ok(seek) => seek,
                    Err(e) => {
                        let unknown = Position {
                            epoch: Epoch::new(EMPTY_EPOCH),
                            offset: 0,
                        };
                        return Some(self.failed(queue, topic, unknown, &e));
                    }
                };
                if !seek.covered {
                    return Some(self.gap(queue, topic, seek.position));
                }
                let from = Position {
                    epoch: seek.position.epoch.clone(),
                    offset: seek.after,
                };
                (from, seek.position)
            }
        };
        match self
            .replay_range(queue, topic, cursor, goal, &mut pager)
            .await
        {
            Ranged::Reached(at) => Some(at),
            Ranged::Gap(resume) => Some(self.gap(queue, topic, resume)),
            Ranged::Closed => None,
        }
    }

    /// Queues a gap frame of `topic` resuming at `resume`, and returns `resume`.
    fn gap(&self, queue: &Arc<SendQueue>, topic: &str, resume: Position) -> Position {
        self.registry.queue_gap(queue, topic, &resume);
        resume
    }

    /// A topic whose history read failed: a gap frame at the best position known.
    fn failed(
        &self,
        queue: &Arc<SendQueue>,
        topic: &str,
        known: Position,
        e: &broker_bridge::BrokerError,
    ) -> Position {
        tracing::warn!(topic, error = %e, "history read failed during a wildcard resume");
        self.gap(queue, topic, known)
    }
}

fn seen_position(seen: &Since) -> Position {
    Position {
        epoch: Epoch::new(seen.epoch.as_str()),
        offset: seen.offset,
    }
}
