//! Fan-out: the registry as the broker's [`MessageSink`], and what each subscriber gets.
//!
//! A live subscriber has a [`Cursor`], the last position it was sent. A message at or below it is a
//! duplicate and skipped. A message of another epoch means the broker lost the topic's sequence (a
//! Redis flush or rollback, a restarted broker): offsets restart there, so the message is delivered,
//! after a gap frame telling the client that what came before it in the new epoch may be lost
//! (unless nothing can have been: the subscriber was at offset 0 and the message is the new epoch's
//! first). The broker's own [`MessageSink::gap`] becomes a gap frame the same way.
//!
//! A pending subscriber holds its messages (and gap signals) back, in a bounded list, until it
//! turns live (see [`Registry::try_activate`]).

use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use broker_bridge::{Epoch, Lost, Message, MessageSink, Offset, Position};
use bytes::Bytes;

use crate::deflate::SharedFrame;
use crate::json_depth;
use crate::namespace::Namespace;
use crate::protocol;
use crate::send_queue::{Flushes, Policy, SendQueue};

use super::Registry;

/// What a subscriber is.
pub(super) enum SubState {
    /// Subscribe not yet acknowledged, or a resume's replay still being sent: messages held back.
    Pending(Pending),
    /// Acknowledged (and replayed): messages after the cursor are delivered.
    Live(Cursor),
    /// A wildcard subscriber, acknowledged: every message of its topics is delivered (see
    /// [`super::wildcard`]), through its own cursor in the topics its resume got ahead in.
    Wild(super::wild_ahead::Ahead),
    /// A wildcard subscriber not yet acknowledged (or replaying a resume): its topics' messages
    /// are held back ([`super::wild_hold`]).
    WildPending(super::wild_hold::WildHeld),
}

/// What a pending subscriber holds back.
#[derive(Default)]
pub(super) struct Pending {
    held: Vec<Held>,
    /// Bytes of the held frames.
    bytes: usize,
    /// Set when the held list overflowed and was dropped: the newest position dropped since (`None`
    /// if only raw messages were). Nothing is held while it is set.
    dropped: Option<Option<Position>>,
    /// Raw messages were dropped with it. History never has them: the subscriber is told with a
    /// gap frame at its position when it turns live.
    raw_dropped: bool,
}

/// One thing a pending subscriber held back.
pub(super) struct Held {
    /// The message's position (`None` for a raw message), or where a gap signal resumes.
    pub(super) position: Option<Position>,
    /// The encoded frame (a message, or a gap frame).
    pub(super) frame: Bytes,
    /// Whether it is a gap signal rather than a message.
    pub(super) gap: bool,
}

impl Held {
    /// A message at `position` (`None`: a raw one).
    pub(super) fn message(position: Option<Position>, frame: Bytes) -> Self {
        Held {
            position,
            frame,
            gap: false,
        }
    }

    /// A gap signal resuming at `resume`.
    pub(super) fn gap(resume: Position, frame: Bytes) -> Self {
        Held {
            position: Some(resume),
            frame,
            gap: true,
        }
    }
}

impl Pending {
    /// Holds `held` back, or drops the whole list when it would pass `max_frames` or `max_bytes`.
    fn hold(&mut self, held: Held, max_frames: usize, max_bytes: usize) {
        if let Some(newest) = &mut self.dropped {
            if held.position.is_some() {
                *newest = held.position;
            } else {
                self.raw_dropped = true;
            }
            return;
        }
        if self.held.len() < max_frames && self.bytes + held.frame.len() <= max_bytes {
            self.bytes += held.frame.len();
            self.held.push(held);
            return;
        }
        // Rather than close a subscriber whose replay takes long, forget what it held and let it
        // read that from history before it turns live.
        self.raw_dropped |=
            held.position.is_none() || self.held.iter().any(|h| h.position.is_none());
        let newest = held
            .position
            .or_else(|| self.held.iter().rev().find_map(|h| h.position.clone()));
        self.held = Vec::new();
        self.bytes = 0;
        self.dropped = Some(newest);
    }

    /// After everything up to `cursor` was sent: when the held list overflowed and dropped
    /// messages after `cursor`, the newest of them, and the subscriber starts holding again (the
    /// caller reads history up to it). `None` when the held list is all it needs.
    pub(super) fn behind(&mut self, cursor: &Position) -> Option<Position> {
        let newest = self.dropped.take()?;
        newest.filter(|n| is_after(n, cursor))
    }

    /// The newest position the overflowed held list dropped, if it comes after `resume`.
    pub(super) fn dropped_after(&self, resume: &Position) -> Option<&Position> {
        self.dropped
            .as_ref()?
            .as_ref()
            .filter(|n| is_after(n, resume))
    }

    /// What it held, in order, and whether raw messages were dropped.
    pub(super) fn into_held(self) -> (Vec<Held>, bool) {
        (self.held, self.raw_dropped)
    }
}

