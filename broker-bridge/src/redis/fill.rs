//! Filling holes in a topic's delivery from history, until it works.
//!
//! A hole appears when the subscription connection was replaced, when Redis dropped one
//! subscription, when the node had to drop pushes it could not keep up with, or when a message's
//! epoch is new to the node. The topic holds its live messages back ([`super::topics`]) while a
//! fill reads history after the last message delivered; the read is retried with backoff for as
//! long as it fails (a command connection that went stale during an outage fails its first
//! commands), so a hole that history covers is always filled. What history cannot cover is
//! signalled to the topic's subscribers as a gap.

use std::sync::Arc;

use futures_util::StreamExt;

use super::Inner;
use super::retry::{backoff, log_attempt};
use super::topics::FillFrom;
use crate::HistoryRead;

/// How many messages one fill read asks history for.
const MAX_FILL: usize = 10_000;
/// Topics filled at the same time after a reconnect.
const PARALLEL: usize = 16;

/// Fills the given topics (each until done), a few at a time.
pub(super) async fn fill_many(inner: Arc<Inner>, topics: Vec<Arc<str>>) {
    futures_util::stream::iter(topics)
        .map(|topic| fill(inner.clone(), topic))
        .buffer_unordered(PARALLEL)
        .for_each(|()| async {})
        .await;
}

/// Starts filling topics in the background.
pub(super) fn spawn(inner: &Arc<Inner>, topics: Vec<Arc<str>>) {
    if topics.is_empty() {
        return;
    }
    tokio::spawn(fill_many(inner.clone(), topics));
}

/// Fills one topic's hole; returns when the topic is live again or no longer wanted.
pub(super) async fn fill(inner: Arc<Inner>, topic: Arc<str>) {
    let mut attempt = 0u32;
    loop {
        if inner.health.is_closed() {
            return;
        }
        let from = match inner.topics.fill_from(&topic) {
            FillFrom::Gone => return,
            FillFrom::After(from) => from,
        };
        let read = match &from {
            Some(p) => HistoryRead {
                epoch: Some(p.epoch.as_str()),
                since: Some(p.offset),
                limit: MAX_FILL,
                whole: true,
            },
            // Nothing known yet: learn the position and the salt only.
            None => HistoryRead {
                epoch: None,
                since: None,
                limit: 0,
                whole: false,
            },
        };
        match inner.history(&topic, read).await {
            Ok((replay, salt)) => {
                attempt = 0;
                if inner.topics.fill_read(&topic, from.as_ref(), replay, salt) {
                    return;
                }
            }
            Err(e) => {
                log_attempt(attempt, "gap fill", &format!("{topic}: {e}"));
                tokio::time::sleep(backoff(attempt)).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}
