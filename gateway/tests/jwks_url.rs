//! `auth.jwks_url`: a key set served by a local HTTP server, rotated while connections stay up,
//! refetched for unknown key ids at most once per `auth.jwks_min_interval`.

mod common;
mod jwt_support;
// Only its throwaway CA is used here; the rest of the module serves the TLS tests.
#[allow(unused_imports)]
mod tls_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{RawWs, Server, tcp_connect, wait_until};
use jsonwebtoken::Algorithm;
use jwt_support::{KeyPair, claims};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A one-route HTTP server on 127.0.0.1 that serves whatever key set it holds, and counts requests.
struct JwksServer {
    url: String,
    body: Arc<Mutex<String>>,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(keys: &[Value]) -> JwksServer {
        JwksServer::start_with(keys, None).await
    }

    /// Serves over TLS with `acceptor` when given (the URL is then https://).
    async fn start_with(keys: &[Value], acceptor: Option<tokio_rustls::TlsAcceptor>) -> JwksServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let url = format!(
            "{scheme}://{}/.well-known/jwks.json",
            listener.local_addr().expect("addr")
        );
        let body = Arc::new(Mutex::new(json!({"keys": keys}).to_string()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (b, n) = (body.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let (b, n, acceptor) = (b.clone(), n.clone(), acceptor.clone());
                tokio::spawn(async move {
                    match acceptor {
                        None => answer(s, b, n).await,
                        Some(a) => {
                            if let Ok(tls) = a.accept(s).await {
                                answer(tls, b, n).await;
                            }
                        }
                    }
                });
            }
        });
        JwksServer {
            url,
            body,
            requests,
            task,
        }
    }

    fn serve(&self, keys: &[Value]) {
        *self.body.lock().expect("lock") = json!({"keys": keys}).to_string();
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Reads one request head and answers it with the current key set.
async fn answer<S>(mut s: S, body: Arc<Mutex<String>>, requests: Arc<AtomicUsize>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    assert!(
        buf.starts_with(b"GET /.well-known/jwks.json "),
        "the configured path"
    );
    requests.fetch_add(1, Ordering::SeqCst);
    let body = body.lock().expect("lock").clone();
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn upgrade_status(server: &Server, token: &str) -> u16 {
    let bearer = format!("Bearer {token}");
    match RawWs::handshake_with(
        tcp_connect(server.addr).await,
        server.addr,
        "/ws",
        &[("Authorization", &bearer)],
    )
    .await
    {
        Ok(_) => 101,
        Err(r) => r.status,
    }
}

#[tokio::test]
async fn keys_rotate_through_the_jwks_url_while_connections_stay_up() {
    let (k1, k2, k3) = (KeyPair::ec(), KeyPair::ec(), KeyPair::ec());
    let jwks = JwksServer::start(&[k1.ec_jwk("k1")]).await;
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWKS_URL", &jwks.url)
        .env("PUBGATE__AUTH__JWKS_MIN_INTERVAL", "0s")
        .env("PUBGATE__AUTH__JWKS_REFRESH_INTERVAL", "1h")
        .start()
        .await;
    wait_until("the first fetch", Duration::from_secs(10), || async {
        jwks.requests() >= 1
    })
    .await;
    let ok = claims(&[">"], &[]);
    let url = |t: &str| format!("ws://{}/ws?access_token={t}", server.addr);
    let mut old = common::WsClient::try_connect(&url(&k1.sign(Algorithm::ES256, Some("k1"), &ok)))
        .await
        .expect("k1 connects");
    old.subscribe("a.b", 1).await;

    // The provider adds k2: the first token naming it makes the node fetch again.
    jwks.serve(&[k1.ec_jwk("k1"), k2.ec_jwk("k2")]);
    let before = jwks.requests();
    assert_eq!(
        upgrade_status(&server, &k2.sign(Algorithm::ES256, Some("k2"), &ok)).await,
        101
    );
    assert_eq!(jwks.requests(), before + 1, "one fetch for the unknown kid");
    // A known kid costs no fetch.
    assert_eq!(
        upgrade_status(&server, &k2.sign(Algorithm::ES256, Some("k2"), &ok)).await,
        101
    );
    assert_eq!(jwks.requests(), before + 1);

    // The provider retires k1. An unknown kid (k3) triggers a fetch, after which k1 is gone.
    jwks.serve(&[k2.ec_jwk("k2")]);
    assert_eq!(
        upgrade_status(&server, &k3.sign(Algorithm::ES256, Some("k3"), &ok)).await,
        401
    );
    assert_eq!(
        upgrade_status(&server, &k1.sign(Algorithm::ES256, Some("k1"), &ok)).await,
        401
    );
    // The connection that came in with k1 is still up until its own token expires.
    old.ping_pong(2).await;
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_min_interval() {
    let k1 = KeyPair::ec();
    let jwks = JwksServer::start(&[k1.ec_jwk("k1")]).await;
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWKS_URL", &jwks.url)
        .env("PUBGATE__AUTH__JWKS_MIN_INTERVAL", "1h")
        .start()
        .await;
    wait_until("the first fetch", Duration::from_secs(10), || async {
        jwks.requests() >= 1
    })
    .await;
    let fetched = jwks.requests();
    let ok = claims(&[">"], &[]);
    for i in 0..5 {
        let kid = format!("made-up-{i}");
        assert_eq!(
            upgrade_status(&server, &k1.sign(Algorithm::ES256, Some(&kid), &ok)).await,
            401
        );
    }
    assert_eq!(
        jwks.requests(),
        fetched,
        "no refetch within auth.jwks_min_interval"
    );
    assert_eq!(
        upgrade_status(&server, &k1.sign(Algorithm::ES256, Some("k1"), &ok)).await,
        101
    );
}

#[tokio::test]
async fn a_jwks_url_in_the_clear_to_another_host_is_refused_at_start() {
    let done = Server::builder()
        .env(
            "PUBGATE__AUTH__JWKS_URL",
            "http://idp.example.com/jwks.json",
        )
        .run_to_exit(Duration::from_secs(10))
        .await;
    assert_eq!(done.status.code(), Some(2), "{}", done.stderr);
    assert!(done.stderr.contains("auth.jwks_url"), "{}", done.stderr);
}

#[tokio::test]
async fn the_key_set_is_fetched_over_https_checked_against_the_system_cas() {
    use rustls_pki_types::pem::PemObject;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let ca = tls_support::Ca::new();
    let issued = ca.issue("jwks.test", tls_support::KeyKind::EcdsaP256);
    let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("chain");
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let k1 = KeyPair::ec();
    let jwks = JwksServer::start_with(&[k1.ec_jwk("k1")], Some(acceptor)).await;
    // The chain file holds the test CA, which the node then trusts as a system CA.
    let bundle = common::TempFile::new("ca.pem", &issued.chain_pem);
    let server = Server::builder()
        .env("PUBGATE__AUTH__JWKS_URL", &jwks.url)
        .env("SSL_CERT_FILE", bundle.arg())
        .start()
        .await;
    wait_until("the first fetch", Duration::from_secs(10), || async {
        jwks.requests() >= 1
    })
    .await;
    let ok = claims(&[">"], &[]);
    wait_until("k1 verifies", Duration::from_secs(10), || async {
        upgrade_status(&server, &k1.sign(Algorithm::ES256, Some("k1"), &ok)).await == 101
    })
    .await;
}
