//! Helpers for the TLS tests: a throwaway CA that issues certificates with every key format the
//! gateway accepts, `pubgate` started through the shared harness (`tests/common`, which the test
//! crate declares as `mod common`), and TLS/WSS/HTTPS clients that trust the CA.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SignatureAlgorithm,
};
use rustls::ClientConfig;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

pub use crate::common::TempDir;
use crate::common::{Metrics, ServerBuilder, poll_until};

/// How long any single wait in these tests may take before it fails the test.
pub const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// The key algorithm and PEM encoding of an issued key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// ECDSA P-256, `PRIVATE KEY` (PKCS#8).
    EcdsaP256,
    /// ECDSA P-384, `PRIVATE KEY` (PKCS#8).
    EcdsaP384,
    /// ECDSA P-256, `EC PRIVATE KEY` (SEC1 / RFC 5915).
    EcSec1,
    /// RSA 2048, `PRIVATE KEY` (PKCS#8).
    RsaPkcs8,
    /// RSA 2048, `RSA PRIVATE KEY` (PKCS#1).
    RsaPkcs1,
    /// Ed25519, `PRIVATE KEY` (PKCS#8).
    Ed25519,
}

/// A certificate/key pair in PEM, plus the leaf's DER to compare with what a client sees.
#[derive(Clone)]
pub struct Issued {
    /// Leaf then CA, PEM.
    pub chain_pem: String,
    /// The private key, PEM in the format of its [`KeyKind`].
    pub key_pem: String,
    /// The leaf certificate, DER.
    pub leaf_der: Vec<u8>,
    /// The leaf's common name.
    pub cn: String,
}

impl Issued {
    /// The leaf's notAfter, Unix seconds.
    pub fn not_after(&self) -> i64 {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.leaf_der).expect("leaf parses");
        cert.validity().not_after.timestamp()
    }
}

/// A throwaway certificate authority.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
    next_serial: Mutex<u64>,
}

impl Ca {
    /// A fresh ECDSA P-256 root.
    pub fn new() -> Ca {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("CA key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, "pubgate test CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
            next_serial: Mutex::new(1),
        }
    }

    /// Issues a server certificate for `localhost` and `127.0.0.1`.
    pub fn issue(&self, cn: &str, kind: KeyKind) -> Issued {
        let alg: &'static SignatureAlgorithm = match kind {
            KeyKind::EcdsaP256 | KeyKind::EcSec1 => &rcgen::PKCS_ECDSA_P256_SHA256,
            KeyKind::EcdsaP384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            KeyKind::RsaPkcs8 | KeyKind::RsaPkcs1 => &rcgen::PKCS_RSA_SHA256,
            KeyKind::Ed25519 => &rcgen::PKCS_ED25519,
        };
        let key = KeyPair::generate_for(alg).expect("leaf key");
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let serial = {
            let mut n = self.next_serial.lock().expect("serial lock");
            *n += 1;
            *n
        };
        params.serial_number = Some(SerialNumber::from_slice(&serial.to_be_bytes()));
        params.not_after = rcgen::date_time_ymd(2031, 1, 2);
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        let pkcs8 = key.serialize_der();
        let key_pem = match kind {
            KeyKind::RsaPkcs1 => pem_encode("RSA PRIVATE KEY", &pkcs8_inner(&pkcs8)),
            KeyKind::EcSec1 => pem_encode("EC PRIVATE KEY", &pkcs8_ec_to_sec1(&pkcs8)),
            _ => key.serialize_pem(),
        };
        Issued {
            chain_pem: format!("{}{}", cert.pem(), self.pem),
            key_pem,
            leaf_der: cert.der().to_vec(),
            cn: cn.to_string(),
        }
    }

    /// A client config that trusts only this CA; full handshakes (no resumption) and the given
    /// protocol versions (empty: TLS 1.2 and 1.3).
    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        self.client_config_with(versions, false)
    }

    /// Like [`Ca::client_config`], optionally resuming sessions (in memory, per config).
    pub fn client_config_with(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        resume: bool,
    ) -> Arc<ClientConfig> {
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        self.client_config_provider(versions, resume, provider)
    }

    /// Like [`Ca::client_config_with`], with a chosen crypto provider (e.g. fewer key exchange
    /// groups).
    pub fn client_config_provider(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        resume: bool,
        provider: rustls::crypto::CryptoProvider,
    ) -> Arc<ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA is a valid root");
        let provider = Arc::new(provider);
        let versions = if versions.is_empty() {
            rustls::ALL_VERSIONS
        } else {
            versions
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        if !resume {
            // Every connection does a full handshake, so each one shows the certificate in service.
            config.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(config)
    }
}

