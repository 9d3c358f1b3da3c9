//! Test helpers for the Redis broker tests: real `redis-server` (standalone, cluster, Sentinel) and
//! `haproxy` processes on free loopback ports with their own temp dirs, `pubgate` nodes, and small
//! WebSocket/HTTP clients. Every process is started here and killed by its PID when its handle is
//! dropped. Nothing relies on port 6379.
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
fn kill(child: &mut Option<Child>) {
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

/// One `redis-server` process.
pub struct Redis {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `requirepass`, if any.
    pub password: Option<String>,
    extra: Vec<String>,
    dir: TempDir,
    child: Option<Child>,
}

impl Redis {
    /// A plain standalone server.
    pub fn start() -> Redis {
        Redis::start_with(None, &[])
    }

    /// A server with an optional password and extra `redis-server` arguments.
    pub fn start_with(password: Option<&str>, extra: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            password: password.map(str::to_string),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: TempDir::new("redis"),
            child: None,
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir.0)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"));
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p, "--masterauth", p]);
        }
        cmd.args(&self.extra);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        self.child = Some(
            cmd.spawn()
                .expect("start redis-server (apt-get install redis-server)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.try_cli(&["PING"]).is_some_and(|o| o.trim() == "PONG") {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// `redis://[:password@]127.0.0.1:port`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        cli_output(self.port, self.password.as_deref(), args)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|| panic!("redis-cli {args:?} on port {} failed", self.port))
    }

    /// Kills the server (SIGKILL, data gone: no persistence).
    pub fn stop(&mut self) {
        kill(&mut self.child);
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The server's PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Runs `redis-cli -p port [args]`; `None` if it could not run or failed.
pub fn cli_output(port: u16, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(p) = password {
        cmd.args(["-a", p, "--no-auth-warning"]);
    }
    let out = cmd.args(args).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// One `pubgate` node.
pub struct Node {
    /// Its WebSocket + HTTP address.
    pub addr: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    _dir: TempDir,
}

impl Node {
    /// Starts the `pubgate` binary with `env` (e.g. `PUBGATE__BROKER__KIND`) and waits for its
    /// "listening" line.
    pub fn start(env: &[(&str, String)]) -> Node {
        let dir = TempDir::new("node");
        let log = dir.join("pubgate.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate"));
        cmd.args(["--listen", "127.0.0.1:0"])
            .env("RUST_LOG", "info,broker_bridge=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
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
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("pubgate did not start; log:\n{}", read(&log)));
        Node {
            addr: addr.parse().expect("listen address"),
            child: Some(child),
            log,
            _dir: dir,
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

    /// Kills the node.
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
    let attempt = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

impl Ws {
    /// Connects to `ws://addr/ws`.
    pub async fn connect(addr: SocketAddr) -> Ws {
        let (stream, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap_or_else(|e| panic!("ws connect to {addr}: {e}"));
        Ws { stream, next_id: 1 }
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

/// An `haproxy` balancing WebSocket/HTTP over some nodes, health-checking `/readyz`.
pub struct Haproxy {
    /// The port clients connect to.
    pub port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl Haproxy {
    /// Starts haproxy in the foreground in front of `backends`.
    pub fn start(backends: &[SocketAddr]) -> Haproxy {
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let mut servers = String::new();
        for (i, b) in backends.iter().enumerate() {
            servers.push_str(&format!(
                "    server n{i} {b} check inter 500ms fall 2 rise 2\n"
            ));
        }
        let cfg = format!(
            "global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n    option http-server-close\n\nfrontend pubgate\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\nbackend nodes\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).expect("log"))
            .spawn()
            .expect("start haproxy (apt-get install haproxy)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy {
            port,
            child: Some(child),
            _dir: dir,
        }
    }

    /// The balancer's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill(&mut self.child);
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

/// A Redis Cluster of `masters` masters (no replicas), each its own `redis-server`.
pub struct Cluster {
    /// The masters.
    pub nodes: Vec<Redis>,
}

impl Cluster {
    /// Starts the servers and joins them with `redis-cli --cluster create`.
    pub fn start(masters: usize) -> Cluster {
        let nodes: Vec<Redis> = (0..masters)
            .map(|_| {
                let bus = free_port().to_string();
                Redis::start_with(
                    None,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--cluster-port",
                        &bus,
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            std::thread::sleep(Duration::from_millis(100));
        }
        Cluster { nodes }
    }

    /// Comma-separated seeds, the `broker.url` of a `redis-cluster` node.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis://{}", seeds.join(","))
    }

    /// Runs `redis-cli -c` (following redirects) against the first node.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut full = vec!["-c"];
        full.extend_from_slice(args);
        self.nodes[0].cli(&full)
    }

    /// `PUBSUB SHARDNUMSUB channel` summed over all masters.
    pub fn shard_numsub(&self, channel: &str) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                let out = n.cli(&["PUBSUB", "SHARDNUMSUB", channel]);
                out.lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }
}

/// A master, one replica and one Sentinel watching them as `mymaster`.
pub struct SentinelSet {
    /// The initial master.
    pub master: Redis,
    /// The initial replica.
    pub replica: Redis,
    /// The sentinel's port.
    pub sentinel_port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl SentinelSet {
    /// Starts master, replica and sentinel and waits until the sentinel knows the replica.
    pub fn start() -> SentinelSet {
        let master = Redis::start();
        let mport = master.port.to_string();
        let replica = Redis::start_with(None, &["--replicaof", "127.0.0.1", &mport]);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
        {
            assert!(Instant::now() < deadline, "replica did not sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        let dir = TempDir::new("sentinel");
        let port = free_port();
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\nprotected-mode no\ndir {}\nlogfile {}\n\
                 sentinel monitor mymaster 127.0.0.1 {mport} 1\n\
                 sentinel down-after-milliseconds mymaster 2000\n\
                 sentinel failover-timeout mymaster 10000\n\
                 sentinel parallel-syncs mymaster 1\n",
                dir.0.display(),
                dir.join("sentinel.log").display()
            ),
        )
        .expect("write sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let set = SentinelSet {
            master,
            replica,
            sentinel_port: port,
            child: Some(child),
            _dir: dir,
        };
        let rport = set.replica.port.to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let replicas = set.sentinel(&["SENTINEL", "REPLICAS", "mymaster"]);
            if replicas.contains(&rport) && !replicas.contains("s_down") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sentinel did not find the replica: {replicas}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        set
    }

    /// Runs `redis-cli` against the sentinel.
    pub fn sentinel(&self, args: &[&str]) -> String {
        cli_output(self.sentinel_port, None, args).unwrap_or_default()
    }

    /// The `broker.url` for nodes: `redis+sentinel://127.0.0.1:<sentinel>/mymaster`.
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/mymaster", self.sentinel_port)
    }

    /// The port Sentinel currently names as master.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.sentinel(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"]);
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}
