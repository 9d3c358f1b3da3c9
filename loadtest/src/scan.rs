//! A tiny scanner for the server frames the load tool cares about.
//!
//! The hot path reads every delivered message, so it does not build a JSON tree: it checks the
//! fixed prefix the gateway writes (`{"op":"message","topic":…`) and pulls out the four fields it
//! needs by position — the topic (borrowed), the `offset`, and the `t` (send time) and `s`
//! (sequence) fields of the payload the publisher wrote. No allocation, no copy.

/// What kind of server frame this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `{"op":"message",…}`
    Message,
    /// `{"op":"ack",…}`
    Ack,
    /// `{"op":"error",…}`
    Error,
    /// `{"op":"pong",…}`
    Pong,
    /// Anything else.
    Other,
}

/// The fields of one server frame the tool uses; `topic` borrows from the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned<'a> {
    /// Frame kind.
    pub kind: Kind,
    /// The `topic` string, raw (topics never need escaping: `[A-Za-z0-9_.:-]`).
    pub topic: &'a [u8],
    /// The `offset`, when present (messages published through a gateway, acks).
    pub offset: Option<u64>,
    /// `data.t`: the publisher's send time in ns since the Unix epoch.
    pub t: Option<u64>,
    /// `data.s`: the publisher's per-topic sequence number.
    pub s: Option<u64>,
}

/// Finds `needle` in `hay` starting at `from`; returns the index just past it.
#[inline]
fn find_after(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    if from >= hay.len() || needle.is_empty() {
        return None;
    }
    let first = needle[0];
    let last_start = hay.len().checked_sub(needle.len())?;
    let mut i = from;
    while i <= last_start {
        // Jump to the next candidate first byte.
        match hay[i..=last_start].iter().position(|&b| b == first) {
            None => return None,
            Some(p) => i += p,
        }
        if &hay[i..i + needle.len()] == needle {
            return Some(i + needle.len());
        }
        i += 1;
    }
    None
}

/// Parses the unsigned decimal at `at`.
#[inline]
fn parse_u64(hay: &[u8], at: usize) -> Option<u64> {
    let mut n: u64 = 0;
    let mut any = false;
    for &b in hay.get(at..)? {
        if b.is_ascii_digit() {
            n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
            any = true;
        } else {
            break;
        }
    }
    any.then_some(n)
}

/// Scans one text frame from the server.
pub fn scan(frame: &[u8]) -> Scanned<'_> {
    let mut out = Scanned {
        kind: Kind::Other,
        topic: &[],
        offset: None,
        t: None,
        s: None,
    };
    // The gateway always writes `op` first; tolerate whitespace-free JSON only (that is what it
    // sends), and fall back to a search otherwise.
    const OP: &[u8] = b"{\"op\":\"";
    let op_start = if frame.starts_with(OP) {
        OP.len()
    } else {
        match find_after(frame, 0, b"\"op\":\"") {
            Some(i) => i,
            None => return out,
        }
    };
    let rest = &frame[op_start..];
    out.kind = if rest.starts_with(b"message\"") {
        Kind::Message
    } else if rest.starts_with(b"ack\"") {
        Kind::Ack
    } else if rest.starts_with(b"error\"") {
        Kind::Error
    } else if rest.starts_with(b"pong\"") {
        Kind::Pong
    } else {
        Kind::Other
    };
    if !matches!(out.kind, Kind::Message | Kind::Ack) {
        return out;
    }
    let mut pos = op_start;
    if let Some(i) = find_after(frame, pos, b"\"topic\":\"") {
        let end = frame[i..].iter().position(|&b| b == b'"').map(|e| i + e);
        if let Some(end) = end {
            out.topic = &frame[i..end];
            pos = end + 1;
        }
    }
    // In a message, everything after `"data":` is the publisher's payload: look for the offset
    // only before it, so a payload cannot fake one.
    let data_at = if out.kind == Kind::Message {
        find_after(frame, pos, b"\"data\":")
    } else {
        None
    };
    let header_end = data_at.unwrap_or(frame.len());
    if let Some(i) = find_after(&frame[..header_end], pos, b"\"offset\":") {
        out.offset = parse_u64(frame, i);
    }
    if let Some(d) = data_at {
        if let Some(i) = find_after(frame, d, b"\"t\":") {
            out.t = parse_u64(frame, i);
            if let Some(j) = find_after(frame, i, b"\"s\":") {
                out.s = parse_u64(frame, j);
            }
        } else if let Some(j) = find_after(frame, d, b"\"s\":") {
            out.s = parse_u64(frame, j);
        }
    }
    out
}

/// Scans a message that is the publisher's body alone (nchan delivers exactly what was posted):
/// `topic` is the subscription's, there is no offset, and `t` and `s` must open the body the way
/// [`write_payload`] writes them, so anything else counts as a bad frame.
pub fn scan_raw<'a>(body: &[u8], topic: &'a [u8]) -> Scanned<'a> {
    let mut out = Scanned {
        kind: Kind::Message,
        topic,
        offset: None,
        t: None,
        s: None,
    };
    const T: &[u8] = b"{\"t\":";
    if body.starts_with(T) {
        out.t = parse_u64(body, T.len());
        if let Some(j) = find_after(body, T.len(), b",\"s\":") {
            out.s = parse_u64(body, j);
        }
    }
    out
}

