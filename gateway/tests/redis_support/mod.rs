//! Test helpers for the Redis broker tests: real `redis-server` (standalone, cluster, Sentinel) and
//! `haproxy` processes on free loopback ports with their own temp dirs, `pubgate` nodes, and small
//! WebSocket/HTTP clients. Every process is started here and killed by its PID when its handle is
//! dropped. Nothing relies on port 6379. A node started with a fixed `--listen` can be stopped
//! (SIGTERM and [`Node::wait_exit`], or SIGKILL) and [restarted](Node::restart) on the same port.
//!
//! Nodes are started through the shared harness (`tests/common`, which the test crate declares as
//! `mod common`); temp dirs, ports and polling come from there too.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub mod faults;
pub mod history;
mod proxy;
mod servers;

use crate::common::{Metrics, Server, ServerBuilder, poll_until};
pub use crate::common::{TempDir, free_port};

#[allow(unused_imports)]
pub use proxy::{Proxy, node_id};
#[allow(unused_imports)]
pub use servers::{Cluster, Haproxy, Redis, SentinelSet, cli_output};

/// Kills a child by PID and reaps it.
pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits until `f` is true, polling every 50 ms; false on timeout.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    poll_until(timeout, Duration::from_millis(50), async || {
        f().await.then_some(())
    })
    .await
    .is_some()
}

/// One `pubgate` node: a harness [`Server`] that can be stopped (SIGTERM and [`Node::wait_exit`],
/// or SIGKILL) and [restarted](Node::restart) with the same arguments and env.
pub struct Node {
    /// Its WebSocket + HTTP address.
    pub addr: SocketAddr,
    server: Option<Server>,
    builder: ServerBuilder,
    /// What the runs before the current one logged.
    past_log: String,
}

impl Node {
    /// Starts the `pubgate` binary with `env` (e.g. `PUBGATE__BROKER__KIND`) and waits for its
    /// "listening" line.
    pub async fn start(env: &[(&str, String)]) -> Node {
        Node::start_with(&[], env).await
    }

    /// Like [`Node::start`], with extra command-line arguments (e.g. `--config FILE`). A
    /// `--listen ADDR` among them replaces the default `127.0.0.1:0`, so the node can be
    /// [restarted](Node::restart) on the same port.
    pub async fn start_with(args: &[&str], env: &[(&str, String)]) -> Node {
        let mut builder = ServerBuilder::new()
            .kill_on_drop()
            .without_harness_grace()
            .env("RUST_LOG", "info,broker_bridge=debug")
            .args(args.iter().copied());
        if args.contains(&"--listen") {
            builder = builder.without_listen_flag();
        }
        for (k, v) in env {
            builder = builder.env(*k, v.clone());
        }
        let mut node = Node {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            server: None,
            builder,
            past_log: String::new(),
        };
        node.spawn().await;
        node
    }

    /// Starts the process and waits for its "listening" line.
    async fn spawn(&mut self) {
        let server = self.builder.clone().start().await;
        self.addr = server.addr;
        self.server = Some(server);
    }

    /// Forgets the process (killing it if it still runs), keeping what it logged.
    fn retire(&mut self) {
        if let Some(server) = self.server.take() {
            self.past_log.push_str(&server.stderr());
        }
    }

    /// Starts the node again (same arguments and env) after it stopped; with a fixed `--listen`
    /// it comes back on the same address.
    pub async fn restart(&mut self) {
        assert!(self.server.is_none(), "restart of a node that still runs");
        self.spawn().await;
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Server::pid)
    }

    /// Sends SIGTERM (the node drains, then exits); reap it with [`Node::wait_exit`].
    pub fn terminate(&mut self) {
        if let Some(server) = &mut self.server {
            server.sigterm();
        }
    }

    /// Waits up to `timeout` for the process to exit and reaps it; `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = self.server.as_mut()?.wait_exit(timeout).await?;
        self.retire();
        Some(status)
    }

    /// A node on the Redis broker at `url`, with history, plus extra env.
    pub async fn redis(kind: &str, url: &str, extra: &[(&str, String)]) -> Node {
        let mut env = vec![
            ("PUBGATE__BROKER__KIND", kind.to_string()),
            ("PUBGATE__BROKER__URL", url.to_string()),
            ("PUBGATE__HISTORY__SIZE", "1000".to_string()),
        ];
        env.extend(extra.iter().cloned());
        Node::start(&env).await
    }

    /// The node's log so far, every run of it.
    pub fn log(&self) -> String {
        let current = self.server.as_ref().map(Server::stderr).unwrap_or_default();
        format!("{}{current}", self.past_log)
    }

    /// `GET /readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        http(self.addr, "GET", "/readyz", "").await.0 == 200
    }

    /// Waits for readiness; panics with the log when it does not come.
    pub async fn wait_ready(&self, timeout: Duration) {
        if !eventually(timeout, async || self.is_ready().await).await {
            panic!("node {} not ready; log:\n{}", self.addr, self.log());
        }
    }

    /// `POST /v1/publish/{topic}`: status and body.
    pub async fn publish(&self, topic: &str, body: &str) -> (u16, String) {
        http(self.addr, "POST", &format!("/v1/publish/{topic}"), body).await
    }

    /// The value of one metric sample (exact name including labels), if present.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, text) = http(self.addr, "GET", "/metrics", "").await;
        Metrics { text }.get(name)
    }

    /// Opens a WebSocket to this node.
    pub async fn ws(&self) -> Ws {
        Ws::connect(self.addr).await
    }

    /// Kills the node (SIGKILL).
    pub fn stop(&mut self) {
        self.retire();
    }
}

