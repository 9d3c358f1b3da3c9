//! A TCP proxy that can wedge chosen connections, for testing what only the canary can notice.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Node;

/// A TCP proxy in front of Redis that can wedge chosen connections: a frozen connection stays open
/// but no byte moves in either direction, like a half-open TCP connection or a stuck middlebox.
pub struct Proxy {
    /// The port to connect to instead of Redis's.
    pub port: u16,
    conns: Arc<Mutex<Vec<ProxiedConn>>>,
    task: tokio::task::JoinHandle<()>,
}

struct ProxiedConn {
    /// The first bytes the client sent (where `CLIENT SETNAME` appears).
    head: Arc<Mutex<Vec<u8>>>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    /// Starts forwarding a free port to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let conns: Arc<Mutex<Vec<ProxiedConn>>> = Arc::default();
        let list = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let head: Arc<Mutex<Vec<u8>>> = Arc::default();
                let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
                list.lock().expect("lock").push(ProxiedConn {
                    head: head.clone(),
                    frozen: frozen.clone(),
                });
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, Some(head), frozen.clone()));
                tokio::spawn(pump(sr, cw, None, frozen));
            }
        });
        Proxy { port, conns, task }
    }

    /// Freezes every current connection whose client sent `marker` early on; returns how many.
    pub fn freeze(&self, marker: &str) -> usize {
        let conns = self.conns.lock().expect("lock");
        let mut n = 0;
        for c in conns.iter() {
            let head = c.head.lock().expect("lock");
            if head.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                c.frozen.store(true, std::sync::atomic::Ordering::Relaxed);
                n += 1;
            }
        }
        n
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    head: Option<Arc<Mutex<Vec<u8>>>>,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if frozen.load(std::sync::atomic::Ordering::Relaxed) {
            // Hold the connection open and move nothing, for as long as the test runs.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        if let Some(h) = &head {
            let mut h = h.lock().expect("lock");
            if h.len() < 4096 {
                h.extend_from_slice(&buf[..n]);
            }
        }
        if frozen.load(std::sync::atomic::Ordering::Relaxed) {
            // Swallow what arrived after the freeze, as a dead link would.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The node id a pubgate node on a Redis broker logged at start (`node=<id>`).
pub fn node_id(node: &Node) -> String {
    let log = node.log();
    log.lines()
        .find(|l| l.contains("Redis broker configured"))
        .and_then(|l| l.split("node=").nth(1))
        .map(|s| {
            s.split_whitespace()
                .next()
                .unwrap_or("")
                .trim_matches('"')
                .to_string()
        })
        .unwrap_or_else(|| panic!("no node id in the log:\n{log}"))
}
