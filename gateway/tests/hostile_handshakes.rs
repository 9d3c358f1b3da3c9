//! Hostile clients at the door: slowloris handshakes and floods of half-open connections (closed
//! after `server.handshake_timeout`), connection floods past `server.max_connections` (503) and past
//! the process's open-files limit (back off, never spin). What every test checks while they
//! misbehave, and how to see the figures: `hostile_support`.

mod common;
mod hostile_support;

use std::time::{Duration, Instant};

use common::{
    RawWs, Server, WsClient, raise_nofile_limit, read_until_closed, tcp_connect, wait_until,
};
use hostile_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Handshake abuse
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_handshakes_are_closed_after_the_handshake_timeout() {
    const TEST: &str = "slowloris";
    const TIMEOUT: Duration = Duration::from_secs(2);
    const CONNS: usize = 300;
    const TRICKLE: Duration = Duration::from_millis(200);
    let _serial = serial().await;
    let server = Server::builder()
        .env("PUBGATE__SERVER__HANDSHAKE_TIMEOUT", "2s")
        .start()
        .await;
    let watch = Watch::start(&server).await;

    // Each connection sends a request line and then one more byte of an endless header every
    // 200 ms: it is never silent for long, so only a deadline on the whole head can close it.
    let addr = server.addr;
    let trickle = |i: usize| async move {
        let started = Instant::now();
        let stream = tcp_connect(addr).await;
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let head: &[u8] = if i.is_multiple_of(2) {
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nX-Slow: "
        } else {
            b"POST /v1/publish/slow.head HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
        };
        wr.write_all(head).await.expect("write request line");
        let mut ticker = tokio::time::interval(TRICKLE);
        let mut trickled = 0usize;
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let limit = started + TIMEOUT + Duration::from_secs(15);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if wr.write_all(b"a").await.is_err() {
                        break;
                    }
                    trickled += 1;
                }
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                },
                _ = tokio::time::sleep_until(limit.into()) => {
                    panic!("slowloris connection {i} still open after {:?}", started.elapsed())
                }
            }
        }
        (started.elapsed(), trickled, got)
    };
    // And a slow body: a complete head, then the body one byte at a time.
    let slow_body = async move {
        let started = Instant::now();
        let mut stream = tcp_connect(addr).await;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(
                b"POST /v1/publish/slow.body HTTP/1.1\r\nHost: 127.0.0.1\r\n\
                  Content-Type: application/json\r\nContent-Length: 200\r\n\r\n\"",
            )
            .await
            .expect("write head");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        let mut ticker = tokio::time::interval(TRICKLE);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if stream.write_all(b"b").await.is_err() {
                        break;
                    }
                }
                r = stream.read(&mut buf) => match r {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        got.extend_from_slice(&buf[..n]);
                        if got.windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                },
                _ = tokio::time::sleep(TIMEOUT + Duration::from_secs(15)) => {
                    panic!("slow body: no answer after {:?}", started.elapsed())
                }
            }
        }
        (
            started.elapsed(),
            String::from_utf8_lossy(&got).into_owned(),
        )
    };

    let sampler = Sampler::start(server.pid());
    let (results, (body_after, body_answer)) =
        tokio::join!(run_many(CONNS, CONNS, trickle), slow_body);
    let during = sampler.finish().await.rss_kib;

    let mut closed: Vec<Duration> = Vec::with_capacity(CONNS);
    for (after, trickled, got) in &results {
        assert!(
            *after >= TIMEOUT - Duration::from_millis(50),
            "a trickling client was closed after {after:?}, before the {TIMEOUT:?} timeout"
        );
        assert!(
            *after < TIMEOUT + Duration::from_secs(8),
            "a trickling client was closed only after {after:?} (timeout {TIMEOUT:?})"
        );
        // It kept sending until the end: the deadline is on the whole head, not on silence.
        let expected = (TIMEOUT.as_millis() / TRICKLE.as_millis()) as usize - 2;
        assert!(
            *trickled >= expected,
            "a client trickled only {trickled} bytes before it was closed after {after:?}"
        );
        assert!(
            is_timeout_answer(got),
            "a trickling client got {:?}",
            String::from_utf8_lossy(got)
        );
        closed.push(*after);
    }
    closed.sort();
    assert!(
        body_answer.starts_with("HTTP/1.1 408"),
        "slow body answer: {body_answer:?}"
    );
    assert!(
        body_after >= TIMEOUT - Duration::from_millis(50)
            && body_after < TIMEOUT + Duration::from_secs(8),
        "slow body answered after {body_after:?} (timeout {TIMEOUT:?})"
    );
    server
        .wait_metric(
            "pubgate_handshake_failures_total{reason=\"handshake_timeout\"}",
            Duration::from_secs(10),
            |v| v >= CONNS as f64,
        )
        .await;
    // New clients are fine.
    assert_new_clients_served(&server).await;
    let rss = watch.finish(TEST, &server, during).await;
    eprintln!(
        "[{TEST}] {CONNS} trickling clients closed after {:.0}..{:.0} ms (handshake_timeout {TIMEOUT:?}); \
         slow body answered 408 after {:.0} ms",
        ms(closed[0]),
        ms(closed[closed.len() - 1]),
        ms(body_after)
    );
    rss.assert_bounded(TEST, 16 * 1024, 16 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_flood_is_closed_after_the_handshake_timeout_with_bounded_memory() {
    const TEST: &str = "half-open flood";
    const TIMEOUT: Duration = Duration::from_secs(3);
    const FLOOD: usize = 2000;
    const ROUNDS: usize = 2;
    let _serial = serial().await;
    let nofile = raise_nofile_limit();
    assert!(
        nofile >= FLOOD as u64 + 500,
        "this test needs {} open files, the limit is {nofile}",
        FLOOD + 500
    );
    let server = Server::builder()
        .env("PUBGATE__SERVER__HANDSHAKE_TIMEOUT", "3s")
        .start()
        .await;
    let watch = Watch::start(&server).await;
    let fds_before = server.open_fds();

    // Two rounds: the second one shows that the memory of the first is reused, not added to.
    let mut after_round = Vec::new();
    let mut during = 0;
    for round in 1..=ROUNDS {
        let sampler = Sampler::start(server.pid());
        // Connect and send nothing. Each clock starts before its connect, so the server cannot
        // have started its own earlier.
        let addr = server.addr;
        let flood_started = Instant::now();
        // All at once: the kernel completes each handshake from the listen backlog, so with a
        // backlog as large as the burst no connect waits (a dropped SYN costs a 1 s retransmit).
        let conns = run_many(FLOOD, FLOOD, |_| async move {
            let started = Instant::now();
            let stream = tcp_connect(addr).await;
            (started, started.elapsed(), stream)
        })
        .await;
        let mut connect_times: Vec<Duration> = conns.iter().map(|c| c.1).collect();
        connect_times.sort();
        let slow_connects = connect_times
            .iter()
            .filter(|t| **t >= Duration::from_secs(1))
            .count();
        let connected_in = flood_started.elapsed();
        let waiters: Vec<_> = conns
            .into_iter()
            .map(|(started, _, mut stream)| {
                tokio::spawn(async move {
                    read_until_closed(&mut stream, started, TIMEOUT + Duration::from_secs(20)).await
                })
            })
            .collect();
        let mut closed = Vec::with_capacity(FLOOD);
        for w in waiters {
            let (sent, after) = w.await.expect("waiter task");
            assert!(
                after >= TIMEOUT - Duration::from_millis(50),
                "a silent connection was closed after {after:?}, before the {TIMEOUT:?} timeout"
            );
            assert!(
                is_timeout_answer(&sent),
                "a silent connection got {:?}",
                String::from_utf8_lossy(&sent)
            );
            closed.push(after);
        }
        let peak = sampler.finish().await;
        closed.sort();
        let last = closed[closed.len() - 1];
        // Measured from the client's connect, so it includes any wait in the listen backlog while
        // a loaded machine starves the server's accept loop.
        assert!(
            last < TIMEOUT + Duration::from_secs(15),
            "the last silent connection was closed only after {last:?} (timeout {TIMEOUT:?})"
        );
        server
            .wait_metric(
                "pubgate_handshake_failures_total{reason=\"handshake_timeout\"}",
                Duration::from_secs(10),
                |v| v >= (round * FLOOD) as f64,
            )
            .await;
        wait_until(
            "the server to let go of the flood's descriptors",
            Duration::from_secs(10),
            || async { server.open_fds() <= fds_before + 2 },
        )
        .await;
        // A SYN dropped because the accept queue was full shows as a connect of 1 s or more.
        assert!(
            slow_connects < FLOOD / 100,
            "{slow_connects} of {FLOOD} connects took 1 s or more (SYN retransmits: listen backlog \
             too small?); slowest {:?}",
            connect_times[FLOOD - 1]
        );
        assert!(
            peak.fds >= fds_before + FLOOD / 2,
            "the flood never reached the server: at most {} descriptors",
            peak.fds
        );
        let after = server.rss_kib();
        eprintln!(
            "[{TEST}] round {round}: {FLOOD} silent connections opened in {:.0} ms (slowest connect \
             {:.0} ms, {slow_connects} took 1 s or more), closed by the server after {:.0}..{:.0} ms \
             (handshake_timeout {TIMEOUT:?}); descriptors {fds_before} -> peak {} -> {}; RSS peak \
             {} KiB, after {after} KiB",
            ms(connected_in),
            ms(connect_times[FLOOD - 1]),
            ms(closed[0]),
            ms(last),
            peak.fds,
            server.open_fds(),
            peak.rss_kib,
        );
        during = during.max(peak.rss_kib);
        after_round.push(after);
    }
    assert_new_clients_served(&server).await;
    let rss = watch.finish(TEST, &server, during).await;
    // A connection that has sent nothing costs ~12 KiB (hyper's 8 KiB read buffer, the task, its
    // timer): ~24 MiB live at the height of a flood of 2000. What glibc's per-thread arenas keep
    // afterwards is reused by the next flood (a 10-round run levels off; see docs/robustness.md).
    rss.assert_bounded(TEST, 64 * 1024, 48 * 1024);
    assert!(
        after_round[ROUNDS - 1] < after_round[0] + 24 * 1024,
        "[{TEST}] RSS after each round: {after_round:?} KiB"
    );
}

/// What a server may send a client that never finished its request head before closing it.
fn is_timeout_answer(sent: &[u8]) -> bool {
    sent.is_empty() || sent.starts_with(b"HTTP/1.1 408")
}

// ---------------------------------------------------------------------------------------------
// Connection floods
// ---------------------------------------------------------------------------------------------

/// The upgrade request a raw client writes.
fn upgrade_request(addr: std::net::SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_past_max_connections_gets_503s() {
    const TEST: &str = "max_connections flood";
    const MAX: usize = 200;
    const FLOOD: usize = 1000;
    let _serial = serial().await;
    let server = Server::builder()
        .env("PUBGATE__SERVER__MAX_CONNECTIONS", MAX.to_string())
        .start()
        .await;
    let watch = Watch::start(&server).await; // its control client holds one of the MAX slots

    let addr = server.addr;
    let started = Instant::now();
    let results = run_many(FLOOD, FLOOD, |_| async move {
        RawWs::handshake(tcp_connect(addr).await, addr, "/ws").await
    })
    .await;
    let elapsed = started.elapsed();
    let mut upgraded = Vec::new();
    let mut refused = 0usize;
    for r in results {
        match r {
            Ok(ws) => upgraded.push(ws),
            Err(resp) => {
                assert_eq!(resp.status, 503, "{resp:?}");
                assert_eq!(resp.json()["code"], "unavailable", "{resp:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(
        upgraded.len(),
        MAX - 1,
        "upgrades accepted next to the control client"
    );
    assert_eq!(refused, FLOOD - (MAX - 1));
    let m = server.metrics().await;
    assert_eq!(m.value("pubgate_connections"), MAX as f64);
    assert_eq!(m.value("pubgate_connections_refused_total"), refused as f64);
    let during = server.rss_kib();
    // The flood's connections are real sessions.
    for (i, ws) in upgraded.iter_mut().enumerate().step_by(37) {
        raw_ping_op(ws, i as u64).await;
    }
    drop(upgraded);
    wait_only_control_connected(&server, Duration::from_secs(15)).await;
    // Room again.
    let mut fresh: Vec<WsClient> = run_many(MAX - 1, 50, |_| WsClient::connect(addr)).await;
    fresh[0].ping_pong(1).await;
    drop(fresh);
    let rss = watch.finish(TEST, &server, during).await;
    eprintln!(
        "[{TEST}] {FLOOD} simultaneous upgrades against max_connections = {MAX}: {} upgraded, \
         {refused} refused with 503 \"unavailable\" in {:.0} ms",
        MAX - 1,
        ms(elapsed)
    );
    rss.assert_bounded(TEST, 32 * 1024, 24 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_past_the_open_files_limit_backs_off_without_spinning() {
    const TEST: &str = "open-files flood";
    const NOFILE: u64 = 256;
    const FLOOD: usize = 600;
    const SATURATED_FOR: Duration = Duration::from_secs(3);
    const MAX_CPU_SHARE: f64 = 0.30;
    let _serial = serial().await;
    raise_nofile_limit();
    let mut server = Server::builder().nofile_limit(NOFILE).start().await;
    // Opened before the flood: these keep working while the server cannot accept anything.
    let watch = Watch::start(&server).await;
    let fds_before = server.open_fds();

    // Each flood connection asks for an upgrade and then reads nothing. The first ~240 become
    // sessions and use up the descriptors; the rest wait in the listen backlog.
    let addr = server.addr;
    let request = upgrade_request(addr);
    let flood = run_many(FLOOD, 100, |_| {
        let request = request.clone();
        async move {
            let mut s = tcp_connect(addr).await;
            s.write_all(request.as_bytes())
                .await
                .expect("write request");
            s
        }
    })
    .await;
    wait_until(
        "the server to run out of descriptors",
        Duration::from_secs(15),
        || async { server.open_fds() as u64 >= NOFILE - 1 },
    )
    .await;
    // Saturated: accept(2) fails with EMFILE. The server must neither die nor spin on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warnings_before = server.stderr().matches("accept failed").count();
    let probes_before = watch.control.probes();
    let cpu_before = server.cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(SATURATED_FOR).await;
    let cpu = server.cpu_time().saturating_sub(cpu_before);
    let wall = t0.elapsed();
    let warnings = server.stderr().matches("accept failed").count() - warnings_before;
    let probes = watch.control.probes() - probes_before;
    let share = cpu.as_secs_f64() / wall.as_secs_f64();
    let during = server.rss_kib();
    let fds_saturated = server.open_fds();
    server.assert_running();
    assert!(
        warnings >= 1,
        "accept never failed while the server held {fds_saturated} of {NOFILE} descriptors"
    );
    // One every 100 ms when nothing is wrong; a stalled event loop would make none.
    assert!(
        probes >= 10,
        "the control client got only {probes} messages through in {wall:?} of saturation"
    );
    assert!(
        share < MAX_CPU_SHARE,
        "the server used {cpu:?} of CPU in {wall:?} ({:.0}% of a core) while out of descriptors",
        share * 100.0
    );

    // The flood leaves; the backlog drains (those connections are closed by now) and new
    // clients get in.
    drop(flood);
    wait_until(
        "the server to let go of the flood's descriptors",
        Duration::from_secs(20),
        || async { server.open_fds() <= fds_before + 5 },
    )
    .await;
    let mut fresh: Vec<WsClient> = run_many(50, 10, |_| WsClient::connect(addr)).await;
    for (i, c) in fresh.iter_mut().enumerate() {
        c.ping_pong(i as u64).await;
    }
    let fd_limit_failures = server
        .metrics()
        .await
        .value("pubgate_handshake_failures_total{reason=\"accept_fd_limit\"}");
    assert!(fd_limit_failures >= 1.0);
    drop(fresh);
    let rss = watch.finish(TEST, &server, during).await;
    eprintln!(
        "[{TEST}] RLIMIT_NOFILE {NOFILE}, {FLOOD} connections: descriptors {fds_before} -> \
         {fds_saturated}; while saturated for {:.1} s the server used {:.0} ms of CPU ({:.1}% of \
         a core) and logged {warnings} accept failures ({:.0}/s); the control client got \
         {probes} messages through meanwhile; \
         handshake_failures_total{{reason=\"accept_fd_limit\"}} = {fd_limit_failures}",
        wall.as_secs_f64(),
        ms(cpu),
        share * 100.0,
        warnings as f64 / wall.as_secs_f64()
    );
    rss.assert_bounded(TEST, 16 * 1024, 16 * 1024);
}
