//! Canaries: messages a node sends to itself through Redis, to know that the whole path
//! (command connection → Redis → subscription connection) works, and how fast.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Canaries in flight: what was sent when, to measure the round trip.
pub(super) struct Canaries {
    /// The node's private canary channel.
    pub(super) channel: String,
    next: u64,
    sent: VecDeque<(u64, Instant)>,
}

impl Canaries {
    pub(super) fn new(channel: String) -> Self {
        Canaries {
            channel,
            next: 1,
            sent: VecDeque::new(),
        }
    }

    /// Records a canary about to be sent; returns its payload.
    pub(super) fn send(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.sent.push_back((seq, Instant::now()));
        while self.sent.len() > 32 {
            self.sent.pop_front();
        }
        seq
    }

    /// A canary came back: its round trip, if it is one this node sent.
    pub(super) fn arrived(&mut self, payload: &[u8]) -> Option<Duration> {
        let seq: u64 = std::str::from_utf8(payload).ok()?.parse().ok()?;
        let i = self.sent.iter().position(|(s, _)| *s == seq)?;
        let (_, at) = self.sent.remove(i)?;
        Some(at.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_canaries_this_node_sent_count() {
        let mut c = Canaries::new("ch".into());
        let seq = c.send();
        assert!(c.arrived(b"999").is_none());
        assert!(c.arrived(seq.to_string().as_bytes()).is_some());
        assert!(c.arrived(seq.to_string().as_bytes()).is_none(), "once");
    }
}
