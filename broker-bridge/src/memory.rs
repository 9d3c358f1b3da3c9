//! The embedded broker: one node, no Redis, the default.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::directory::{seek_in, wall_ms};
use crate::{
    Broker, BrokerError, Directory, Epoch, HistoryLimits, HistoryPolicy, HistoryRead,
    MAX_DIRECTORY_TOPICS, Message, MessageSink, Offset, Position, PrefixSet, Replay, Seek,
};

/// Settings of the in-memory broker.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// How much history each topic keeps (looked up once, when the broker first sees the topic).
    pub history: Arc<dyn HistoryPolicy>,
    /// How far back a wildcard resume may reach ([`Broker::directory`]).
    pub directory_window: Duration,
}

impl MemoryConfig {
    /// Every topic keeps the same history.
    pub fn uniform(limits: HistoryLimits) -> Self {
        MemoryConfig {
            history: Arc::new(limits),
            directory_window: Duration::from_secs(3600),
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig::uniform(HistoryLimits::NONE)
    }
}

/// A broker inside the node's own process.
///
/// Publishing assigns the offset and hands the message to the sink under the topic's lock, so the sink
/// sees each topic in offset order even with many concurrent publishers. Each topic keeps a ring of
/// its latest messages, sized by the history policy. A topic nobody subscribes to and nobody
/// published to for longer than its history TTL (at least a minute) is forgotten, which bounds
/// memory whatever topic names publishers invent; publishing to it again starts a new epoch.
pub struct MemoryBroker {
    config: MemoryConfig,
    sink: Arc<dyn MessageSink>,
    topics: Mutex<Topics>,
    /// Prefixes subscribed for wildcard subscriptions: their topics are delivered too.
    prefixes: PrefixSet,
}

struct Topics {
    map: HashMap<Arc<str>, Arc<Mutex<TopicLog>>>,
    last_sweep: Instant,
    /// When the broker started (ms): a wildcard resume from before it cannot be served, whatever
    /// the node that acknowledged it had.
    started_ms: u64,
    /// The latest publish (ms) of any topic forgotten by a sweep: a wildcard resume from before it
    /// may have missed that topic's messages, which are gone.
    forgot_ms: u64,
}

struct TopicLog {
    name: Arc<str>,
    epoch: Epoch,
    last: Offset,
    subscribed: bool,
    last_publish: Instant,
    /// The last publish on the wall clock (ms), for the directory.
    last_publish_ms: u64,
    limits: HistoryLimits,
    /// Each message with its offset and when it was published (monotonic, and wall ms).
    history: VecDeque<(Offset, Instant, u64, Bytes)>,
}

impl TopicLog {
    /// How long the topic is kept without subscribers or publishes.
    fn idle_limit(&self) -> Duration {
        self.limits.ttl.max(Duration::from_secs(60))
    }

    fn position(&self) -> Position {
        Position {
            epoch: self.epoch.clone(),
            offset: self.last,
        }
    }

    /// Drops what is beyond the topic's size or older than its TTL.
    fn trim(&mut self, now: Instant) {
        while self.history.len() > self.limits.size {
            self.history.pop_front();
        }
        while let Some((_, at, _, _)) = self.history.front() {
            if now.duration_since(*at) <= self.limits.ttl {
                break;
            }
            self.history.pop_front();
        }
    }
}

impl MemoryBroker {
    /// Creates a broker that delivers subscribed topics to `sink`.
    pub fn new(config: MemoryConfig, sink: Arc<dyn MessageSink>) -> Self {
        MemoryBroker {
            config,
            sink,
            topics: Mutex::new(Topics {
                map: HashMap::new(),
                last_sweep: Instant::now(),
                started_ms: wall_ms(),
                forgot_ms: 0,
            }),
            prefixes: PrefixSet::default(),
        }
    }

