//! The first ten minutes: what a newcomer meets. Errors that name the source, the key and what it
//! takes (word for word); defaults that keep the README's promise (a default node resumes a client
//! with `recovered:true`, and holds as many connections as the open-files limit allows); logs in a
//! pipe without escape codes; HTTP errors with their own codes and a trailing newline; and the test
//! set-up script naming what it cannot install.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{HttpClient, Server, ServerBuilder, TempDir, WsClient, http_get};
use serde_json::json;

const EXIT: Duration = Duration::from_secs(10);

/// Starts pubgate with `args` and `env`, expects it to refuse with exit code 2, and returns the
/// error line.
async fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut b = ServerBuilder::new().args(args.iter().copied());
    for (k, v) in env {
        b = b.env(*k, *v);
    }
    let done = b.run_to_exit(EXIT).await;
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    done.stderr
        .lines()
        .find(|l| l.starts_with("pubgate: "))
        .unwrap_or_else(|| panic!("no error line: {}", done.stderr))
        .to_string()
}

/// Flags, environment variables, and the error line they must give.
type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, String);

#[tokio::test]
async fn config_errors_name_the_source_the_key_and_what_it_takes() {
    let dir = TempDir::new("first-run");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write config");
        path.display().to_string()
    };
    let typo = file("typo.toml", "[server]\nlisen = \"127.0.0.1:9000\"\n");
    let quoted = file("quoted.toml", "[history]\nsize = \"100\"\n");
    let policy = file("policy.toml", "[limits]\nslow_consumer = \"ignore\"\n");
    let broken = file("broken.toml", "[server\n");
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![("PUBGATE__SERVER__LISEN", "127.0.0.1:9000")],
            "pubgate: config: environment variable PUBGATE__SERVER__LISEN: server.lisen: \
             unknown key (did you mean server.listen?)"
                .into(),
        ),
        (
            vec!["--config", &typo],
            vec![],
            format!(
                "pubgate: config: file {typo}: server.lisen: unknown key (did you mean server.listen?)"
            ),
        ),
        (
            vec!["--config", &quoted],
            vec![],
            format!(
                "pubgate: config: file {quoted}: history.size: must be an integer, not string \"100\""
            ),
        ),
        (
            vec![],
            vec![("PUBGATE__BROKER__KIND", "kafka")],
            "pubgate: config: environment variable PUBGATE__BROKER__KIND: broker.kind: \
             must be one of memory, redis, redis-cluster, not \"kafka\""
                .into(),
        ),
        (
            vec!["--broker", "kafka"],
            vec![],
            "pubgate: config: flag --broker: broker.kind: must be one of memory, redis, \
             redis-cluster, not \"kafka\""
                .into(),
        ),
        (
            vec!["--config", &policy],
            vec![],
            format!(
                "pubgate: config: file {policy}: limits.slow_consumer: must be one of disconnect, \
                 drop_oldest, not \"ignore\""
            ),
        ),
        (
            vec![],
            vec![("PUBGATE__LOG__FORMAT", "xml")],
            "pubgate: config: environment variable PUBGATE__LOG__FORMAT: log.format: must be one \
             of plain, json, not \"xml\""
                .into(),
        ),
        (
            vec![],
            vec![("PUBGATE__HISTORY__SIZE", "lots")],
            "pubgate: config: environment variable PUBGATE__HISTORY__SIZE: history.size: must be \
             an integer, not string \"lots\""
                .into(),
        ),
        (
            vec!["--config", &broken],
            vec![],
            format!(
                "pubgate: config: file {broken}: not valid TOML (line 1, column 8): unclosed table, \
                 expected `]`"
            ),
        ),
    ];
    for (args, env, want) in cases {
        assert_eq!(
            refused(&args, &env).await,
            want,
            "args {args:?} env {env:?}"
        );
    }
}

