//! `auth.jwks_url`: the identity provider's key set, fetched at start, on a timer, and when a token
//! names a `kid` the node does not know (so a provider can rotate keys without a restart).
//!
//! The URL comes from the configuration only; nothing of a token ever builds or changes it. A fetch
//! is bounded in time ([`FETCH_TIMEOUT`]) and size ([`MAX_JWKS_BYTES`]); refetches for unknown key
//! ids happen at most once per `auth.jwks_min_interval`, so a stream of tokens with made-up `kid`s
//! costs the provider nothing. A failed fetch keeps the keys the node has.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{JwtConfigError, MAX_JWKS_BYTES, Verifier, jwks_keys};
use crate::config::Auth;

/// The longest one fetch (connect, TLS, request, body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a fetch failed; logged, and the node keeps its keys.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Connecting or the TLS handshake failed.
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The provider answered with a status other than 2xx.
    #[error("status {0}")]
    Status(u16),
    /// The body was larger than [`MAX_JWKS_BYTES`] or broke off.
    #[error("body: {0}")]
    Body(String),
    /// The fetch took longer than [`FETCH_TIMEOUT`].
    #[error("timed out after {FETCH_TIMEOUT:?}")]
    Timeout,
    /// The body is not a usable JWKS.
    #[error("{0}")]
    Jwks(#[from] JwtConfigError),
}

/// Where the key set is, parsed once.
struct Target {
    host: String,
    port: u16,
    path: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

/// The fetcher of one node.
pub struct JwksSource {
    target: Target,
    verifier: Arc<Verifier>,
    refresh_interval: Duration,
    min_interval: Duration,
    /// When the last fetch started; also serializes fetches.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl JwksSource {
    /// Checks `auth.jwks_url` (https, or http to a loopback address only: a key set fetched in
    /// the clear could be replaced on the way) and prepares the TLS client.
    pub fn new(
        auth: &Auth,
        verifier: Arc<Verifier>,
    ) -> Result<Option<Arc<JwksSource>>, JwtConfigError> {
        let Some(url) = &auth.jwks_url else {
            return Ok(None);
        };
        let bad = |message: String| JwtConfigError::Invalid {
            key: "auth.jwks_url",
            message,
        };
        let uri: http::Uri = url.parse().map_err(|e| bad(format!("not a URL: {e}")))?;
        let host = uri
            .host()
            .ok_or_else(|| bad("has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") if is_loopback(&host) => false,
            Some("http") => {
                return Err(bad(
                    "must be https:// (http:// only to a loopback address)".into()
                ));
            }
            _ => return Err(bad("must be an https:// URL".into())),
        };
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map_or("/".to_string(), |p| p.as_str().to_string());
        let tls = if https {
            Some(tls_connector().map_err(bad)?)
        } else {
            None
        };
        Ok(Some(Arc::new(JwksSource {
            target: Target {
                host,
                port,
                path,
                tls,
            },
            verifier,
            refresh_interval: auth.jwks_refresh_interval,
            min_interval: auth.jwks_min_interval,
            last: tokio::sync::Mutex::new(None),
        })))
    }

    /// Fetches now and then every `auth.jwks_refresh_interval`, for the life of the process.
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                {
                    let mut last = me.last.lock().await;
                    *last = Some(Instant::now());
                    me.fetch_and_store().await;
                }
                tokio::time::sleep(me.refresh_interval).await;
            }
        });
    }

    /// A token named an unknown `kid`: fetch again, unless a fetch started less than
    /// `auth.jwks_min_interval` ago. Callers waiting here while another fetch runs see its keys.
    pub async fn refetch(&self) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_interval) {
            return;
        }
        *last = Some(Instant::now());
        self.fetch_and_store().await;
    }

    async fn fetch_and_store(&self) {
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(Ok(keys)) => {
                tracing::info!(keys = keys.len(), "JWKS fetched from auth.jwks_url");
                self.verifier.set_remote(keys);
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "JWKS fetch failed; keeping the keys the node has")
            }
            Err(_) => {
                tracing::warn!(error = %FetchError::Timeout, "JWKS fetch failed; keeping the keys the node has")
            }
        }
    }

    async fn fetch(&self) -> Result<Vec<super::Key>, FetchError> {
        let t = &self.target;
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(FetchError::Connect)?;
        let body = match &t.tls {
            None => get(tcp, t).await?,
            Some(connector) => {
                let name = rustls_pki_types::ServerName::try_from(t.host.clone())
                    .map_err(|e| FetchError::Connect(std::io::Error::other(e)))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(FetchError::Connect)?;
                get(tls, t).await?
            }
        };
        let text = std::str::from_utf8(&body).map_err(|e| FetchError::Body(e.to_string()))?;
        Ok(jwks_keys(text, "auth.jwks_url")?)
    }
}

/// One GET over `io`, the body bounded by [`MAX_JWKS_BYTES`].
async fn get<S>(io: S, t: &Target) -> Result<Bytes, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    let conn = tokio::spawn(conn);
    let host = if t.port == 80 || t.port == 443 {
        t.host.clone()
    } else {
        format!("{}:{}", t.host, t.port)
    };
    let req = http::Request::get(t.path.as_str())
        .header(http::header::HOST, host)
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| FetchError::Body(e.to_string()))?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        conn.abort();
        return Err(FetchError::Status(resp.status().as_u16()));
    }
    let limit = usize::try_from(MAX_JWKS_BYTES).unwrap_or(usize::MAX);
    let body = Limited::new(resp.into_body(), limit)
        .collect()
        .await
        .map_err(|e| FetchError::Body(e.to_string()))?
        .to_bytes();
    conn.abort();
    Ok(body)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// A TLS client trusting the system's CA bundle (`SSL_CERT_FILE`, else the usual Debian/RHEL
/// paths).
fn tls_connector() -> Result<tokio_rustls::TlsConnector, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let candidates = std::env::var("SSL_CERT_FILE").into_iter().chain(
        [
            "/etc/ssl/certs/ca-certificates.crt",
            "/etc/pki/tls/certs/ca-bundle.crt",
            "/etc/ssl/cert.pem",
        ]
        .map(String::from),
    );
    let mut roots = rustls::RootCertStore::empty();
    for path in candidates {
        let Ok(certs) = CertificateDer::pem_file_iter(&path) else {
            continue;
        };
        for cert in certs.flatten() {
            let _ = roots.add(cert);
        }
        if !roots.is_empty() {
            break;
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates found to check the JWKS server (set SSL_CERT_FILE)".into());
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}
