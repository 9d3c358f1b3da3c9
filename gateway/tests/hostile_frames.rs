//! Hostile clients' frames: oversized and endless fragmented messages (closed from their header or
//! once past the cap, never buffered), invalid UTF-8 (1007) and bad control frames (1002). What every
//! test checks while they misbehave, and how to see the figures: `hostile_support`.

mod common;
mod hostile_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{RECV_TIMEOUT, RawReadError, RawWs, Server, masked_frame, op};
use hostile_support::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

/// A frame header written by hand: `len_code` 0..=125, 126 (16-bit length) or 127 (64-bit
/// length) followed by `ext` as the extended length, then a masking key. No payload.
fn raw_header(fin: bool, opcode: u8, len_code: u8, ext: &[u8]) -> Vec<u8> {
    let mut out = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | len_code];
    out.extend_from_slice(ext);
    out.extend_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    out
}

/// Waits for a close frame with `code`, then for the TCP connection to end.
async fn expect_close_and_eof(ws: &mut RawWs, code: u16, what: &str) {
    let frames = ws.expect_close(code, RECV_TIMEOUT).await;
    assert!(
        frames.iter().all(|f| f.opcode == op::PING),
        "{what}: only pings may come before the close, got {frames:?}"
    );
    ws.expect_eof(RECV_TIMEOUT, 1 << 16).await;
}

