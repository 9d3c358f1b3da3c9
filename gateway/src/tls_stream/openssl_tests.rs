//! The record layer against `openssl s_client`: every suite of both versions, and on TLS 1.3 a
//! key update that OpenSSL asks the server to answer.

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::accept;
use super::record_tests::suites;
use super::tests::pki;

/// `openssl s_client` on every suite: a line each way, and on TLS 1.3 a key update it asks the
/// server to answer.
#[tokio::test]
async fn openssl_s_client_talks_to_every_suite() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("openssl not installed: skipped");
        return;
    }
    let pki = pki();
    for (suite, version) in suites() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let name = suite
            .suite()
            .as_str()
            .expect("suite name")
            .replace("TLS13_", "TLS_");
        let tls13 = version == &rustls::version::TLS13;
        let mut cmd = tokio::process::Command::new("openssl");
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")]);
        cmd.args(["-servername", "localhost", "-brief"]);
        if tls13 {
            cmd.args(["-tls1_3", "-ciphersuites", &name]);
        } else {
            cmd.args(["-tls1_2", "-cipher", &openssl_tls12_name(&name)]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn openssl");
        let (tcp, _) = listener.accept().await.expect("accept");
        let server = accept(tcp, pki.server.clone()).await.expect("handshake");
        let (r, mut w, _d) = server.split();
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let mut lines = BufReader::new(r);
        // s_client reads its input a buffer at a time and takes a buffer starting with "K" as
        // its key-update command: each line goes only after the previous one had its effect.
        let mut rounds = vec!["hello from openssl"];
        if tls13 {
            rounds.push("after a key update");
        }
        for (i, text) in rounds.into_iter().enumerate() {
            if i > 0 {
                // A KeyUpdate that asks for ours; s_client reports it on stderr once sent.
                stdin.write_all(b"K\n").await.unwrap();
                while let Some(l) = stderr.next_line().await.expect("stderr") {
                    if l.contains("KEYUPDATE") {
                        break;
                    }
                }
            }
            stdin
                .write_all(format!("{text}\n").as_bytes())
                .await
                .unwrap();
            let mut line = String::new();
            lines.read_line(&mut line).await.expect("a line");
            assert_eq!(line, format!("{text}\n"), "{name}");
            w.write_all(format!("{i} from pubgate {name}\n").as_bytes())
                .await
                .unwrap();
            w.flush().await.unwrap();
            let mut reply = String::new();
            stdout.read_line(&mut reply).await.expect("reply");
            assert_eq!(reply, format!("{i} from pubgate {name}\n"));
        }
        drop(stdin);
        w.shutdown().await.unwrap();
        let status = child.wait().await.expect("openssl exits");
        assert!(status.success(), "{name}: {status}");
    }
}

/// OpenSSL's name of a TLS 1.2 suite from its IANA name.
fn openssl_tls12_name(iana: &str) -> String {
    match iana {
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other,
    }
    .to_string()
}
