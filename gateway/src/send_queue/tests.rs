//! Unit tests of the send queue, its direct writes and the writer taking over, on real loopback
//! sockets.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::config::SlowConsumerPolicy;

fn f(n: usize) -> Bytes {
    Bytes::from(vec![0u8; n])
}

#[test]
fn disconnect_policy_closes_on_overflow() {
    let q = SendQueue::new(2, 1000, SlowConsumerPolicy::Disconnect);
    assert_eq!(q.push(f(1)), Pushed::Queued);
    assert_eq!(q.push(f(1)), Pushed::Queued);
    assert_eq!(q.push(f(1)), Pushed::Overflow);
    assert_eq!(q.push(f(1)), Pushed::Closed);
    let b = q.take();
    assert!(b.frames.is_empty());
    assert_eq!(b.close, Some(CloseReason::SLOW_CONSUMER));
}

#[test]
fn byte_bound_counts() {
    let q = SendQueue::new(100, 10, SlowConsumerPolicy::Disconnect);
    assert_eq!(q.push(f(6)), Pushed::Queued);
    assert_eq!(q.push(f(5)), Pushed::Overflow);
}

#[test]
fn drop_oldest_keeps_newest() {
    let q = SendQueue::new(2, 1000, SlowConsumerPolicy::DropOldest);
    q.push(Bytes::from_static(b"1"));
    q.push(Bytes::from_static(b"2"));
    assert_eq!(q.push(Bytes::from_static(b"3")), Pushed::DroppedOldest(1));
    let b = q.take();
    assert_eq!(
        b.frames,
        vec![Bytes::from_static(b"2"), Bytes::from_static(b"3")]
    );
    assert!(b.close.is_none());
}