/// Whether `p` comes after `cursor`: a later offset in the same epoch, or another epoch.
fn is_after(p: &Position, cursor: &Position) -> bool {
    p.epoch != cursor.epoch || p.offset > cursor.offset
}

/// Where a live subscriber stands in its topic.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Cursor {
    epoch: Epoch,
    offset: Offset,
}

/// What to do with one message for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Already sent (or from before the subscription): skip it.
    Skip,
    /// Send it.
    Deliver,
    /// Send a gap frame resuming at the message's offset - 1 in its (new) epoch, then the message.
    GapThenDeliver,
}

impl Cursor {
    pub(super) fn at(position: &Position) -> Self {
        Cursor {
            epoch: position.epoch.clone(),
            offset: position.offset,
        }
    }

    /// The epoch it is in.
    pub(super) fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// Where it stands.
    pub(super) fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.offset,
        }
    }

    /// Decides about a message at `position` and moves the cursor past it when it is sent.
    pub(super) fn step(&mut self, position: Option<&Position>) -> Step {
        let Some(p) = position else {
            // A raw message has no place in the sequence: always delivered.
            return Step::Deliver;
        };
        if p.epoch == self.epoch {
            if p.offset <= self.offset {
                return Step::Skip;
            }
            self.offset = p.offset;
            return Step::Deliver;
        }
        let lossless = self.offset == 0 && p.offset == 1;
        self.epoch = p.epoch.clone();
        self.offset = p.offset;
        if lossless {
            Step::Deliver
        } else {
            Step::GapThenDeliver
        }
    }

    /// Takes a gap signal resuming at `resume`: true (and the cursor moves there) unless the
    /// subscriber is past it already, in which case it missed nothing. A subscriber exactly at it
    /// missed nothing either, unless `raw_after`: raw messages, which have no offsets, published
    /// after its last one were lost (pass it only for a live subscriber: one acknowledged at that
    /// position later had not subscribed yet when the loss happened).
    pub(super) fn gap(&mut self, resume: &Position, raw_after: bool) -> bool {
        if resume.epoch == self.epoch
            && (resume.offset < self.offset || !raw_after && resume.offset == self.offset)
        {
            return false;
        }
        self.epoch = resume.epoch.clone();
        self.offset = resume.offset;
        true
    }
}

/// The position a gap frame in front of a message at `p` resumes at: the offset before it.
pub(super) fn before(p: &Position) -> Position {
    Position {
        epoch: p.epoch.clone(),
        offset: p.offset.saturating_sub(1),
    }
}

/// How a message is queued to its subscribers: its namespace's slow-consumer policy.
pub(super) struct How<'a> {
    pub(super) policy: Policy<'a>,
    pub(super) ns: &'a Namespace,
}

impl How<'_> {
    /// Queues `frame` to one subscriber; whether it is queued.
    pub(super) fn push(
        &self,
        reg: &Registry,
        flushes: &mut Flushes,
        queue: &Arc<SendQueue>,
        frame: Bytes,
    ) -> bool {
        reg.push_as(flushes, queue, frame, self.policy, Some(self.ns))
    }
}

/// Logs at most one warning per period, counting the ones it kept quiet.
#[derive(Default)]
pub(super) struct WarnLimiter {
    state: Mutex<(Option<Instant>, u64)>,
}

impl WarnLimiter {
    const PERIOD: Duration = Duration::from_secs(10);

    /// `Some(n)` when a warning may be logged now, `n` being how many were suppressed before it.
    fn allow(&self) -> Option<u64> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if st
            .0
            .is_some_and(|last| now.duration_since(last) < Self::PERIOD)
        {
            st.1 += 1;
            return None;
        }
        st.0 = Some(now);
        Some(std::mem::take(&mut st.1))
    }
}

impl Registry {
    /// Queues what a pending subscriber of `topic` held, after `cursor`, moving the cursor.
    pub(super) fn release(
        &self,
        flushes: &mut Flushes,
        topic: &str,
        queue: &Arc<SendQueue>,
        cursor: &mut Cursor,
        held: Vec<Held>,
    ) {
        for h in held {
            if h.gap {
                if let Some(resume) = &h.position
                    && cursor.gap(resume, false)
                {
                    self.push_gap(flushes, queue, h.frame);
                }
                continue;
            }
            let step = cursor.step(h.position.as_ref());
            if step == Step::GapThenDeliver
                && let Some(p) = &h.position
            {
                self.push_gap(flushes, queue, protocol::gap(topic, &before(p)));
            }
            // Held back, then delivered: counted now, as live messages are when queued.
            if step != Step::Skip && self.push(flushes, queue, h.frame) {
                self.metrics.delivered.inc();
                self.namespaces.of(topic).delivered.inc();
            }
        }
    }

    /// Whether a broker message may go to clients. A raw publish into the broker is bounded by no
    /// one else: one larger than any queue would close every subscriber of the topic as a slow
    /// consumer, and one nested deeper than client parsers take would break them. What may not go
    /// is counted (`pubgate_broker_messages_dropped_total{reason}`) and logged, rate-limited.
    pub(super) fn deliverable(&self, message: &Message) -> bool {
        self.deliverable_in(message, self.namespaces.of(&message.topic))
    }

