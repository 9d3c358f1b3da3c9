//! Password and ACL-user authentication through the URL, and TLS (`rediss://`) to Redis.
//!
//! Needs `redis-server` (built with TLS, as Debian's is) and `openssl` on PATH.

mod common;
mod redis_support;

use std::process::Command;
use std::time::Duration;

use redis_support::{Node, Redis, TempDir, free_port};
use serde_json::json;

const READY: Duration = Duration::from_secs(15);

/// Subscribes on one node, publishes through another and raw into Redis, checks both arrive.
async fn round_trip(subscriber: &Node, publisher: &Node, redis: &Redis, topic: &str) {
    let mut ws = subscriber.ws().await;
    let ack = ws.subscribe(topic).await;
    assert_eq!(ack["op"], "ack", "{ack}");
    let (status, body) = publisher.publish(topic, r#"{"n":1}"#).await;
    assert_eq!(status, 200, "{body}");
    redis.cli(&["PUBLISH", &format!("pubgate:{topic}"), r#"{"n":2}"#]);
    let m = ws
        .next_message(Duration::from_secs(5))
        .await
        .expect("gateway message");
    assert_eq!(
        (m["offset"].clone(), m["data"].clone()),
        (json!(1), json!({"n":1}))
    );
    let m = ws
        .next_message(Duration::from_secs(5))
        .await
        .expect("raw message");
    assert_eq!(m["data"], json!({"n":2}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_through_the_url() {
    let redis = Redis::start_with(Some("s3cret-pw"), &[]);
    let a = Node::redis("redis", &redis.url(), &[]).await;
    let b = Node::redis("redis", &redis.url(), &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    round_trip(&a, &b, &redis, "auth.pw").await;

    // A wrong password: the node starts, stays not-ready, refuses publishes, and says why.
    let wrong = Node::redis(
        "redis",
        &format!("redis://:wrong@127.0.0.1:{}", redis.port),
        &[],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!wrong.is_ready().await);
    let (status, body) = wrong.publish("auth.pw", "{}").await;
    assert_eq!(status, 503, "{body}");
    let log = wrong.log();
    assert!(
        log.contains("WRONGPASS") || log.contains("invalid password"),
        "the log names the auth failure:\n{log}"
    );
    assert!(
        !log.contains("wrong@"),
        "the log must not contain the URL's password"
    );
}

/// The least a node's Redis user needs (documented in docs/broker.md).
const NODE_ACL: &[&str] = &[
    "on",
    ">pg-user-pw",
    "resetchannels",
    "&pubgate:*",
    "resetkeys",
    "~pubgate:*",
    "-@all",
    "+hello",
    "+auth",
    "+info",
    "+ping",
    "+client|setname",
    "+role",
    "+evalsha",
    "+eval",
    "+script|load",
    "+publish",
    "+spublish",
    "+subscribe",
    "+unsubscribe",
    "+ssubscribe",
    "+sunsubscribe",
    "+get",
    "+set",
    "+incr",
    "+del",
    "+pexpire",
    "+xadd",
    "+xrange",
    "+xtrim",
    "+time",
    "+psubscribe",
    "+punsubscribe",
    "+zadd",
    "+zrangebyscore",
    "+zremrangebyscore",
    "+xrevrange",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_with_the_documented_minimal_permissions() {
    let redis = Redis::start_with(Some("admin-pw"), &[]);
    let mut args = vec!["ACL", "SETUSER", "pubgate"];
    args.extend_from_slice(NODE_ACL);
    assert_eq!(redis.cli(&args).trim(), "OK");
    // Redis checks a PSUBSCRIBE pattern literally against the channel patterns: each wildcard
    // prefix served needs its own (docs/broker.md).
    let wild = ["ACL", "SETUSER", "pubgate", "&pubgate:auth.*"];
    assert_eq!(redis.cli(&wild).trim(), "OK");
    let url = format!("redis://pubgate:pg-user-pw@127.0.0.1:{}", redis.port);
    let a = Node::redis("redis", &url, &[]).await;
    let b = Node::redis("redis", &url, &[]).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    round_trip(&a, &b, &redis, "auth.acl").await;
    // A wildcard resume: pattern subscription, the directory, the seek by time.
    let mut ws = a.ws().await;
    let ack = ws.subscribe("auth.*").await;
    let time = ack["time"].as_u64().unwrap_or_else(|| panic!("{ack}"));
    ws.close().await;
    let (status, body) = b.publish("auth.x", r#"{"n":1}"#).await;
    assert_eq!(status, 200, "{body}");
    let mut ws = a.ws().await;
    ws.send(json!({"op":"subscribe","topic":"auth.*","id":"r","since":{"time":time}}))
        .await;
    let ack = ws.recv(Duration::from_secs(5)).await.expect("resume ack");
    assert_eq!(
        (&ack["id"], &ack["recovered"]),
        (&json!("r"), &json!(true)),
        "{ack}"
    );
    let m = ws
        .next_message(Duration::from_secs(5))
        .await
        .expect("replay");
    assert_eq!(
        (&m["topic"], &m["offset"]),
        (&json!("auth.x"), &json!(1)),
        "{m}"
    );
    let denied = redis.cli(&["ACL", "LOG"]);
    assert!(!denied.contains("pubgate"), "ACL denials: {denied}");
}

fn openssl(dir: &TempDir, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(&dir.0)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it.
fn certificates() -> TempDir {
    let dir = TempDir::new("tls");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pubgate test CA",
    ]);
    openssl(&dir, &ca);
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&[
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(&dir, &csr);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write san.ext");
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_redis_with_rediss_urls() {
    let certs = certificates();
    let tls_port = free_port();
    let path = |f: &str| certs.join(f).to_string_lossy().into_owned();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let redis = Redis::start_with(
        Some("tls-pw"),
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "no",
        ],
    );
    // The nodes trust the test CA through SSL_CERT_FILE (read by rustls-native-certs).
    let url = format!("rediss://:tls-pw@127.0.0.1:{tls_port}");
    let env = [("SSL_CERT_FILE", ca.clone())];
    let a = Node::redis("redis", &url, &env).await;
    let b = Node::redis("redis", &url, &env).await;
    a.wait_ready(READY).await;
    b.wait_ready(READY).await;
    round_trip(&a, &b, &redis, "tls.demo").await;
    // All three of each node's connections (commands, history reads, subscriptions) really are
    // TLS ones (on the TLS port).
    let clients = redis.cli(&["CLIENT", "LIST"]);
    let ours: Vec<&str> = clients
        .lines()
        .filter(|l| l.contains("name=pubgate-"))
        .collect();
    assert_eq!(ours.len(), 6, "{clients}");
    assert!(
        ours.iter()
            .all(|l| l.contains(&format!("laddr=127.0.0.1:{tls_port}"))),
        "{clients}"
    );

    // Without the CA, certificate verification fails and the node stays not-ready.
    let untrusting = Node::redis("redis", &url, &[("SSL_CERT_FILE", path("server.key"))]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!untrusting.is_ready().await, "{}", untrusting.log());
}
