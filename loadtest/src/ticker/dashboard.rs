//! One dashboard: a WebSocket client subscribed to every price with one wildcard subscription,
//! reading as fast as it can or at a dashboard's pace, and checking each message against what it
//! already holds: per topic, offsets must only grow (an offset at or below the last one is an order
//! violation), and how old each value is when it arrives (`data.t`) is recorded.
//!
//! The latest offset of each topic is kept in atomics the run can read while the dashboard is
//! still reading, to tell when a slow dashboard holds every final value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fastwebsockets::{Frame, OpCode, WebSocket};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ramp::end_label;
use crate::scan::{Kind, scan};
use crate::stats::{self, record};
use crate::ws::{Conn, End, Ws, now_ns};

/// How fast a dashboard reads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as it can.
    Fast,
    /// At most this many frames per second on average (bursts of at most 10 ms of them).
    Rate(f64),
    /// Sleeps this long after each frame.
    Pause(Duration),
}

/// How much reading a [`Pace::Rate`] dashboard may catch up at once after a quiet spell.
const MAX_BURST: Duration = Duration::from_millis(10);

/// Topic names `PREFIX0`, `PREFIX1`, … mapped back to their index without a lookup table.
#[derive(Debug, Clone)]
pub struct TopicIndex {
    prefix: Box<[u8]>,
    count: usize,
}

impl TopicIndex {
    /// Names `prefix` followed by `0 .. count` in decimal.
    pub fn new(prefix: &str, count: usize) -> Self {
        TopicIndex {
            prefix: prefix.as_bytes().into(),
            count,
        }
    }

    /// The name of topic `i`.
    pub fn name(&self, i: usize) -> String {
        format!("{}{i}", String::from_utf8_lossy(&self.prefix))
    }

    /// The index of a topic name; `None` for any name that is not exactly one of ours.
    pub fn index(&self, topic: &[u8]) -> Option<usize> {
        let digits = topic.strip_prefix(&*self.prefix)?;
        if digits.is_empty() || digits.len() > 9 || (digits.len() > 1 && digits[0] == b'0') {
            return None;
        }
        let mut i = 0usize;
        for &d in digits {
            if !d.is_ascii_digit() {
                return None;
            }
            i = i * 10 + usize::from(d - b'0');
        }
        (i < self.count).then_some(i)
    }
}

/// What a dashboard holds, readable while it runs: the latest offset of each topic (0: none yet).
pub struct Board {
    last: Vec<AtomicU64>,
}