    fn topic(&self, name: &str) -> Arc<Mutex<TopicLog>> {
        let mut topics = lock(&self.topics);
        let now = Instant::now();
        // Sweep at most every 30 s (half the shortest idle limit).
        if now.duration_since(topics.last_sweep) > Duration::from_secs(30) {
            topics.last_sweep = now;
            let mut forgot_ms = topics.forgot_ms;
            topics.map.retain(|_, log| {
                let log = lock(log);
                let keep =
                    log.subscribed || now.duration_since(log.last_publish) < log.idle_limit();
                if !keep {
                    forgot_ms = forgot_ms.max(log.last_publish_ms);
                }
                keep
            });
            topics.forgot_ms = forgot_ms;
        }
        if let Some(log) = topics.map.get(name) {
            return log.clone();
        }
        let name: Arc<str> = name.into();
        let log = Arc::new(Mutex::new(TopicLog {
            name: name.clone(),
            epoch: Epoch::random(),
            last: 0,
            subscribed: false,
            last_publish: now,
            last_publish_ms: 0,
            limits: self.config.history.limits(&name),
            history: VecDeque::new(),
        }));
        topics.map.insert(name, log.clone());
        log
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, topic: &str, data: Bytes) -> Result<Position, BrokerError> {
        let log = self.topic(topic);
        let mut log = lock(&log);
        let now = Instant::now();
        log.last += 1;
        log.last_publish = now;
        // Never behind the previous stamp, so stamps follow offsets even if the wall clock steps
        // back.
        let stamp = wall_ms().max(log.last_publish_ms);
        log.last_publish_ms = stamp;
        let position = Position {
            epoch: log.epoch.clone(),
            offset: log.last,
        };
        if log.limits.size > 0 {
            let offset = log.last;
            log.history.push_back((offset, now, stamp, data.clone()));
            log.trim(now);
        }
        // Checked under the topic's lock, like `subscribed`: a prefix subscribed before this
        // publish took the lock sees the message, in order with the topic's others.
        if log.subscribed || self.prefixes.covers(&log.name) {
            self.sink.deliver(Message {
                topic: log.name.clone(),
                position: Some(position.clone()),
                data,
            });
        }
        Ok(position)
    }

    async fn subscribe(&self, topic: &str) -> Result<(), BrokerError> {
        lock(&self.topic(topic)).subscribed = true;
        Ok(())
    }

    async fn unsubscribe(&self, topic: &str) -> Result<(), BrokerError> {
        if let Some(log) = lock(&self.topics).map.get(topic) {
            let mut log = lock(log);
            log.subscribed = false;
            // The idle clock restarts now, so a topic someone just left keeps its epoch for a while.
            log.last_publish = Instant::now();
        }
        Ok(())
    }

    async fn subscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        self.prefixes.add(prefix);
        Ok(())
    }

    async fn unsubscribe_prefix(&self, prefix: &str) -> Result<(), BrokerError> {
        self.prefixes.remove(prefix);
        Ok(())
    }

    async fn position(&self, topic: &str) -> Result<Position, BrokerError> {
        let log = self.topic(topic);
        let log = lock(&log);
        Ok(Position {
            epoch: log.epoch.clone(),
            offset: log.last,
        })
    }

    async fn history(&self, topic: &str, read: HistoryRead<'_>) -> Result<Replay, BrokerError> {
        let log = self.topic(topic);
        let mut log = lock(&log);
        log.trim(Instant::now());
        let position = log.position();
        let (start, _) = read.start(&position);
        // The ring is in offset order: skip to the start without walking what comes before.
        let first = log.history.partition_point(|(o, _, _, _)| *o <= start);
        let held = log
            .history
            .range(first..)
            .take(read.limit)
            .map(|(o, _, _, data)| (*o, data.clone()));
        Ok(read.page(&log.name, position, held))
    }

    async fn clock(&self) -> Result<u64, BrokerError> {
        Ok(wall_ms())
    }

    async fn directory(&self, prefix: &str, since_ms: u64) -> Result<Directory, BrokerError> {
        let window = self.config.directory_window.as_millis() as u64;
        // Only the names below the prefix are taken under the table's lock, which every publish
        // needs too; each topic's time is read after it is released.
        let candidates: Vec<Arc<Mutex<TopicLog>>> = {
            let topics = lock(&self.topics);
            if since_ms < wall_ms().saturating_sub(window) {
                return Ok(Directory::Unknown("older than history.directory_window"));
            }
            if since_ms < topics.started_ms || since_ms <= topics.forgot_ms {
                return Ok(Directory::Unknown(
                    "the broker restarted or forgot a topic since",
                ));
            }
            topics
                .map
                .iter()
                .filter(|(name, _)| {
                    prefix.is_empty()
                        || (name.len() > prefix.len()
                            && name.starts_with(prefix)
                            && name.as_bytes()[prefix.len()] == b'.')
                })
                .map(|(_, log)| log.clone())
                .collect()
        };
        let mut found = Vec::new();
        for log in candidates {
            let log = lock(&log);
            if log.last_publish_ms >= since_ms {
                if found.len() == MAX_DIRECTORY_TOPICS {
                    return Ok(Directory::Unknown("too many topics changed"));
                }
                found.push(log.name.clone());
            }
        }
        Ok(Directory::Topics(found))
    }

