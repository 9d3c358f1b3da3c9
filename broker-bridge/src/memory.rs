//! The embedded broker: one node, no Redis, the default.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{Broker, BrokerError, Epoch, Message, MessageSink, Offset, Position, Replay};

/// Settings of the in-memory broker.
#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// Messages kept per topic for recovery (0 keeps none).
    pub history_size: usize,
    /// How long a message stays in history.
    pub history_ttl: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            history_size: 0,
            history_ttl: Duration::from_secs(300),
        }
    }
}

/// A broker inside the node's own process.
///
/// Publishing assigns the offset and hands the message to the sink under the topic's lock, so the sink
/// sees each topic in offset order even with many concurrent publishers. A topic nobody subscribes to
/// and nobody published to for longer than the history TTL is forgotten, which bounds memory whatever
/// topic names publishers invent; publishing to it again starts a new epoch.
pub struct MemoryBroker {
    config: MemoryConfig,
    sink: Arc<dyn MessageSink>,
    topics: Mutex<Topics>,
}

struct Topics {
    map: HashMap<Arc<str>, Arc<Mutex<TopicLog>>>,
    last_sweep: Instant,
}

struct TopicLog {
    name: Arc<str>,
    epoch: Epoch,
    last: Offset,
    subscribed: bool,
    last_publish: Instant,
    history: VecDeque<(Offset, Instant, Bytes)>,
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
            }),
        }
    }

    fn topic(&self, name: &str) -> Arc<Mutex<TopicLog>> {
        let mut topics = lock(&self.topics);
        let now = Instant::now();
        let idle_limit = self.config.history_ttl.max(Duration::from_secs(60));
        if now.duration_since(topics.last_sweep) > idle_limit / 2 {
            topics.last_sweep = now;
            topics.map.retain(|_, log| {
                let log = lock(log);
                log.subscribed || now.duration_since(log.last_publish) < idle_limit
            });
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
            history: VecDeque::new(),
        }));
        topics.map.insert(name, log.clone());
        log
    }

    fn trim(&self, log: &mut TopicLog, now: Instant) {
        while log.history.len() > self.config.history_size {
            log.history.pop_front();
        }
        while let Some((_, at, _)) = log.history.front() {
            if now.duration_since(*at) <= self.config.history_ttl {
                break;
            }
            log.history.pop_front();
        }
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
        let position = Position {
            epoch: log.epoch.clone(),
            offset: log.last,
        };
        if self.config.history_size > 0 {
            let offset = log.last;
            log.history.push_back((offset, now, data.clone()));
            self.trim(&mut log, now);
        }
        if log.subscribed {
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

    async fn position(&self, topic: &str) -> Result<Position, BrokerError> {
        let log = self.topic(topic);
        let log = lock(&log);
        Ok(Position {
            epoch: log.epoch.clone(),
            offset: log.last,
        })
    }

    async fn replay(
        &self,
        topic: &str,
        epoch: &str,
        since: Offset,
        limit: usize,
    ) -> Result<Replay, BrokerError> {
        let log = self.topic(topic);
        let mut log = lock(&log);
        self.trim(&mut log, Instant::now());
        let position = Position {
            epoch: log.epoch.clone(),
            offset: log.last,
        };
        let oldest_kept = log.history.front().map_or(log.last + 1, |(o, _, _)| *o);
        let complete = epoch == log.epoch.as_str()
            && since <= log.last
            && since + 1 >= oldest_kept
            && (log.last - since) as usize <= limit;
        let messages = if complete {
            log.history
                .iter()
                .filter(|(o, _, _)| *o > since)
                .map(|(o, _, data)| Message {
                    topic: log.name.clone(),
                    position: Some(Position {
                        epoch: log.epoch.clone(),
                        offset: *o,
                    }),
                    data: data.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Replay {
            position,
            complete,
            messages,
        })
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
    }

    fn broker(history_size: usize) -> (MemoryBroker, Arc<Collect>) {
        let sink = Arc::new(Collect::default());
        let config = MemoryConfig {
            history_size,
            history_ttl: Duration::from_secs(60),
        };
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
}
