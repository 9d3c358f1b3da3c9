//! The client side of `wss://` (and HTTPS for the publishers): rustls with one root certificate
//! given by `--tls-ca`, ALPN `http/1.1`. Only nodes whose URL is `wss://` or `https://` use it; a
//! plain `ws://` connection never touches this module.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A client config trusting the roots in the PEM file `ca` (and nothing else).
pub fn client_config(ca: &Path) -> anyhow::Result<Arc<ClientConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("--tls-ca {}: cannot read", ca.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("--tls-ca {}: unreadable PEM", ca.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "--tls-ca {}: no certificate found (expected a \"-----BEGIN CERTIFICATE-----\" block)",
        ca.display()
    );
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(c)
            .with_context(|| format!("--tls-ca {}: not a usable root certificate", ca.display()))?;
    }
    // An explicit provider: the redis client may compile in a second one, and then the
    // process-wide default would be ambiguous.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// How to open TLS to one node: the config and the name to verify its certificate against.
#[derive(Clone)]
pub struct TlsClient {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl TlsClient {
    /// For a node reached as `host` (an IP address or a DNS name).
    pub fn new(config: Arc<ClientConfig>, host: &str) -> anyhow::Result<TlsClient> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string())
            .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
        Ok(TlsClient {
            connector: TlsConnector::from(config),
            name,
        })
    }

    /// The TLS handshake over an open TCP connection.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// The name the certificate is checked against.
    pub fn server_name(&self) -> String {
        self.name.to_str().into_owned()
    }
}

impl std::fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsClient")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl PartialEq for TlsClient {
    fn eq(&self, o: &Self) -> bool {
        self.name == o.name && Arc::ptr_eq(self.connector.config(), o.connector.config())
    }
}

impl Eq for TlsClient {}