    async fn seek(&self, topic: &str, since_ms: u64, max: u64) -> Result<Seek, BrokerError> {
        let log = self.topic(topic);
        let mut log = lock(&log);
        log.trim(Instant::now());
        let held = log.history.iter().map(|(o, _, stamp, _)| (*o, *stamp));
        Ok(seek_in(log.position(), held, since_ms, max))
    }

    fn is_ready(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Message>>);

    impl MessageSink for Collect {
        fn deliver(&self, message: Message) {
            self.0.lock().unwrap().push(message);
        }

        fn gap(&self, _topic: &str, _resume: &Position, _lost: crate::Lost) {
            unreachable!("the memory broker never loses messages");
        }
    }

    fn broker(history_size: usize) -> (MemoryBroker, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let config = MemoryConfig::uniform(HistoryLimits {
            size: history_size,
            ttl: Duration::from_secs(60),
        });
        (MemoryBroker::new(config, sink.clone()), sink)
    }

    #[tokio::test]
    async fn offsets_are_contiguous_per_topic_and_only_subscribed_topics_are_delivered() {
        let (b, sink) = broker(0);
        b.subscribe("a").await.unwrap();
        for i in 1..=3u64 {
            assert_eq!(b.publish("a", Bytes::from("1")).await.unwrap().offset, i);
        }
        assert_eq!(b.publish("b", Bytes::from("1")).await.unwrap().offset, 1);
        let got = sink.0.lock().unwrap();
        let offsets: Vec<_> = got
            .iter()
            .map(|m| m.position.as_ref().unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![1, 2, 3]);
        assert!(got.iter().all(|m| &*m.topic == "a"));
    }

    #[tokio::test]
    async fn unsubscribed_topic_is_not_delivered() {
        let (b, sink) = broker(0);
        b.subscribe("a").await.unwrap();
        b.unsubscribe("a").await.unwrap();
        b.publish("a", Bytes::from("1")).await.unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn replay_covers_history_and_refuses_beyond_it() {
        let (b, _) = broker(3);
        let mut epoch = None;
        for _ in 0..5 {
            epoch = Some(b.publish("t", Bytes::from("{}")).await.unwrap().epoch);
        }
        let epoch = epoch.unwrap();
        let r = b.replay("t", epoch.as_str(), 2, 100).await.unwrap();
        assert!(r.complete);
        let offsets: Vec<_> = r
            .messages
            .iter()
            .map(|m| m.position.as_ref().unwrap().offset)
            .collect();
        assert_eq!(offsets, vec![3, 4, 5]);
        assert!(
            !b.replay("t", epoch.as_str(), 1, 100)
                .await
                .unwrap()
                .complete
        );
        assert!(!b.replay("t", "other", 4, 100).await.unwrap().complete);
        assert!(
            !b.replay("t", epoch.as_str(), 9, 100)
                .await
                .unwrap()
                .complete
        );
    }

    fn offsets(r: &Replay) -> Vec<Offset> {
        r.messages
            .iter()
            .map(|m| m.position.as_ref().unwrap().offset)
            .collect()
    }

    fn read(epoch: Option<&str>, since: Option<Offset>, limit: usize) -> HistoryRead<'_> {
        HistoryRead {
            epoch,
            since,
            limit,
            whole: false,
        }
    }

