//! Redis servers (standalone, cluster, Sentinel) and HAProxy, each a child process killed by PID on
//! drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, free_port, kill};

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
        // `retries` + `redispatch 1`: a request to a node that was just killed (before the health
        // check notices) is retried on another node at once; without them HAProxy waits a
        // one-second turn-around per retry, which stalled the rolling-restart test's publisher
        // for as long as its clients were cut off.
        let cfg = format!(
            "global\n    maxconn 4096\n\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n    timeout tunnel 1h\n    option http-server-close\n    retries 3\n    option redispatch 1\n\nfrontend pubgate\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\nbackend nodes\n    balance roundrobin\n    option httpchk GET /readyz\n    http-check expect status 200\n{servers}"
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
