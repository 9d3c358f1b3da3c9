//! Hostile clients that stop reading next to 100 readers of the same topic: the readers' latency
//! stays low and the stuck clients are cut off. What every test checks while they misbehave, and
//! how to see the figures: `hostile_support`.

mod common;
mod hostile_support;

use std::time::{Duration, Instant};

use common::{HttpClient, RECV_TIMEOUT, RawWs, Server, WsClient};
use hostile_support::*;

// ---------------------------------------------------------------------------------------------
// Slow consumers next to 100 readers
// ---------------------------------------------------------------------------------------------

/// Microseconds since `base`, as carried in each message.
fn micros_since(base: Instant) -> u64 {
    base.elapsed().as_micros() as u64
}

/// Reads messages until the `stop` message; returns (seq, latency) of each.
async fn read_latencies(mut ws: WsClient, base: Instant) -> Vec<(u64, Duration)> {
    let mut out = Vec::new();
    loop {
        let text = ws.recv_text(RECV_TIMEOUT).await;
        let now = micros_since(base);
        // {"op":"message","topic":"…","offset":N,"data":{"seq":S,"t":T,"pad":"…"}}: the fields
        // needed are near the start; no need to parse the padding.
        let field = |name: &str| -> Option<u64> {
            let key = format!("\"{name}\":");
            let rest = &text[text.find(&key)? + key.len()..];
            rest.split([',', '}']).next()?.parse().ok()
        };
        if text.contains("\"stop\":true") {
            return out;
        }
        let seq = field("seq").unwrap_or_else(|| panic!("no seq in {text:.120}"));
        let sent = field("t").unwrap_or_else(|| panic!("no t in {text:.120}"));
        out.push((seq, Duration::from_micros(now.saturating_sub(sent))));
    }
}