    #[tokio::test]
    async fn history_pages_report_whether_they_reach_back_to_since() {
        let (b, _) = broker(5);
        let mut epoch = None;
        for i in 0..8 {
            let data = Bytes::from(format!("{{\"i\":{i}}}"));
            epoch = Some(b.publish("t", data).await.unwrap().epoch);
        }
        let epoch = epoch.unwrap();
        let e = Some(epoch.as_str());
        // Offsets 4..=8 are held.
        let r = b.history("t", read(e, Some(3), 100)).await.unwrap();
        assert!(r.complete);
        assert_eq!(offsets(&r), vec![4, 5, 6, 7, 8]);
        assert_eq!(&r.messages[0].data[..], br#"{"i":3}"#);
        assert_eq!(r.position.offset, 8);
        // Paging: at most `limit`, oldest first; the page is complete though more follow.
        let r = b.history("t", read(e, Some(4), 2)).await.unwrap();
        assert!(r.complete);
        assert_eq!(offsets(&r), vec![5, 6]);
        // Trimmed: what is held comes back, but the page is not complete.
        let r = b.history("t", read(e, Some(1), 100)).await.unwrap();
        assert!(!r.complete);
        assert_eq!(offsets(&r), vec![4, 5, 6, 7, 8]);
        // Another epoch: read from the start of history, never complete.
        let r = b
            .history("t", read(Some("other"), Some(6), 100))
            .await
            .unwrap();
        assert!(!r.complete);
        assert_eq!(offsets(&r), vec![4, 5, 6, 7, 8]);
        // No since: the newest `limit` messages.
        let r = b.history("t", read(None, None, 2)).await.unwrap();
        assert!(r.complete);
        assert_eq!(offsets(&r), vec![7, 8]);
        let r = b.history("t", read(None, None, 6)).await.unwrap();
        assert!(!r.complete, "offset 3 is gone");
        assert_eq!(offsets(&r), vec![4, 5, 6, 7, 8]);
        // Up to date, and beyond the latest offset.
        let r = b.history("t", read(e, Some(8), 100)).await.unwrap();
        assert!(r.complete && r.messages.is_empty());
        let r = b.history("t", read(e, Some(9), 100)).await.unwrap();
        assert!(!r.complete && r.messages.is_empty());
        // A whole read that does not fit in its limit gets nothing.
        let r = b.replay("t", epoch.as_str(), 4, 3).await.unwrap();
        assert!(!r.complete && r.messages.is_empty());
        let r = b.replay("t", epoch.as_str(), 4, 4).await.unwrap();
        assert!(r.complete);
        assert_eq!(offsets(&r), vec![5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn history_policy_is_per_topic() {
        let sink = Arc::new(Collect::default());
        let policy = |topic: &str| {
            if topic.starts_with("chat.") {
                HistoryLimits {
                    size: 2,
                    ttl: Duration::from_secs(60),
                }
            } else {
                HistoryLimits::NONE
            }
        };
        let b = MemoryBroker::new(
            MemoryConfig {
                history: Arc::new(policy),
                directory_window: Duration::from_secs(3600),
            },
            sink,
        );
        for _ in 0..3 {
            b.publish("chat.a", Bytes::from("1")).await.unwrap();
            b.publish("news", Bytes::from("1")).await.unwrap();
        }
        let chat = b.history("chat.a", read(None, Some(0), 10)).await.unwrap();
        assert_eq!(offsets(&chat), vec![2, 3]);
        let news = b.history("news", read(None, Some(0), 10)).await.unwrap();
        assert!(news.messages.is_empty() && !news.complete);
        let epoch = news.position.epoch;
        assert!(
            b.replay("news", epoch.as_str(), 3, 10)
                .await
                .unwrap()
                .complete
        );
        assert!(
            !b.replay("news", epoch.as_str(), 2, 10)
                .await
                .unwrap()
                .complete
        );
    }

    #[tokio::test]
    async fn history_respects_the_ttl() {
        let sink = Arc::new(Collect::default());
        let b = MemoryBroker::new(
            MemoryConfig::uniform(HistoryLimits {
                size: 10,
                ttl: Duration::from_millis(50),
            }),
            sink,
        );
        let epoch = b.publish("t", Bytes::from("1")).await.unwrap().epoch;
        tokio::time::sleep(Duration::from_millis(80)).await;
        b.publish("t", Bytes::from("2")).await.unwrap();
        let r = b.history("t", read(None, Some(0), 10)).await.unwrap();
        assert!(!r.complete);
        assert_eq!(offsets(&r), vec![2]);
        assert!(b.replay("t", epoch.as_str(), 1, 10).await.unwrap().complete);
        assert!(!b.replay("t", epoch.as_str(), 0, 10).await.unwrap().complete);
    }
}