#[tokio::test]
async fn a_default_node_resumes_a_client_across_a_disconnect() {
    let server = Server::start().await;
    let mut http = HttpClient::connect(server.addr).await;
    let mut ws = server.ws().await;
    ws.subscribe("first.resume", 1).await;
    for i in 1..=3 {
        http.publish("first.resume", format!("{{\"n\":{i}}}")).await;
    }
    let first = ws.recv().await;
    let epoch = first["epoch"].as_str().expect("message 1 names the epoch");
    let (_, _) = (ws.recv().await, ws.recv().await);
    ws.send_close(1000).await;
    for i in 4..=5 {
        http.publish("first.resume", format!("{{\"n\":{i}}}")).await;
    }
    let mut back = server.ws().await;
    let ack = back
        .request(&json!({"op":"subscribe","topic":"first.resume","id":2,
            "since":{"epoch":epoch,"offset":3}}))
        .await;
    assert_eq!(
        (&ack["recovered"], &ack["offset"]),
        (&json!(true), &json!(3)),
        "{ack}"
    );
    for i in 4..=5 {
        let m = back.recv().await;
        assert_eq!(
            (&m["offset"], &m["data"]),
            (&json!(i), &json!({ "n": i })),
            "{m}"
        );
    }
}

#[tokio::test]
async fn logs_in_a_pipe_have_no_escape_codes_and_the_connection_limit_fits_open_files() {
    // The harness reads stderr through a pipe: no colour codes, whatever the terminal says.
    let server = ServerBuilder::new()
        .env("TERM", "xterm-256color")
        .nofile_limit(1000)
        .start()
        .await;
    let mut ws = server.ws().await;
    ws.subscribe("first.logs", 1).await;
    drop(ws);
    // The harness collects stderr in the background: on a busy machine it may lag the server.
    let limit = "holding up to 938 WebSocket connections";
    common::poll_until(
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || server.stderr().contains(limit).then_some(()),
    )
    .await;
    let log = server.stderr();
    assert!(!log.contains('\u{1b}'), "escape codes in:\n{log}");
    // 1000 open files, 62 kept for everything else.
    assert!(log.contains(limit), "the limit is logged:\n{log}");
}

#[tokio::test]
async fn http_errors_have_their_own_codes_and_json_ends_in_a_newline() {
    let server = Server::start().await;
    let r = http_get(server.addr, "/nope").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            404,
            "{\"code\":\"not_found\",\"message\":\"no such route\"}\n"
        )
    );
    let mut http = HttpClient::connect(server.addr).await;
    let r = http.get("/v1/publish/first.http").await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            405,
            "{\"code\":\"method_not_allowed\",\"message\":\"method not allowed\"}\n"
        )
    );
    let r = http.post("/v1/publish/first.http", "1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.ends_with("}\n"), "{:?}", r.body);
}

#[tokio::test]
async fn wildcards_subscribe_and_misplaced_ones_say_why_not() {
    let server = Server::start().await;
    let mut ws: WsClient = server.ws().await;
    for (id, topic) in [(1, "scores.*"), (2, "scores.>")] {
        let reply = ws
            .request(&json!({"op":"subscribe","topic":topic,"id":id}))
            .await;
        // A wildcard's ack has no position, only the broker's time to resume it from.
        assert!(reply["time"].as_u64().is_some(), "{reply}");
        let mut reply = reply;
        reply.as_object_mut().unwrap().remove("time");
        assert_eq!(reply, json!({"op":"ack","id":id,"topic":topic}));
    }
    let reply = ws
        .request(&json!({"op":"subscribe","topic":"scores.>.live","id":3}))
        .await;
    assert_eq!(
        reply,
        json!({"op":"error","id":3,"code":"invalid_topic","message":
            "invalid wildcard: `*` must be a whole level and `>` the whole last level (scores.*, scores.>)"}),
    );
    let reply = ws
        .request(&json!({"op":"publish","topic":"scores.*","data":1,"id":4}))
        .await;
    assert_eq!(
        reply,
        json!({"op":"error","id":4,"code":"invalid_topic","message":
            "`*` and `>` are wildcards, which only a subscribe takes: name one topic"}),
    );
}

#[test]
fn test_deps_without_pyenv_names_what_is_missing() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/test-deps.sh");
    let out = Command::new("bash")
        .arg(script)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .expect("run test-deps.sh");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "test-deps: missing pyenv: the conformance tests (Autobahn wstest) need Python 2.7.18 \
         through pyenv.\ntest-deps: install pyenv, then 'pyenv install 2.7.18'; or set \
         WSTEST=/path/to/wstest.\n"
    );
}