impl Default for Ca {
    fn default() -> Self {
        Ca::new()
    }
}

/// Writes `issued` as `tls.crt` / `tls.key` into `dir`.
pub fn write_pair(dir: &Path, issued: &Issued) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    std::fs::write(&cert, &issued.chain_pem).expect("write cert");
    std::fs::write(&key, &issued.key_pem).expect("write key");
    (cert, key)
}

/// A directory laid out like a Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<version>`, swapped by atomically renaming a new `..data` symlink into place.
pub struct SecretDir {
    /// The mount point.
    pub root: PathBuf,
    version: u32,
}

impl SecretDir {
    /// Creates the layout holding `first`.
    pub fn new(root: &Path, first: (&str, &str)) -> SecretDir {
        std::fs::create_dir_all(root).expect("mkdir");
        let mut dir = SecretDir {
            root: root.to_path_buf(),
            version: 0,
        };
        dir.swap(first.0, first.1);
        for name in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{name}"), root.join(name)).expect("symlink");
        }
        dir
    }

    /// `tls.crt` as the gateway is told to read it.
    pub fn cert(&self) -> PathBuf {
        self.root.join("tls.crt")
    }

    /// `tls.key` as the gateway is told to read it.
    pub fn key(&self) -> PathBuf {
        self.root.join("tls.key")
    }

    /// Publishes new content the way the kubelet does: a new timestamped dir, then one atomic
    /// rename of the `..data` symlink.
    pub fn swap(&mut self, cert_pem: &str, key_pem: &str) {
        self.version += 1;
        let name = format!(
            "..2026_11_27_00_00_{:02}.{}",
            self.version,
            std::process::id()
        );
        let dir = self.root.join(&name);
        std::fs::create_dir(&dir).expect("mkdir version");
        std::fs::write(dir.join("tls.crt"), cert_pem).expect("write cert");
        std::fs::write(dir.join("tls.key"), key_pem).expect("write key");
        let tmp = self.root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&name, &tmp).expect("symlink tmp");
        std::fs::rename(&tmp, self.root.join("..data")).expect("atomic swap");
    }
}

// Minimal DER/PEM handling to turn rcgen's PKCS#8 keys into the legacy formats.

/// Splits one DER TLV off `input`: (tag, full TLV, content, rest).
fn der_next(input: &[u8]) -> (u8, &[u8], &[u8], &[u8]) {
    let tag = input[0];
    let (len, hdr) = if input[1] < 0x80 {
        (input[1] as usize, 2)
    } else {
        let n = (input[1] & 0x7f) as usize;
        let len = input[2..2 + n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, 2 + n)
    };
    (
        tag,
        &input[..hdr + len],
        &input[hdr..hdr + len],
        &input[hdr + len..],
    )
}

fn der_elements(mut content: &[u8]) -> Vec<(u8, &[u8], &[u8])> {
    let mut out = Vec::new();
    while !content.is_empty() {
        let (tag, full, inner, rest) = der_next(content);
        out.push((tag, full, inner));
        content = rest;
    }
    out
}

