//! Test helpers for the Redis broker tests: real `redis-server` (standalone, cluster, Sentinel) and
//! `haproxy` processes on free loopback ports with their own temp dirs, `pubgate` nodes, and small
//! WebSocket/HTTP clients. Every process is started here and killed by its PID when its handle is
//! dropped. Nothing relies on port 6379. A node started with a fixed `--listen` can be stopped
//! (SIGTERM and [`Node::wait_exit`], or SIGKILL) and [restarted](Node::restart) on the same port.
//!
//! Some of this duplicates `tests/common/mod.rs` on main (node spawning, HTTP/WS helpers); it is kept
//! separate for now and meant to be merged.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

mod proxy;
mod servers;

#[allow(unused_imports)]
pub use proxy::{Proxy, node_id};
#[allow(unused_imports)]
pub use servers::{Cluster, Haproxy, Redis, SentinelSet, cli_output};

/// A free loopback port for a server a test starts. Taken below the kernel's ephemeral range (and
/// checked by binding it), so an outgoing connection cannot grab it before the server binds it.
pub fn free_port() -> u16 {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .filter(|low| *low > 12_000)
        .unwrap_or(32_768);
    for _ in 0..1000 {
        let port = 10_000 + rand::random::<u16>() % (low - 10_000);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A temp dir removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh dir under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "pubgate-{tag}-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }

    /// A path inside.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills a child by PID and reaps it.
pub(crate) fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Waits until `f` is true, polling; false on timeout.
pub async fn eventually(timeout: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One `pubgate` node.
pub struct Node {
    /// Its WebSocket + HTTP address.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    _dir: TempDir,
}

impl Node {
    /// Starts the `pubgate` binary with `env` (e.g. `PUBGATE__BROKER__KIND`) and waits for its
    /// "listening" line.
    pub fn start(env: &[(&str, String)]) -> Node {
        Node::start_with(&[], env)
    }

    /// Like [`Node::start`], with extra command-line arguments (e.g. `--config FILE`). A
    /// `--listen ADDR` among them replaces the default `127.0.0.1:0`, so the node can be
    /// [restarted](Node::restart) on the same port.
    pub fn start_with(args: &[&str], env: &[(&str, String)]) -> Node {
        let dir = TempDir::new("node");
        let mut node = Node {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
            log: dir.join("pubgate.log"),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            _dir: dir,
        };
        node.spawn();
        node
    }

    /// Starts the process and waits for its "listening" line. Its stderr is appended to the log,
    /// so a restarted node's log holds every run.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate"));
        if !self.args.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(&self.args)
            .env("RUST_LOG", "info,broker_bridge=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pubgate");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // Keep draining stdout so the node never blocks on a full pipe.
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("pubgate listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        self.child = Some(child);
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("pubgate did not start; log:\n{}", read(&self.log)));
        self.addr = addr.parse().expect("listen address");
    }

    /// Starts the node again (same arguments and env) after it stopped; with a fixed `--listen`
    /// it comes back on the same address.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "restart of a node that still runs");
        self.spawn();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM (the node drains, then exits); reap it with [`Node::wait_exit`].
    pub fn terminate(&mut self) {
        if let Some(child) = &mut self.child
            && child.try_wait().ok().flatten().is_none()
        {
            let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions; the child is not reaped yet, so
            // the PID is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    /// Waits up to `timeout` for the process to exit and reaps it; `None` if it still runs.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A node on the Redis broker at `url`, with history, plus extra env.
    pub fn redis(kind: &str, url: &str, extra: &[(&str, String)]) -> Node {
        let mut env = vec![
            ("PUBGATE__BROKER__KIND", kind.to_string()),
            ("PUBGATE__BROKER__URL", url.to_string()),
            ("PUBGATE__HISTORY__SIZE", "1000".to_string()),
        ];
        env.extend(extra.iter().cloned());
        Node::start(&env)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        read(&self.log)
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
        let (_, body) = http(self.addr, "GET", "/metrics", "").await;
        body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse().ok()).flatten()
        })
    }

    /// Opens a WebSocket to this node.
    pub async fn ws(&self) -> Ws {
        Ws::connect(self.addr).await
    }

    /// Kills the node (SIGKILL).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
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