// ---------------------------------------------------------------------------------------------
// Frame abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_are_refused_from_their_header_without_buffering() {
    const TEST: &str = "oversized frames";
    const LIMIT: u64 = 65536; // limits.max_message_size, the default
    const STREAMERS: usize = 20;
    const STREAM_BYTES: usize = 16 << 20;
    let _serial = serial().await;
    let server = Server::start().await;
    let watch = Watch::start(&server).await;

    // Declared lengths past the limit, with no payload behind them: the server answers from the
    // header alone instead of waiting for (or reserving) the payload. Code 0: no answer expected.
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "64-bit length 2^63-1",
            raw_header(true, op::TEXT, 127, &(i64::MAX as u64).to_be_bytes()),
            1009,
        ),
        (
            "64-bit length 2^64-1 (most significant bit set)",
            raw_header(true, op::BINARY, 127, &u64::MAX.to_be_bytes()),
            1009,
        ),
        (
            "64-bit length 1 GiB",
            raw_header(true, op::TEXT, 127, &(1u64 << 30).to_be_bytes()),
            1009,
        ),
        (
            "16-bit length 65535 (within the limit)",
            raw_header(true, op::TEXT, 126, &65535u16.to_be_bytes()),
            0, // within the limit: no close, the server waits for the payload
        ),
        (
            "64-bit length of the limit plus one",
            raw_header(true, op::TEXT, 127, &(LIMIT + 1).to_be_bytes()),
            1009,
        ),
        (
            "1 GiB continuation of a fragmented message",
            {
                let mut b = masked_frame(false, op::TEXT, b"{\"op\":");
                b.extend(raw_header(
                    false,
                    op::CONTINUATION,
                    127,
                    &(1u64 << 30).to_be_bytes(),
                ));
                b
            },
            1009,
        ),
    ];
    for (what, bytes, code) in cases {
        let started = Instant::now();
        let mut ws = raw(&server).await;
        ws.stream.write_all(&bytes).await.expect("write header");
        if code == 0 {
            // Nothing comes back until the payload does.
            match ws.read_frame(Duration::from_millis(300)).await {
                Err(RawReadError::Timeout) => {}
                other => panic!("{what}: expected the server to wait, got {other:?}"),
            }
            continue;
        }
        expect_close_and_eof(&mut ws, code, what).await;
        eprintln!(
            "[{TEST}] {what}: close {code} after {:.1} ms",
            ms(started.elapsed())
        );
    }

    // Clients that really send 16 MiB in one frame, concurrently: each is closed after its header
    // and the server stops reading, so the writer is cut off long before 16 MiB went out and the
    // server never holds the payloads.
    let addr = server.addr;
    let frame = Arc::new(masked_frame(true, op::TEXT, &vec![b'x'; STREAM_BYTES]));
    let sampler = Sampler::start(server.pid());
    let sent = run_many(STREAMERS, STREAMERS, |_| {
        let frame = frame.clone();
        async move {
            let mut ws = RawWs::connect(addr).await;
            let mut written = 0usize;
            for chunk in frame.chunks(64 * 1024) {
                match tokio::time::timeout(Duration::from_secs(5), ws.stream.write_all(chunk)).await
                {
                    Ok(Ok(())) => written += chunk.len(),
                    // Reset by the server, or it stopped reading: either way it has let go.
                    Ok(Err(_)) | Err(_) => break,
                }
            }
            // The server answers with a close frame 1009 and closes the connection (a reset may
            // destroy the close frame before it is read); it must not still be open.
            let mut close = None;
            let ended = loop {
                match ws.read_frame(RECV_TIMEOUT).await {
                    Ok(f) if f.opcode == op::CLOSE => close = f.close_code(),
                    Ok(_) => {}
                    Err(RawReadError::Timeout) => break false,
                    Err(_) => break true,
                }
            };
            (written, close, ended)
        }
    })
    .await;
    let peak = sampler.finish().await;
    for (written, close, ended) in &sent {
        assert!(
            *ended,
            "a client streaming a 16 MiB frame is still connected"
        );
        assert!(
            matches!(close, Some(1009) | None),
            "a 16 MiB frame got close {close:?}"
        );
        assert!(
            *written < STREAM_BYTES,
            "a client wrote all {written} bytes of a frame the server refused from its header"
        );
    }
    let max_written = sent.iter().map(|s| s.0).max().unwrap_or(0);
    wait_only_control_connected(&server, Duration::from_secs(10)).await;
    assert_new_clients_served(&server).await;
    let rss = watch.finish(TEST, &server, peak.rss_kib).await;
    eprintln!(
        "[{TEST}] {STREAMERS} clients streaming a 16 MiB frame: at most {} KiB written before the \
         server cut them off",
        max_written / 1024
    );
    // 20 x 16 MiB were offered; holding even one would show.
    rss.assert_bounded(TEST, 12 * 1024, 12 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_fragmented_messages_are_closed_once_past_the_cap() {
    const TEST: &str = "endless fragments";
    const LIMIT: usize = 65536;
    let _serial = serial().await;
    let server = Server::start().await;
    let watch = Watch::start(&server).await;

    // 1 KiB fragments up to exactly the cap: accepted, still waiting for more.
    let mut ws = raw(&server).await;
    let mut total = 0usize;
    ws.send_frame(false, op::TEXT, &[b'a'; 1024]).await;
    total += 1024;
    while total < LIMIT {
        ws.send_frame(false, op::CONTINUATION, &[b'a'; 1024]).await;
        total += 1024;
    }
    match ws.read_frame(Duration::from_millis(500)).await {
        Err(RawReadError::Timeout) => {}
        Ok(f) if f.opcode == op::PING => {}
        other => panic!("a message of exactly the cap so far: {other:?}"),
    }
    // One more byte passes the cap.
    ws.send_frame(false, op::CONTINUATION, b"a").await;
    expect_close_and_eof(&mut ws, 1009, "one byte past the cap").await;

    // Fragments forever, as fast as the client can write: closed once past the cap.
    let ws = raw(&server).await;
    let started = Instant::now();
    let (mut reader, mut writer) = ws.into_split();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        let first = masked_frame(false, op::BINARY, &[0u8; 1024]);
        if writer.write_all(&first).await.is_err() {
            return sent;
        }
        sent += 1024;
        let next = masked_frame(false, op::CONTINUATION, &[0u8; 1024]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if writer.write_all(&next).await.is_err() {
                return sent;
            }
            sent += 1024;
        }
        panic!("the server was still reading after 20 s of fragments ({sent} bytes)");
    });
    let code = loop {
        match reader.read_frame(RECV_TIMEOUT).await {
            Ok(f) if f.opcode == op::CLOSE => break f.close_code(),
            Ok(f) if f.opcode == op::PING => continue,
            other => panic!("endless fragments: expected a close, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1009), "endless fragments");
    let sent = flood.await.expect("flood task");
    eprintln!(
        "[{TEST}] endless 1 KiB fragments: close 1009 after {:.0} ms; the client got {} KiB out \
         before its writes failed",
        ms(started.elapsed()),
        sent / 1024
    );

    // 1-byte fragments: the cap counts payload, so it takes LIMIT of them, and then it holds.
    let mut ws = raw(&server).await;
    let mut burst = masked_frame(false, op::TEXT, b"a");
    for _ in 0..LIMIT {
        burst.extend(masked_frame(false, op::CONTINUATION, b"a"));
    }
    let started = Instant::now();
    ws.stream
        .write_all(&burst)
        .await
        .expect("write 1-byte fragments");
    expect_close_and_eof(&mut ws, 1009, "1-byte fragments").await;
    eprintln!(
        "[{TEST}] {} 1-byte fragments ({} KiB on the wire): close 1009 after {:.0} ms",
        LIMIT + 1,
        burst.len() / 1024,
        ms(started.elapsed())
    );

    // Empty continuation frames add nothing to the message, so they never reach the cap: the
    // connection stays open and costs the server CPU per frame but no memory. A final fragment
    // still completes the message.
    const EMPTY: usize = 500_000;
    let mut ws = raw(&server).await;
    let sampler = Sampler::start(server.pid());
    let cpu_before = server.cpu_time();
    let started = Instant::now();
    ws.send_frame(false, op::TEXT, br#"{"op":"ping","id":"#)
        .await;
    let empty = masked_frame(false, op::CONTINUATION, b"");
    let chunk: Vec<u8> = empty.repeat(10_000);
    for _ in 0..EMPTY / 10_000 {
        ws.stream
            .write_all(&chunk)
            .await
            .expect("write empty fragments");
    }
    ws.send_frame(true, op::CONTINUATION, b"7}").await;
    let reply = ws.recv_json(Duration::from_secs(30)).await;
    let elapsed = started.elapsed();
    let cpu = server.cpu_time().saturating_sub(cpu_before);
    let peak = sampler.finish().await;
    assert_eq!(
        reply,
        json!({"op":"pong","id":7}),
        "a message split by {EMPTY} empty fragments"
    );
    raw_ping_op(&mut ws, 8).await;
    eprintln!(
        "[{TEST}] {EMPTY} empty continuation frames ({} KiB) inside one message: connection kept \
         open, message completed after {:.0} ms, server CPU {:.0} ms ({:.2} us per frame)",
        EMPTY * empty.len() / 1024,
        ms(elapsed),
        ms(cpu),
        cpu.as_secs_f64() * 1e6 / EMPTY as f64
    );

    let rss = watch.finish(TEST, &server, peak.rss_kib).await;
    rss.assert_bounded(TEST, 8 * 1024, 8 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_with_1007_even_before_the_message_ends() {
    const TEST: &str = "invalid utf-8";
    const REPEAT: usize = 10;
    let _serial = serial().await;
    let server = Server::start().await;
    let watch = Watch::start(&server).await;

    // (what, frames). Each one ends in 1007; none ever sends a final fragment unless it is part
    // of the case.
    type Frames = Vec<(bool, u8, Vec<u8>)>;
    let cases: Vec<(&str, Frames)> = vec![
        (
            "overlong encoding",
            vec![(true, op::TEXT, b"{\"id\":\"\xc0\xaf\"}".to_vec())],
        ),
        (
            "UTF-16 surrogate",
            vec![(true, op::TEXT, b"{\"id\":\"\xed\xa0\x80\"}".to_vec())],
        ),
        (
            "code point past U+10FFFF",
            vec![(true, op::TEXT, b"\xf4\x90\x80\x80".to_vec())],
        ),
        (
            "truncated character at the end",
            vec![(true, op::TEXT, b"ok \xe2\x82".to_vec())],
        ),
        (
            "invalid first fragment, no final fragment ever",
            vec![(false, op::TEXT, b"{\"op\":\"ping\",\"id\":\"\xff".to_vec())],
        ),
        (
            "invalid third fragment of a long message, no final fragment ever",
            vec![
                (false, op::TEXT, b"{\"op\":\"ping\",".to_vec()),
                (false, op::CONTINUATION, b"\"id\":\"".to_vec()),
                (false, op::CONTINUATION, b"\xed\xbf\xbf".to_vec()),
            ],
        ),
        (
            "character cut by the final fragment",
            vec![
                (false, op::TEXT, b"{\"id\":\"".to_vec()),
                (true, op::CONTINUATION, b"\xf0\x9f\x98".to_vec()),
            ],
        ),
        (
            "invalid close reason",
            vec![(true, op::CLOSE, b"\x03\xe8bye \xff".to_vec())],
        ),
    ];
    let addr = server.addr;
    let started = Instant::now();
    let jobs: Vec<_> = cases
        .iter()
        .flat_map(|c| std::iter::repeat_n(c.clone(), REPEAT))
        .collect();
    let n = jobs.len();
    let sampler = Sampler::start(server.pid());
    run_many(n, n, |i| {
        let (what, frames) = jobs[i].clone();
        async move {
            let mut ws = RawWs::connect(addr).await;
            let mut bytes = Vec::new();
            for (fin, opcode, payload) in &frames {
                bytes.extend(masked_frame(*fin, *opcode, payload));
            }
            ws.stream.write_all(&bytes).await.expect("write");
            expect_close_and_eof(&mut ws, 1007, what).await;
        }
    })
    .await;
    let peak = sampler.finish().await;
    eprintln!(
        "[{TEST}] {n} connections ({} cases x {REPEAT}) closed with 1007 in {:.0} ms",
        cases.len(),
        ms(started.elapsed())
    );
    wait_only_control_connected(&server, Duration::from_secs(10)).await;
    let rss = watch.finish(TEST, &server, peak.rss_kib).await;
    rss.assert_bounded(TEST, 8 * 1024, 8 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_fragmented_control_frames_close_with_1002() {
    const TEST: &str = "control frames";
    let _serial = serial().await;
    let server = Server::start().await;
    let control = Control::start(&server).await;

    let close_126 = {
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.extend_from_slice(&[b'r'; 124]);
        p
    };
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "ping of 126 bytes",
            masked_frame(true, op::PING, &[b'p'; 126]),
            1002,
        ),
        (
            "pong of 126 bytes",
            masked_frame(true, op::PONG, &[b'p'; 126]),
            1002,
        ),
        (
            "close of 126 bytes",
            masked_frame(true, op::CLOSE, &close_126),
            1002,
        ),
        (
            "ping of 65535 bytes",
            masked_frame(true, op::PING, &[b'p'; 65535]),
            1002,
        ),
        (
            "ping declaring 2^40 bytes",
            raw_header(true, op::PING, 127, &(1u64 << 40).to_be_bytes()),
            1002,
        ),
        ("fragmented ping", masked_frame(false, op::PING, b"x"), 1002),
        ("fragmented pong", masked_frame(false, op::PONG, b"x"), 1002),
        (
            "fragmented close",
            masked_frame(false, op::CLOSE, &1000u16.to_be_bytes()),
            1002,
        ),
        (
            "continuation frame after a ping (no message to continue)",
            {
                let mut b = masked_frame(true, op::PING, b"x");
                b.extend(masked_frame(true, op::CONTINUATION, b"y"));
                b
            },
            1002,
        ),
        (
            "close with a 1-byte payload",
            masked_frame(true, op::CLOSE, b"x"),
            1002,
        ),
        (
            "close code 1005",
            masked_frame(true, op::CLOSE, &1005u16.to_be_bytes()),
            1002,
        ),
        (
            "pong declaring 2^40 bytes",
            raw_header(true, op::PONG, 127, &(1u64 << 40).to_be_bytes()),
            1002,
        ),
        (
            "close declaring 2^40 bytes",
            raw_header(true, op::CLOSE, 127, &(1u64 << 40).to_be_bytes()),
            1002,
        ),
    ];
    for (what, bytes, code) in &cases {
        let mut ws = raw(&server).await;
        ws.stream.write_all(bytes).await.expect("write");
        let frames = ws.expect_close(*code, RECV_TIMEOUT).await;
        // A ping answered before the violation is fine (the continuation case).
        assert!(
            frames
                .iter()
                .all(|f| f.opcode == op::PING || f.opcode == op::PONG),
            "{what}: unexpected frames before the close: {frames:?}"
        );
        ws.expect_eof(RECV_TIMEOUT, 1 << 16).await;
        eprintln!("[{TEST}] {what}: close {code}");
    }

    // What is allowed: a ping of exactly 125 bytes, and control frames between the fragments of
    // a message.
    let mut ws = raw(&server).await;
    ws.send_frame(true, op::PING, &[b'q'; 125]).await;
    let pong = ws.read_frame(RECV_TIMEOUT).await.expect("pong");
    assert_eq!(pong.opcode, op::PONG);
    assert_eq!(
        pong.payload,
        vec![b'q'; 125],
        "pong echoes the ping's payload"
    );
    ws.send_frames(&[
        (false, op::TEXT, b"{\"op\":\"ping\","),
        (true, op::PING, b"between"),
        (true, op::PONG, b"unsolicited"),
        (true, op::CONTINUATION, b"\"id\":3}"),
    ])
    .await;
    let pong = ws.read_frame(RECV_TIMEOUT).await.expect("pong");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (op::PONG, &b"between"[..])
    );
    assert_eq!(
        ws.recv_json(RECV_TIMEOUT).await,
        json!({"op":"pong","id":3})
    );
    control.finish(TEST).await;
}