/// A one-shot HTTP/1.1 request; returns status and body (status 0 when the connection failed).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    http_with(addr, method, path, &[], body).await
}

/// [`http`] with extra request headers (e.g. `("Authorization", "Bearer key")`).
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
        Some((status, body))
    };
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .flatten()
        .unwrap_or((0, String::new()))
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A WebSocket client speaking the pubgate protocol.
pub struct Ws {
    stream: WsStream,
    next_id: u64,
}

/// What [`Ws::next_frame`] read.
#[derive(Debug)]
pub enum Frame {
    /// A JSON text frame.
    Json(Value),
    /// The connection ended: with the close frame's code, or `None` when it ended without one
    /// (reset, EOF, a process that was killed).
    Closed(Option<u16>),
    /// Nothing arrived in time.
    Timeout,
}

impl Ws {
    /// Connects to `ws://addr/ws`.
    pub async fn connect(addr: SocketAddr) -> Ws {
        Ws::try_connect(addr)
            .await
            .unwrap_or_else(|e| panic!("ws connect to {addr}: {e}"))
    }

    /// Connects to `ws://addr/ws` within 5 s, or says why not (refused, 503 from a draining node or
    /// a balancer with no server up, …).
    pub async fn try_connect(addr: SocketAddr) -> Result<Ws, String> {
        let url = format!("ws://{addr}/ws");
        match tokio::time::timeout(
            Duration::from_secs(5),
            tokio_tungstenite::connect_async(url),
        )
        .await
        {
            Ok(Ok((stream, _))) => Ok(Ws { stream, next_id: 1 }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        }
    }

    /// The next JSON frame, a close, or a timeout (pings and pongs skipped).
    pub async fn next_frame(&mut self, timeout: Duration) -> Frame {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let Ok(next) = tokio::time::timeout_at(deadline, self.stream.next()).await else {
                return Frame::Timeout;
            };
            match next {
                None | Some(Err(_)) => return Frame::Closed(None),
                Some(Ok(WsMessage::Text(t))) => {
                    return Frame::Json(
                        serde_json::from_str(t.as_str())
                            .unwrap_or_else(|e| panic!("invalid JSON from the server {t:?}: {e}")),
                    );
                }
                Some(Ok(WsMessage::Close(c))) => {
                    return Frame::Closed(c.map(|c| u16::from(c.code)));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends one JSON frame.
    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(WsMessage::text(v.to_string()))
            .await
            .expect("ws send");
    }

    /// The next JSON frame, or `None` on timeout/close.
    pub async fn recv(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .ok()??
                .ok()?;
            match msg {
                WsMessage::Text(t) => return serde_json::from_str(t.as_str()).ok(),
                WsMessage::Close(_) => return None,
                _ => continue,
            }
        }
    }

    /// Subscribes and returns the reply (an `ack` or an `error`).
    pub async fn subscribe(&mut self, topic: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(serde_json::json!({"op":"subscribe","topic":topic,"id":id}))
            .await;
        self.reply(id).await
    }

    /// Unsubscribes and returns the reply.
    pub async fn unsubscribe(&mut self, topic: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(serde_json::json!({"op":"unsubscribe","topic":topic,"id":id}))
            .await;
        self.reply(id).await
    }

    /// Publishes over WebSocket and returns the reply.
    pub async fn publish(&mut self, topic: &str, data: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(serde_json::json!({"op":"publish","topic":topic,"data":data,"id":id}))
            .await;
        self.reply(id).await
    }

    async fn reply(&mut self, id: u64) -> Value {
        loop {
            let v = self
                .recv(Duration::from_secs(10))
                .await
                .unwrap_or_else(|| panic!("no reply to request {id}"));
            if v["id"] == id {
                return v;
            }
        }
    }

    /// The next `message` frame within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.recv(left).await?;
            if v["op"] == "message" {
                return Some(v);
            }
        }
    }

    /// Closes the connection.
    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// Collects every `message` frame of several clients, each on its own task.
pub struct Collector {
    /// Per client: the frames received, in order.
    pub got: Vec<Arc<Mutex<Vec<Value>>>>,
    tasks: Vec<tokio::task::JoinHandle<Ws>>,
}

impl Collector {
    /// Starts reading `clients` until each saw `expect` messages or `timeout` passed.
    pub fn start(clients: Vec<Ws>, expect: usize, timeout: Duration) -> Collector {
        let mut got = Vec::new();
        let mut tasks = Vec::new();
        for mut ws in clients {
            let sink = Arc::new(Mutex::new(Vec::new()));
            got.push(sink.clone());
            tasks.push(tokio::spawn(async move {
                let deadline = tokio::time::Instant::now() + timeout;
                while sink.lock().expect("lock").len() < expect {
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    match ws.next_message(left).await {
                        Some(m) => sink.lock().expect("lock").push(m),
                        None => break,
                    }
                }
                ws
            }));
        }
        Collector { got, tasks }
    }

    /// Waits for every reader and returns the clients and what each received.
    pub async fn finish(self) -> (Vec<Ws>, Vec<Vec<Value>>) {
        let mut clients = Vec::new();
        for t in self.tasks {
            clients.push(t.await.expect("reader task"));
        }
        let got = self
            .got
            .iter()
            .map(|g| g.lock().expect("lock").clone())
            .collect();
        (clients, got)
    }
}