    /// [`Registry::deliverable`] for a message whose namespace was looked up already.
    fn deliverable_in(&self, message: &Message, ns: &Namespace) -> bool {
        let (reason, what) = if message.data.len() > ns.max_message_size {
            (
                "too_large",
                "larger than limits.max_message_size (or its namespace's)",
            )
        } else if json_depth::exceeds(&message.data, self.limits.max_json_depth) {
            ("too_deep", "nested deeper than limits.max_json_depth")
        } else {
            return true;
        };
        self.metrics
            .broker_dropped
            .with_label_values(&[reason])
            .inc();
        if let Some(suppressed) = self.refused.allow() {
            tracing::warn!(
                topic = %message.topic,
                bytes = message.data.len(),
                namespace = %ns.name,
                suppressed,
                "message from the broker {what} dropped"
            );
        }
        false
    }
}

impl MessageSink for Registry {
    fn deliver(&self, message: Message) {
        // One namespace lookup per message: its size limit, its policy and its counters.
        let ns = self.namespaces.of(&message.topic);
        if !self.deliverable_in(&message, ns) {
            return;
        }
        let started = Instant::now();
        // Encoded once for the node, when the first subscriber needs it; compressed at most once,
        // when the first subscriber that negotiated deflate needs it.
        let encode = || protocol::message(&message);
        let shared = SharedFrame::new(&encode, self.limits.compression.as_ref(), &self.metrics);
        let mut frame = |queue: &SendQueue| shared.for_subscriber(queue.takes_deflate());
        let mut key = None;
        let how = How {
            policy: ns.queue_policy(&message.topic, &message.data, &mut key),
            ns,
        };
        let mut flushes = Flushes::new();
        let mut delivered = self.deliver_exact(&mut flushes, &message, &how, &mut frame);
        delivered += self.deliver_wild(&mut flushes, &message, &how, &mut frame);
        // Written in tasks of their own: the broker calls this under its topic's lock (memory) or
        // from its only subscription reader (Redis), and a big fan-out is spread over the workers.
        flushes.spawn();
        self.metrics.delivered.inc_by(delivered);
        ns.delivered.inc_by(delivered);
        self.metrics
            .fanout_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    fn gap(&self, topic: &str, resume: &Position, lost: Lost) {
        let frame = protocol::gap(topic, resume);
        let mut flushes = Flushes::new();
        let (max_frames, max_bytes) = (self.limits.max_held_frames, self.limits.max_held_bytes);
        let mut shard = self.shard(topic);
        if let Some(entry) = shard.get_mut(topic) {
            for sub in &mut entry.subs {
                match &mut sub.state {
                    SubState::Live(cursor) => {
                        if cursor.gap(resume, lost == Lost::Raw) {
                            self.push_gap(&mut flushes, &sub.queue, frame.clone());
                        }
                    }
                    SubState::Pending(pending) => pending.hold(
                        Held::gap(resume.clone(), frame.clone()),
                        max_frames,
                        max_bytes,
                    ),
                    SubState::Wild(_) | SubState::WildPending(_) => {}
                }
            }
        }
        drop(shard);
        self.gap_wild(&mut flushes, topic, resume, lost);
        flushes.spawn();
    }
}

impl Registry {
    /// Queues a message to the subscribers of its own topic. Returns how many got it.
    fn deliver_exact(
        &self,
        flushes: &mut Flushes,
        message: &Message,
        how: &How<'_>,
        frame: &mut dyn FnMut(&SendQueue) -> Bytes,
    ) -> u64 {
        let mut shard = self.shard(&message.topic);
        let Some(entry) = shard.get_mut(&*message.topic) else {
            return 0;
        };
        let position = message.position.as_ref();
        // Every live subscriber that needs one gets the same gap frame: encoded once.
        let mut gap_frame = None;
        let mut delivered = 0u64;
        let (max_frames, max_bytes) = (self.limits.max_held_frames, self.limits.max_held_bytes);
        // An entry without subscribers is cooling down: nothing to do.
        for sub in &mut entry.subs {
            match &mut sub.state {
                SubState::Live(cursor) => {
                    let step = cursor.step(position);
                    if step == Step::GapThenDeliver
                        && let Some(p) = position
                    {
                        let gap = gap_frame
                            .get_or_insert_with(|| protocol::gap(&message.topic, &before(p)));
                        self.push_gap(flushes, &sub.queue, gap.clone());
                    }
                    if step != Step::Skip && how.push(self, flushes, &sub.queue, frame(&sub.queue))
                    {
                        delivered += 1;
                    }
                }
                SubState::Pending(pending) => pending.hold(
                    Held::message(message.position.clone(), frame(&sub.queue)),
                    max_frames,
                    max_bytes,
                ),
                SubState::Wild(_) | SubState::WildPending(_) => {}
            }
        }
        delivered
    }
}