fn der_encode(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo` (for RSA: the PKCS#1 key).
fn pkcs8_inner(pkcs8: &[u8]) -> Vec<u8> {
    let (_, _, info, _) = der_next(pkcs8);
    let elems = der_elements(info);
    elems[2].2.to_vec()
}

/// A PKCS#8 EC key as SEC1 `ECPrivateKey`, with the curve in `[0] parameters` as OpenSSL writes it
/// (the PKCS#8 form keeps the curve in the algorithm identifier instead).
fn pkcs8_ec_to_sec1(pkcs8: &[u8]) -> Vec<u8> {
    let (_, _, info, _) = der_next(pkcs8);
    let elems = der_elements(info);
    let alg = der_elements(elems[1].2);
    let curve_oid = alg[1].1;
    let ec = pkcs8_inner(pkcs8);
    let (_, _, ec_content, _) = der_next(&ec);
    let parts = der_elements(ec_content);
    let mut content = Vec::new();
    content.extend_from_slice(parts[0].1); // version
    content.extend_from_slice(parts[1].1); // private key
    content.extend(der_encode(0xa0, curve_oid));
    for (tag, full, _) in &parts[2..] {
        if *tag != 0xa0 {
            content.extend_from_slice(full);
        }
    }
    der_encode(0x30, &content)
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// PEM-encodes `der` under `label`.
pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

// ---------------------------------------------------------------------------------------------
// The pubgate process
// ---------------------------------------------------------------------------------------------

/// `pubgate --listen 127.0.0.1:0` as the TLS tests start it: the harness's [`ServerBuilder`] with
/// `PUBGATE__LOG__LEVEL=info` (the reload messages the tests look for), killed on drop.
pub fn pubgate() -> ServerBuilder {
    ServerBuilder::new()
        .kill_on_drop()
        .env("PUBGATE__LOG__LEVEL", "info")
}

/// [`pubgate`] with TLS on the given files.
pub fn pubgate_tls(cert: &Path, key: &Path) -> ServerBuilder {
    pubgate().args([
        "--tls-cert",
        cert.to_str().expect("utf-8 path"),
        "--tls-key",
        key.to_str().expect("utf-8 path"),
    ])
}

/// Runs `pubgate ARGS` expecting it to exit within [`WAIT`] (a start-up failure); returns its
/// status, stdout and stderr. Blocking, for plain `#[test]`s.
pub fn run_to_exit(args: &[&str]) -> (ExitStatus, String, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let done = runtime.block_on(pubgate().args(args.iter().copied()).run_to_exit(WAIT));
    (done.status, done.stdout, done.stderr)
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A TLS connection to `addr`, verifying the server as `localhost`.
pub async fn tls_connect(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").expect("valid name");
    tokio::time::timeout(WAIT, TlsConnector::from(config.clone()).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake"))?
}

/// The leaf certificate the server presented.
pub fn peer_leaf(tls: &TlsStream<TcpStream>) -> Vec<u8> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("server sent a certificate")
}

/// The common name of a DER certificate, for readable assertion messages.
pub fn cn_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("cert parses");
    cert.subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("?")
        .to_string()
}

/// The CN of the certificate a fresh connection gets.
pub async fn served_cn(addr: SocketAddr, config: &Arc<ClientConfig>) -> String {
    let tls = tls_connect(addr, config).await.expect("TLS connect");
    cn_of(&peer_leaf(&tls))
}

/// A WebSocket over TLS.
pub type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// Opens `wss://localhost/ws`; also returns the leaf the server presented.
pub async fn wss_connect(addr: SocketAddr, config: &Arc<ClientConfig>) -> (Wss, Vec<u8>) {
    let tls = tls_connect(addr, config).await.expect("TLS connect");
    let leaf = peer_leaf(&tls);
    let (ws, resp) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    (ws, leaf)
}

/// Sends a JSON frame.
pub async fn send_json<S>(ws: &mut WebSocketStream<S>, v: Value)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next JSON text frame, skipping pings.
pub async fn next_json<S>(ws: &mut WebSocketStream<S>) -> Value
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame within the wait")
            .expect("stream open")
            .expect("frame ok");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("json frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Subscribes and waits for the ack.
pub async fn subscribe<S>(ws: &mut WebSocketStream<S>, topic: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    send_json(
        ws,
        serde_json::json!({"op": "subscribe", "topic": topic, "id": 1}),
    )
    .await;
    let ack = next_json(ws).await;
    assert_eq!(ack["op"], "ack", "subscribe reply: {ack}");
}

/// One HTTP/1.1 request with `Connection: close` over any stream; returns status and body.
pub async fn http_request<S>(mut io: S, method: &str, path: &str, body: &str) -> (u16, String)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    io.write_all(req.as_bytes()).await.expect("write request");
    io.flush().await.expect("flush request");
    let mut raw = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 8192];
        loop {
            match io.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
                // A peer that closes TCP without close_notify still sent the whole response.
                Err(_) => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "response within the wait");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    (status, dechunk(head, body))
}

/// Undoes `Transfer-Encoding: chunked` if the response used it.
fn dechunk(head: &str, body: &str) -> String {
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// An HTTPS request to the gateway.
pub async fn https(
    addr: SocketAddr,
    config: &Arc<ClientConfig>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let tls = tls_connect(addr, config).await.expect("TLS connect");
    http_request(tls, method, path, body).await
}

/// A plain HTTP request (the metrics listener).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    http_request(tcp, method, path, "").await
}

/// The value of one sample in a Prometheus text exposition (`name` includes any labels).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    Metrics {
        text: text.to_string(),
    }
    .get(name)
}

/// Polls `f` every 100 ms until it returns `Some`, or fails after [`WAIT`].
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    poll_until(WAIT, Duration::from_millis(100), async || f().await)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}