/// Builds the publisher's payload: `{"t":<ns>,"s":<seq>,"pad":"xxx…"}`, padded so the whole JSON is
/// `size` bytes (or as short as possible when `size` is smaller than the fixed part).
pub fn write_payload(buf: &mut Vec<u8>, t_ns: u64, seq: u64, size: usize) {
    buf.clear();
    buf.extend_from_slice(b"{\"t\":");
    buf.extend_from_slice(itoa::Buffer::new().format(t_ns).as_bytes());
    buf.extend_from_slice(b",\"s\":");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(b",\"pad\":\"");
    let fixed = buf.len() + 2;
    let end = buf.len() + size.saturating_sub(fixed);
    fill_pad(buf, end, seq);
    buf.extend_from_slice(b"\"}");
}

/// Fills `buf` up to `end` bytes with text shaped like a dashboard update (`bid=1234.56 ask=…`):
/// repeated field names, varying digits. It compresses about as well as real JSON payloads do
/// (3–4× with DEFLATE), where a run of one letter would make `--deflate` look far better than it is.
fn fill_pad(buf: &mut Vec<u8>, end: usize, seq: u64) {
    const FIELDS: [&[u8]; 6] = [b"bid=", b"ask=", b"last=", b"vol=", b"chg=", b"ts="];
    let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut i = 0;
    while buf.len() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf.extend_from_slice(FIELDS[i % FIELDS.len()]);
        buf.extend_from_slice(itoa::Buffer::new().format(x % 100_000).as_bytes());
        buf.extend_from_slice(b".");
        buf.extend_from_slice(itoa::Buffer::new().format(x >> 48 & 0xff).as_bytes());
        buf.push(b' ');
        i += 1;
    }
    buf.truncate(end);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_a_gateway_message() {
        let f = br#"{"op":"message","topic":"bench.7","offset":42,"data":{"t":1700000000123456789,"s":41,"pad":"xx"}}"#;
        let s = scan(f);
        assert_eq!(s.kind, Kind::Message);
        assert_eq!(s.topic, b"bench.7");
        assert_eq!(s.offset, Some(42));
        assert_eq!(s.t, Some(1_700_000_000_123_456_789));
        assert_eq!(s.s, Some(41));
    }

    #[test]
    fn message_without_offset_and_foreign_data() {
        // A raw Redis publish: no offset; a payload that mentions "offset" must not be taken.
        let f = br#"{"op":"message","topic":"a","data":{"offset":7,"x":[1,2]}}"#;
        let s = scan(f);
        assert_eq!(s.kind, Kind::Message);
        assert_eq!(s.offset, None);
        assert_eq!(s.t, None);
        assert_eq!(s.s, None);
        let f = br#"{"op":"message","topic":"a","data":{"s":9}}"#;
        assert_eq!(scan(f).s, Some(9));
    }

    #[test]
    fn scans_ack_error_pong() {
        let f = br#"{"op":"ack","id":1,"topic":"t.a","epoch":"00ab","offset":41}"#;
        let s = scan(f);
        assert_eq!(s.kind, Kind::Ack);
        assert_eq!(s.topic, b"t.a");
        assert_eq!(s.offset, Some(41));
        assert_eq!(
            scan(br#"{"op":"error","id":1,"code":"forbidden","message":"no"}"#).kind,
            Kind::Error
        );
        assert_eq!(scan(br#"{"op":"pong","id":5}"#).kind, Kind::Pong);
        assert_eq!(scan(b"garbage").kind, Kind::Other);
        assert_eq!(scan(b"").kind, Kind::Other);
        // Spaces before op: found by search.
        assert_eq!(
            scan(br#"{ "op":"ack","topic":"x","offset":3}"#).offset,
            Some(3)
        );
    }

    #[test]
    fn rejects_overflow_and_truncation() {
        let f = br#"{"op":"message","topic":"a","offset":99999999999999999999999,"data":{"t":"#;
        let s = scan(f);
        assert_eq!(s.offset, None);
        assert_eq!(s.t, None);
        let f = br#"{"op":"message","topic":"unterminated"#;
        assert_eq!(scan(f).topic, b"");
    }

    #[test]
    fn scans_a_bare_body() {
        let mut buf = Vec::new();
        write_payload(&mut buf, 1_700_000_000_000_000_001, 77, 256);
        let s = scan_raw(&buf, b"bench.3");
        assert_eq!(s.kind, Kind::Message);
        assert_eq!(s.topic, b"bench.3");
        assert_eq!(
            (s.t, s.s, s.offset),
            (Some(1_700_000_000_000_000_001), Some(77), None)
        );
        // Not the publisher's body: no `t`, so the receive loop counts it as bad.
        let s = scan_raw(br#"{"op":"message","topic":"a"}"#, b"a");
        assert_eq!((s.t, s.s), (None, None));
        assert_eq!(scan_raw(b"", b"a").t, None);
    }

    #[test]
    fn payload_has_exact_size_and_round_trips() {
        let mut buf = Vec::new();
        for size in [0usize, 10, 64, 256, 1000] {
            write_payload(&mut buf, 1_700_000_000_000_000_000, 12345, size);
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["t"], 1_700_000_000_000_000_000u64);
            assert_eq!(v["s"], 12345);
            if size >= 64 {
                assert_eq!(buf.len(), size);
            }
        }
        let mut frame = br#"{"op":"message","topic":"t","offset":1,"data":"#.to_vec();
        write_payload(&mut buf, 5, 6, 256);
        frame.extend_from_slice(&buf);
        frame.push(b'}');
        let s = scan(&frame);
        assert_eq!((s.t, s.s, s.offset), (Some(5), Some(6), Some(1)));
    }
}