impl Board {
    /// A board for `topics` topics, holding nothing.
    pub fn new(topics: usize) -> Arc<Self> {
        Arc::new(Board {
            last: (0..topics).map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// The latest offset received of topic `t`.
    pub fn last(&self, t: usize) -> u64 {
        self.last[t].load(Ordering::Acquire)
    }

    /// Whether every topic is at `finals[t]` (stops at the first that is not: the run asks this
    /// every millisecond while it waits for slow dashboards to catch up).
    pub fn holds(&self, finals: &[u64]) -> bool {
        finals.iter().enumerate().all(|(t, &f)| self.last(t) >= f)
    }
}

/// What a dashboard saw, once it stopped.
#[derive(Debug)]
pub struct Tally {
    /// Message frames received.
    pub frames: u64,
    /// Per topic: messages received in order (violations excluded).
    pub counts: Vec<u64>,
    /// Messages whose offset was not above the last one of their topic.
    pub violations: u64,
    /// The first violation, described.
    pub first_violation: Option<String>,
    /// Message frames of an unknown topic, or without an offset or a send time.
    pub bad_frames: u64,
    /// `error` frames.
    pub errors: u64,
    /// Age of each value when it arrived: receive time − publish time, ns.
    pub age: Histogram<u64>,
    /// How it ended (`stopped` when the run stopped it).
    pub end: String,
}

/// Reads `conn` at `pace` until `stop`, keeping `board` up to date.
pub async fn run(
    conn: Conn,
    pace: Pace,
    names: Arc<TopicIndex>,
    board: Arc<Board>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally {
        frames: 0,
        counts: vec![0; names.count],
        violations: 0,
        first_violation: None,
        bad_frames: 0,
        errors: 0,
        age: stats::new_hist(),
        end: String::new(),
    };
    let end = match conn.ws {
        Ws::Plain(mut ws) => read(&mut ws, pace, &names, &board, &stop, &mut tally).await,
        Ws::Tls(mut ws) => read(&mut *ws, pace, &names, &board, &stop, &mut tally).await,
        // Dashboards never offer permessage-deflate.
        Ws::Deflate(_) | Ws::DeflateTls(_) => {
            End::Failed("permessage-deflate was not offered".into())
        }
    };
    tally.end = end_label(&end);
    tally
}

async fn read<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocket<S>,
    pace: Pace,
    names: &TopicIndex,
    board: &Board,
    stop: &CancellationToken,
    tally: &mut Tally,
) -> End {
    let mut next = Instant::now();
    loop {
        let wait = match pace {
            Pace::Fast => None,
            Pace::Rate(_) => (next > Instant::now()).then_some(next),
            Pace::Pause(d) => (tally.frames > 0).then(|| Instant::now() + d),
        };
        if let Some(at) = wait {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return End::Stopped,
                _ = tokio::time::sleep_until(at) => {}
            }
        }
        let frame = tokio::select! {
            biased;
            _ = stop.cancelled() => return End::Stopped,
            f = ws.read_frame() => f,
        };
        if let Pace::Rate(r) = pace {
            let now = Instant::now();
            next = next.max(now.checked_sub(MAX_BURST).unwrap_or(now))
                + Duration::from_secs_f64(1.0 / r);
        }
        match frame {
            Err(e) => return End::Failed(e.to_string()),
            Ok(f) => match f.opcode {
                OpCode::Text => on_text(&f, names, board, tally),
                OpCode::Close => return End::ServerClosed(close_code(&f)),
                _ => {}
            },
        }
    }
}

fn close_code(f: &Frame<'_>) -> u16 {
    if f.payload.len() >= 2 {
        u16::from_be_bytes([f.payload[0], f.payload[1]])
    } else {
        1005
    }
}

/// Checks one text frame against what the dashboard holds.
#[inline]
fn on_text(f: &Frame<'_>, names: &TopicIndex, board: &Board, tally: &mut Tally) {
    let now = now_ns();
    let s = scan(&f.payload);
    match s.kind {
        Kind::Message => {}
        Kind::Error => {
            tally.errors += 1;
            return;
        }
        _ => return,
    }
    tally.frames += 1;
    let (Some(t), Some(offset), Some(sent)) = (names.index(s.topic), s.offset, s.t) else {
        tally.bad_frames += 1;
        return;
    };
    record(&mut tally.age, now.saturating_sub(sent));
    // This task is the board's only writer: a load and a store are enough.
    let last = board.last[t].load(Ordering::Relaxed);
    if offset <= last {
        tally.violations += 1;
        if tally.first_violation.is_none() {
            tally.first_violation = Some(format!(
                "{}: offset {offset} after {last}",
                String::from_utf8_lossy(s.topic)
            ));
        }
        return;
    }
    board.last[t].store(offset, Ordering::Release);
    tally.counts[t] += 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_map_back_to_their_index_and_nothing_else() {
        let ix = TopicIndex::new("prices.t", 1000);
        assert_eq!(ix.name(42), "prices.t42");
        assert_eq!(ix.index(b"prices.t0"), Some(0));
        assert_eq!(ix.index(b"prices.t999"), Some(999));
        for bad in [
            &b"prices.t1000"[..],
            b"prices.t",
            b"prices.t01",
            b"prices.t1x",
            b"prices.u1",
            b"prices.t99999999999999999999",
        ] {
            assert_eq!(ix.index(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn offsets_must_grow_per_topic() {
        let ix = TopicIndex::new("p.t", 2);
        let board = Board::new(2);
        let mut tally = Tally {
            frames: 0,
            counts: vec![0; 2],
            violations: 0,
            first_violation: None,
            bad_frames: 0,
            errors: 0,
            age: stats::new_hist(),
            end: String::new(),
        };
        let frames = [
            r#"{"op":"message","topic":"p.t0","offset":5,"data":{"t":1,"s":1}}"#,
            r#"{"op":"message","topic":"p.t1","offset":2,"data":{"t":1,"s":1}}"#,
            r#"{"op":"message","topic":"p.t0","offset":9,"data":{"t":1,"s":2}}"#,
            r#"{"op":"message","topic":"p.t0","offset":9,"data":{"t":1,"s":2}}"#,
            r#"{"op":"message","topic":"p.t1","offset":1,"data":{"t":1,"s":2}}"#,
            r#"{"op":"message","topic":"p.t7","offset":1,"data":{"t":1,"s":2}}"#,
            r#"{"op":"message","topic":"p.t1","data":{"t":1,"s":2}}"#,
            r#"{"op":"error","code":"forbidden","message":"no"}"#,
        ];
        for f in frames {
            let frame = Frame::text(fastwebsockets::Payload::Borrowed(f.as_bytes()));
            on_text(&frame, &ix, &board, &mut tally);
        }
        assert_eq!((tally.frames, tally.violations), (7, 2));
        assert_eq!((tally.bad_frames, tally.errors), (2, 1));
        assert_eq!(tally.counts, [2, 1]);
        assert_eq!((board.last(0), board.last(1)), (9, 2));
        assert_eq!(
            tally.first_violation.as_deref(),
            Some("p.t0: offset 9 after 9")
        );
        assert!(!board.holds(&[9, 3]));
        assert!(board.holds(&[9, 2]));
        assert_eq!(tally.age.len(), 5);
    }
}