/// Publishes `count` messages from `first_seq` on, one every `every`.
async fn publish_paced(
    http: &mut HttpClient,
    topic: &str,
    base: Instant,
    first_seq: u64,
    count: u64,
    every: Duration,
    pad: &str,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in first_seq..first_seq + count {
        tick.tick().await;
        let body = format!(
            r#"{{"seq":{seq},"t":{},"pad":"{pad}"}}"#,
            micros_since(base)
        );
        http.publish(topic, body).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumers_do_not_delay_100_readers_of_the_same_topic() {
    const TEST: &str = "slow consumers";
    const TOPIC: &str = "fanout.latency";
    const READERS: usize = 100;
    const SLOW: usize = 20;
    const PHASE: u64 = 400;
    const EVERY: Duration = Duration::from_millis(5);
    const MAX_P99: Duration = Duration::from_secs(1);
    /// A topic only the slow clients take.
    const FILL_TOPIC: &str = "fanout.fill";
    /// 60 KiB messages on it before phase 2: ~1.5 MiB, under the 4 MiB send queue.
    const FILL_BEFORE: usize = 25;
    let _serial = serial().await;
    let server = Server::start().await;
    let watch = Watch::start(&server).await;
    let base = Instant::now();
    let pad = "p".repeat(1024);

    let addr = server.addr;
    let readers: Vec<WsClient> = run_many(READERS, 20, |i| async move {
        let mut ws = WsClient::connect(addr).await;
        ws.subscribe(TOPIC, i as u64).await;
        ws
    })
    .await;
    let readers: Vec<_> = readers
        .into_iter()
        .map(|ws| tokio::spawn(read_latencies(ws, base)))
        .collect();
    let mut http = HttpClient::connect(addr).await;

    // Phase 1: readers only.
    publish_paced(&mut http, TOPIC, base, 0, PHASE, EVERY, &pad).await;

    // Phase 2: the same, with clients on the same topic that stopped reading (tiny receive
    // windows, never read again). Before it starts, messages of a topic only they take fill
    // their sockets, so that during the phase the server really cannot write to them and their
    // queues grow (but stay under limits.send_queue_bytes / _frames: nobody is cut off yet).
    let mut slow = Vec::new();
    for i in 0..SLOW {
        let mut ws = RawWs::connect_small_rcvbuf(addr, 4096).await;
        for (topic, id) in [(TOPIC, i), (FILL_TOPIC, SLOW + i)] {
            let ack = ws.subscribe(topic, id as u64).await;
            assert_eq!(ack["op"], "ack", "{ack}");
        }
        slow.push(ws);
    }
    let fill = format!(r#"{{"fill":"{}"}}"#, "f".repeat(60 * 1024));
    for _ in 0..FILL_BEFORE {
        http.publish(FILL_TOPIC, fill.clone()).await;
    }
    let sampler = Sampler::start(server.pid());
    publish_paced(&mut http, TOPIC, base, PHASE, PHASE, EVERY, &pad).await;
    let cut_during_phase = server
        .metrics()
        .await
        .value_or_zero("pubgate_slow_consumer_disconnects_total");
    // Then more fill until every slow client has overflowed its queue and been cut off.
    let filling = Instant::now();
    let mut fills = 0;
    let mut cut_off = 0.0;
    while filling.elapsed() < Duration::from_secs(15) {
        for _ in 0..10 {
            http.publish(FILL_TOPIC, fill.clone()).await;
        }
        fills += 10;
        cut_off = server
            .metrics()
            .await
            .value_or_zero("pubgate_slow_consumer_disconnects_total");
        if cut_off >= SLOW as f64 {
            break;
        }
    }
    let cut_off_after = filling.elapsed();
    let seq = 2 * PHASE;
    let peak = sampler.finish().await;
    http.publish(TOPIC, r#"{"stop":true}"#).await;

    let mut phases = [Vec::new(), Vec::new()];
    for r in readers {
        let samples = r.await.expect("reader task");
        let seqs: Vec<u64> = samples.iter().map(|s| s.0).collect();
        assert_eq!(
            seqs,
            (0..seq).collect::<Vec<_>>(),
            "a reader missed messages"
        );
        for (s, lat) in samples {
            if s < PHASE {
                phases[0].push(lat);
            } else if s < 2 * PHASE {
                phases[1].push(lat);
            }
        }
    }
    assert_eq!(
        cut_during_phase, 0.0,
        "a slow client was cut off during phase 2 already: its queue did not hold {FILL_BEFORE} \
         fill messages and {PHASE} messages"
    );
    assert_eq!(
        cut_off, SLOW as f64,
        "every client that stopped reading is cut off as a slow consumer (and no reader is)"
    );
    drop(slow);
    wait_only_control_connected(&server, Duration::from_secs(10)).await;
    let rss = watch.finish(TEST, &server, peak.rss_kib).await;
    let mut figures = Vec::new();
    let [mut only, mut with_slow] = phases;
    for (name, lat) in [
        ("readers only", &mut only),
        ("with slow consumers", &mut with_slow),
    ] {
        lat.sort();
        let (p50, p99, max) = (
            percentile(lat, 50.0),
            percentile(lat, 99.0),
            percentile(lat, 100.0),
        );
        eprintln!(
            "[{TEST}] {READERS} readers, {name}: {} deliveries, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            lat.len(),
            ms(p50),
            ms(p99),
            ms(max)
        );
        figures.push((name, p99));
    }
    eprintln!(
        "[{TEST}] {SLOW} clients that stopped reading: stuck through phase 2 ({FILL_BEFORE} x 60 \
         KiB + {PHASE} x 1 KiB for them), then all cut off (1008) after {fills} more 60 KiB \
         messages, {:.1} s",
        cut_off_after.as_secs_f64()
    );
    for (name, p99) in figures {
        assert!(
            p99 <= MAX_P99,
            "[{TEST}] p99 latency {name}: {p99:?} (limit {MAX_P99:?})"
        );
    }
    rss.assert_bounded(TEST, 48 * 1024, 32 * 1024);
}