#[tokio::test]
async fn room_waits_while_half_full_until_the_writer_takes_or_a_close() {
    use std::time::Duration;
    let q = std::sync::Arc::new(SendQueue::new(4, 1000, SlowConsumerPolicy::Disconnect));
    q.push(f(1));
    // 1 of 4 frames: room.
    tokio::time::timeout(Duration::from_secs(1), q.room())
        .await
        .expect("room at 1 of 4 frames");
    q.push(f(1));
    // 2 of 4: half full, wait for the writer.
    let waiting = tokio::spawn({
        let q = q.clone();
        async move { q.room().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished(), "room() returned at half full");
    assert_eq!(q.take().frames.len(), 2);
    tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("room after take")
        .unwrap();
    // Bytes count too, and a close ends the wait.
    q.push(f(600));
    let waiting = tokio::spawn({
        let q = q.clone();
        async move { q.room().await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !waiting.is_finished(),
        "room() returned at 600 of 1000 bytes"
    );
    q.close(CloseReason::IDLE);
    tokio::time::timeout(Duration::from_secs(1), waiting)
        .await
        .expect("room after close")
        .unwrap();
}

#[test]
fn graceful_close_keeps_queued_frames() {
    let q = SendQueue::new(4, 1000, SlowConsumerPolicy::Disconnect);
    q.push(f(1));
    q.close(CloseReason::GOING_AWAY);
    q.close(CloseReason::IDLE);
    let b = q.take();
    assert_eq!(b.frames.len(), 1);
    assert_eq!(b.close, Some(CloseReason::GOING_AWAY));
}

/// A connected loopback pair: the server side split like a session's, and the client side.
async fn tcp_pair() -> (
    crate::tcp::TcpRead,
    crate::tcp::TcpWrite,
    Arc<tokio::net::TcpStream>,
    tokio::net::TcpStream,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    let (r, w, direct) = crate::tcp::split(server);
    // Known writable, so the first direct write does not find the readiness still unknown.
    direct.writable().await.unwrap();
    (r, w, direct, client)
}

/// The connection's writer task, without pings or idle timeout.
fn spawn_writer(
    w: crate::tcp::TcpWrite,
    q: &Arc<SendQueue>,
) -> tokio::task::JoinHandle<crate::writer::WriterEnd> {
    let hour = std::time::Duration::from_secs(3600);
    tokio::spawn(crate::writer::run(
        w,
        q.clone(),
        Arc::new(crate::writer::LastHeard::new()),
        crate::writer::Heartbeat {
            ping_interval: hour,
            idle_timeout: hour,
        },
        Arc::new(crate::drain::Drain::default()),
    ))
}

/// A queue over the server side of a fresh loopback pair whose first push is 32 MiB, more than
/// the socket buffers take while the client does not read: that frame stays partly written.
async fn queue_with_a_partly_written_head(
    max_frames: usize,
    policy: SlowConsumerPolicy,
) -> (
    Arc<SendQueue>,
    crate::tcp::TcpWrite,
    tokio::net::TcpStream,
    Bytes,
) {
    let (_r, w, direct, client) = tcp_pair().await;
    let q = Arc::new(SendQueue::with_direct(
        max_frames,
        1 << 30,
        policy,
        Some(direct),
    ));
    let big = Bytes::from(vec![b'A'; 32 << 20]);
    q.push(big.clone());
    assert!(q.lock().head_sent, "the head is partly written");
    (q, w, client, big)
}

#[tokio::test]
async fn a_push_to_an_idle_queue_goes_straight_to_the_socket() {
    use tokio::io::AsyncReadExt;
    let (_r, _w, direct, mut client) = tcp_pair().await;
    let q = Arc::new(SendQueue::with_direct(
        8,
        1 << 20,
        SlowConsumerPolicy::Disconnect,
        Some(direct),
    ));
    // No writer task runs: the bytes can only have come through the direct path.
    assert_eq!(q.push(Bytes::from_static(b"hello ")), Pushed::Queued);
    let mut flushes = Flushes::new();
    assert_eq!(
        flushes.push(&q, Bytes::from_static(b"world")),
        Pushed::Queued
    );
    let mut got = [0u8; 11];
    client.read_exact(&mut got[..6]).await.unwrap();
    assert_eq!(&got[..6], b"hello ");
    // Queued until its flush runs; a push meanwhile only queues behind it.
    assert_eq!(q.push(Bytes::from_static(b"!")), Pushed::Queued);
    assert!(
        matches!(client.try_read(&mut got[6..]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    );
    flushes.run();
    client.read_exact(&mut got[6..]).await.unwrap();
    assert_eq!(&got, b"hello world");
    client.read_exact(&mut got[..1]).await.unwrap();
    assert_eq!(got[0], b'!');
    assert!(q.take().frames.is_empty());
}

/// Many frames through spawned flushes and the writer taking over whenever the socket is full:
/// every frame arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_and_the_writer_keep_order_when_the_socket_fills() {
    use tokio::io::AsyncReadExt;
    const FRAMES: u32 = 20_000;
    let (_r, w, direct, mut client) = tcp_pair().await;
    let q = Arc::new(SendQueue::with_direct(
        1 << 20,
        1 << 30,
        SlowConsumerPolicy::Disconnect,
        Some(direct),
    ));
    let writer = spawn_writer(w, &q);
    let producer = tokio::spawn({
        let q = q.clone();
        async move {
            for i in 0..FRAMES {
                // 1 KiB frames: the socket buffers fill while the client is not reading.
                let mut frame = vec![b'.'; 1024];
                frame[..4].copy_from_slice(&i.to_be_bytes());
                let mut flushes = Flushes::new();
                flushes.push(&q, Bytes::from(frame));
                flushes.spawn();
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        }
    });
    // Let the buffers fill before reading.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut frame = vec![0u8; 1024];
    for i in 0..FRAMES {
        client.read_exact(&mut frame).await.unwrap();
        let got = u32::from_be_bytes(frame[..4].try_into().unwrap());
        assert_eq!(got, i, "frame {i} arrived as {got}");
    }
    producer.await.unwrap();
    q.close(CloseReason::PEER_GONE);
    writer.await.unwrap();
}

#[tokio::test]
async fn detach_stops_direct_writes_and_releases_the_socket() {
    use tokio::io::AsyncReadExt;
    let (r, w, direct, mut client) = tcp_pair().await;
    let q = SendQueue::with_direct(8, 1 << 20, SlowConsumerPolicy::Disconnect, Some(direct));
    drop((r, w));
    q.detach();
    assert_eq!(q.push(Bytes::from_static(b"late")), Pushed::Closed);
    // The queue held the last reference to the socket: it is closed now.
    let mut buf = [0u8; 8];
    assert_eq!(client.read(&mut buf).await.unwrap(), 0);
}

/// Under `drop_oldest`, a frame the socket has already taken part of is finished, not dropped:
/// the client sees whole frames only.
#[tokio::test]
async fn drop_oldest_never_drops_a_partly_written_frame() {
    use tokio::io::AsyncReadExt;
    let (q, w, mut client, big) =
        queue_with_a_partly_written_head(3, SlowConsumerPolicy::DropOldest).await;
    // Overflow: the oldest whole frames go, the partly written head stays.
    for i in 0..6u8 {
        q.push(Bytes::from(vec![b'0' + i; 10]));
    }
    let writer = spawn_writer(w, &q);
    let mut got = vec![0u8; big.len() + 20];
    // A dropped head would leave the stream short (or torn): bounded wait, clear failure.
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.read_exact(&mut got),
    )
    .await
    .expect("the head and the newest frames arrive")
    .unwrap();
    assert!(got[..big.len()].iter().all(|&b| b == b'A'), "head intact");
    assert_eq!(&got[big.len()..], b"44444444445555555555");
    q.close(CloseReason::PEER_GONE);
    writer.await.unwrap();
}

/// A slow consumer's queue is discarded on close, but a frame the socket has taken part of is
/// finished first, so the close frame that follows is readable.
#[tokio::test]
async fn discarding_close_finishes_a_partly_written_frame() {
    use tokio::io::AsyncReadExt;
    let (q, w, mut client, big) =
        queue_with_a_partly_written_head(3, SlowConsumerPolicy::Disconnect).await;
    let mut overflowed = false;
    for _ in 0..4 {
        overflowed |= q.push(Bytes::from_static(b"xx")) == Pushed::Overflow;
    }
    assert!(overflowed);
    let writer = spawn_writer(w, &q);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let r = client.read_to_end(&mut got).await;
        (r, got)
    });
    let end = writer.await.unwrap();
    assert!(
        matches!(end, crate::writer::WriterEnd::Closed(ref c) if c.code == 1008),
        "{end:?}"
    );
    let (r, got) = tokio::time::timeout(std::time::Duration::from_secs(30), reader)
        .await
        .expect("the connection is closed")
        .unwrap();
    r.unwrap();
    assert!(got.len() > big.len() + 4, "{} bytes", got.len());
    assert!(got[..big.len()].iter().all(|&b| b == b'A'), "head intact");
    // Then the close frame with 1008, and nothing of the discarded frames.
    let close = &got[big.len()..];
    assert_eq!(close[0], 0x88);
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1008);
    assert_eq!(close.len(), 2 + usize::from(close[1]));
}

/// An overflow frees what is queued at once, not when the writer gets to it (a stuck consumer can
/// keep the writer waiting for a long time); only the partly written head stays.
#[tokio::test]
async fn overflow_drops_the_queue_at_once_but_a_partly_written_head() {
    let (q, _w, _client, _big) =
        queue_with_a_partly_written_head(3, SlowConsumerPolicy::Disconnect).await;
    let head_left = q.lock().bytes;
    assert!(head_left > 0);
    let pushed: Vec<Pushed> = (0..3).map(|_| q.push(Bytes::from_static(b"xx"))).collect();
    assert_eq!(pushed, [Pushed::Queued, Pushed::Queued, Pushed::Overflow]);
    let st = q.lock();
    assert_eq!(st.frames.len(), 1);
    assert_eq!(st.bytes, head_left);
    assert_eq!(st.close, Some(CloseReason::SLOW_CONSUMER));
}

/// The writer holds a batch it cannot write (the peer stopped reading) when the queue overflows:
/// it drops the frames of its batch the socket has not begun, finishes the one it has, and sends
/// the close frame, waiting for the peer as long as bytes keep moving (here the peer reads again
/// only after 1.5 s; a discarding close used to give up after one second, mid-frame).
#[tokio::test]
async fn a_close_during_a_stalled_write_finishes_only_the_begun_frame_then_sends_1008() {
    use tokio::io::AsyncReadExt;
    let (q, w, mut client, big) =
        queue_with_a_partly_written_head(4, SlowConsumerPolicy::Disconnect).await;
    q.push(Bytes::from_static(b"in the writer's batch"));
    let writer = spawn_writer(w, &q);
    let mut waited = 0;
    while !q.lock().writer_busy {
        assert!(waited < 1000, "the writer never took the queue");
        waited += 1;
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let pushed: Vec<Pushed> = (0..5).map(|_| q.push(Bytes::from_static(b"q"))).collect();
    assert_eq!(pushed[4], Pushed::Overflow);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut got = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        client.read_to_end(&mut got),
    )
    .await
    .expect("the connection is closed")
    .unwrap();
    let end = writer.await.unwrap();
    assert!(
        matches!(end, crate::writer::WriterEnd::Closed(ref c) if c.code == 1008),
        "{end:?}"
    );
    assert!(got[..big.len()].iter().all(|&b| b == b'A'), "head intact");
    let close = &got[big.len()..];
    assert_eq!(
        close[..2],
        [0x88, 2 + CloseReason::SLOW_CONSUMER.reason.len() as u8]
    );
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1008);
    assert_eq!(&close[4..], CloseReason::SLOW_CONSUMER.reason.as_bytes());
}

fn b(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

fn conflate(q: &SendQueue, key: &'static str, frame: &'static str) -> Pushed {
    q.enqueue_as(b(frame), Policy::Conflate(&b(key))).0
}

#[test]
fn conflated_frames_keep_the_latest_per_key_in_publish_order() {
    let q = SendQueue::new(8, 1000, SlowConsumerPolicy::Disconnect);
    // Nothing waits: the first frame is queued as usual.
    assert_eq!(conflate(&q, "a", "a1"), Pushed::Queued);
    // Behind: later ones wait one per key, newer replacing older.
    assert_eq!(conflate(&q, "a", "a2"), Pushed::Queued);
    assert_eq!(conflate(&q, "b", "b1"), Pushed::Queued);
    assert_eq!(conflate(&q, "a", "a3"), Pushed::Conflated);
    assert_eq!(conflate(&q, "b", "b2"), Pushed::Conflated);
    assert_eq!(conflate(&q, "a", "a4"), Pushed::Conflated);
    let batch = q.take();
    // Slots keep publish order: b2 came before a4.
    assert_eq!(Vec::from(batch.frames), [b("a1"), b("b2"), b("a4")]);
    // The queue is empty again: the next frame goes straight in.
    assert_eq!(conflate(&q, "a", "a5"), Pushed::Queued);
    assert_eq!(Vec::from(q.take().frames), [b("a5")]);
}

#[test]
fn another_frame_never_overtakes_conflated_ones() {
    let q = SendQueue::new(8, 1000, SlowConsumerPolicy::Disconnect);
    q.push(b("ack"));
    assert_eq!(conflate(&q, "a", "a1"), Pushed::Queued);
    assert_eq!(conflate(&q, "a", "a2"), Pushed::Conflated);
    // A plain frame (a gap, a reply) moves the waiting ones into the queue first.
    q.push(b("gap"));
    assert_eq!(conflate(&q, "a", "a3"), Pushed::Queued);
    assert_eq!(
        Vec::from(q.take().frames),
        [b("ack"), b("a2"), b("gap"), b("a3")]
    );
}

#[test]
fn conflation_bytes_are_counted_and_more_keys_than_room_disconnect() {
    let q = SendQueue::new(3, 1000, SlowConsumerPolicy::DropOldest);
    q.push(b("x"));
    assert_eq!(conflate(&q, "a", "aaaa"), Pushed::Queued);
    assert_eq!(conflate(&q, "a", "aa"), Pushed::Conflated);
    assert_eq!(q.lock().bytes, 3);
    assert_eq!(conflate(&q, "b", "b"), Pushed::Queued);
    // A third waiting frame would pass the queue's bound: one frame per key is all conflation
    // keeps, so a subscriber of more keys than its queue holds is disconnected.
    assert_eq!(conflate(&q, "c", "c"), Pushed::Overflow);
    assert_eq!(q.take().close, Some(CloseReason::SLOW_CONSUMER));
}
