//! TLS termination on the main listener: loading the PEM pair, serving it through a resolver that
//! can be swapped while the node runs, and the task that reloads it when the files change.
//!
//! Reload is by polling the files' *content*, not their mtimes or inotify events: Kubernetes
//! updates a Secret volume by atomically re-pointing a `..data` symlink, which a watch on the
//! files misses and which leaves the visible files' own metadata untouched. Reading two small
//! files once a second costs nothing and sees every way of replacing them. SIGHUP forces a reload.
//!
//! A reload only ever replaces the pair new handshakes get; established connections keep the
//! keys they negotiated. A pair that fails to load is logged, counted and ignored: the old pair
//! stays in service until a good one appears.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{InconsistentKeys, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::config::Settings;
use crate::metrics::{Metrics, TlsMetrics};
use crate::tls_stream::{self, TlsConn};

/// How often the reload task reads the files. A change is applied once two consecutive reads
/// agree (see [`ReloadState`]), so new handshakes see a new pair one to two periods later.
pub const RELOAD_POLL: Duration = Duration::from_secs(1);

/// Config keys, used in error messages so operators know which setting points at the bad file.
const CERT_KEY: &str = "tls.cert";
const KEY_KEY: &str = "tls.key";

/// Installs aws-lc-rs as the process-wide rustls provider.
///
/// Every rustls user in the process (our listener, and later the Redis TLS client) then agrees on
/// one provider, and `ServerConfig::builder()` cannot panic over an ambiguous choice. Calling it
/// again is harmless.
pub fn install_default_provider() {
    // Err only means a provider is already installed (a second call, or a test harness).
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// Why a certificate/key pair could not be loaded. Every variant names the config key and file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read (missing, permissions, a directory, …).
    #[error("{key}: cannot read {}: {cause}", path.display())]
    Read {
        /// `tls.cert` or `tls.key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error. Part of the message rather than a `source`, so reload logs (which print
        /// the message only) keep it and start-up errors do not print it twice.
        cause: io::Error,
    },
    /// The file was read but does not hold what the key needs.
    #[error("{key}: {}: {problem}", path.display())]
    Invalid {
        /// `tls.cert` or `tls.key`.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        problem: String,
    },
    /// Both files are fine on their own but the key is not the certificate's.
    #[error(
        "tls.key: the private key in {} does not match the certificate in {} (tls.cert)",
        key.display(),
        cert.display()
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// rustls refused the configuration (no usable protocol version with this provider).
    #[error("tls: cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// Where the pair lives.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first (`tls.cert`).
    pub cert: PathBuf,
    /// PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`tls.key`).
    pub key: PathBuf,
}

/// The raw bytes of both files at one moment; compared to notice a change.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot {
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// A parsed pair, ready to serve.
struct Loaded {
    key: Arc<CertifiedKey>,
    /// notAfter of the leaf, seconds since the Unix epoch.
    not_after: i64,
    /// For the log line: which certificate is now in service.
    subject: String,
    serial: String,
}

impl TlsFiles {
    fn read(&self) -> Result<Snapshot, TlsError> {
        let read = |key: &'static str, path: &Path| {
            std::fs::read(path).map_err(|cause| TlsError::Read {
                key,
                path: path.to_path_buf(),
                cause,
            })
        };
        Ok(Snapshot {
            cert: read(CERT_KEY, &self.cert)?,
            key: read(KEY_KEY, &self.key)?,
        })
    }

    fn invalid(&self, key: &'static str, problem: impl Into<String>) -> TlsError {
        let path = if key == CERT_KEY {
            &self.cert
        } else {
            &self.key
        };
        TlsError::Invalid {
            key,
            path: path.clone(),
            problem: problem.into(),
        }
    }

    /// Parses a snapshot into a servable pair, checking that the key belongs to the leaf.
    fn parse(&self, snap: &Snapshot, provider: &CryptoProvider) -> Result<Loaded, TlsError> {
        let chain = CertificateDer::pem_slice_iter(&snap.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(CERT_KEY, format!("unreadable PEM: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(self.invalid(
                CERT_KEY,
                "no certificate found (expected a \"-----BEGIN CERTIFICATE-----\" block)",
            ));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
            self.invalid(
                CERT_KEY,
                format!("the first certificate is not valid X.509: {e}"),
            )
        })?;
        let not_after = parsed.validity().not_after.timestamp();
        let subject = parsed.subject().to_string();
        let serial = parsed.raw_serial_as_string();

        let der = match PrivateKeyDer::from_pem_slice(&snap.key) {
            Ok(der) => der,
            Err(pem::Error::NoItemsFound) => {
                return Err(self.invalid(
                    KEY_KEY,
                    "no private key found (expected a \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \
                     \"EC PRIVATE KEY\" PEM block)",
                ));
            }
            Err(e) => return Err(self.invalid(KEY_KEY, format!("unreadable PEM: {e}"))),
        };
        let signing_key = provider.key_provider.load_private_key(der).map_err(|e| {
            self.invalid(KEY_KEY, format!("unsupported or corrupt private key: {e}"))
        })?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            // The provider could not tell the key's public half; the handshake will show it.
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
                tracing::warn!(key = %self.key.display(), "cannot check that tls.key matches tls.cert");
            }
            Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::Mismatch {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                });
            }
            Err(e) => {
                return Err(self.invalid(CERT_KEY, format!("unusable certificate: {e}")));
            }
        }
        Ok(Loaded {
            key: Arc::new(certified),
            not_after,
            subject,
            serial,
        })
    }
}

/// Hands every new handshake the pair currently in service.
///
/// A lock rather than a fixed `ServerConfig` so a reload is a pointer swap: handshakes in flight
/// keep the `Arc` they already took, and the config (session cache, ALPN) stays the same.
pub struct CertResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertResolver {
    fn get(&self) -> Arc<CertifiedKey> {
        // Nothing panics while holding the lock, so poisoning cannot carry a half-written value.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
    }
}

impl fmt::Debug for CertResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // One pair for every name: the node serves one service; SNI-less clients (IP addresses)
        // get it too.
        Some(self.get())
    }
}

/// What the reload task remembers between polls.
///
/// A change is applied only once two consecutive reads return the same bytes, so a pair being
/// copied in file by file (cert written, key not yet) is not mistaken for a broken pair. Content
/// that already failed is not retried (nor logged again) until it changes.
struct ReloadState {
    /// The files' content as last loaded successfully.
    active: Snapshot,
    /// What the previous poll saw, when it differed from `active`.
    pending: Option<Result<Snapshot, String>>,
    /// The last outcome reported as an error, to log each distinct failure once.
    failed: Option<Result<Snapshot, String>>,
}

/// How long a TLS handshake may take, and how many may be in progress at once.
#[derive(Clone, Copy, Debug)]
pub struct HandshakeLimits {
    /// `server.handshake_timeout`.
    pub timeout: Duration,
    /// `tls.max_handshakes`.
    pub max_in_progress: usize,
}

/// The TLS side of the main listener: the server configuration and the reload machinery behind it.
pub struct TlsTerminator {
    /// Shared by every handshake; holds the resolver, so a reload needs no new configuration.
    config: Arc<ServerConfig>,
    resolver: Arc<CertResolver>,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    handshake_timeout: Duration,
    /// One permit per handshake in progress (`tls.max_handshakes`).
    handshakes: Semaphore,
    metrics: Arc<Metrics>,
    tls_metrics: TlsMetrics,
    state: Mutex<ReloadState>,
}

impl TlsTerminator {
    /// Builds the terminator when `tls.cert` and `tls.key` are set; `Ok(None)` when TLS is off.
    /// Start-up fails on any problem with the files, naming the key and the file.
    pub fn from_settings(
        settings: &Settings,
        metrics: Arc<Metrics>,
    ) -> Result<Option<Arc<TlsTerminator>>, TlsError> {
        let (Some(cert), Some(key)) = (&settings.tls.cert, &settings.tls.key) else {
            return Ok(None);
        };
        let files = TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
        };
        let limits = HandshakeLimits {
            timeout: settings.server.handshake_timeout,
            max_in_progress: settings.tls.max_handshakes,
        };
        Self::new(files, limits, metrics).map(Some)
    }

    /// Loads the pair and builds the server configuration (TLS 1.2 and 1.3, ALPN `http/1.1`).
    pub fn new(
        files: TlsFiles,
        limits: HandshakeLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<TlsTerminator>, TlsError> {
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let snapshot = files.read()?;
        let loaded = files.parse(&snapshot, &provider)?;
        let resolver = Arc::new(CertResolver {
            current: RwLock::new(loaded.key.clone()),
        });
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // WebSocket needs HTTP/1.1 (no RFC 8441 support), and the API is served on HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Stateless session tickets: a reconnecting client (a dashboard after a network blip, or
        // after its node drained) resumes without a certificate signature, and the node keeps no
        // per-client state for it, unlike the default 256-entry session cache that thousands of
        // clients would only churn. Tickets from another node fail to decrypt: a full handshake.
        config.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Config)?;
        // After the handshake the keys move to pubgate's record layer (see `tls_stream`), which
        // keeps far less per connection than rustls' connection object.
        config.enable_secret_extraction = true;
        let tls_metrics = metrics.register_tls();
        tls_metrics.cert_expiry.set(loaded.not_after);
        tracing::info!(
            cert = %files.cert.display(),
            subject = %loaded.subject,
            serial = %loaded.serial,
            not_after = loaded.not_after,
            "TLS certificate loaded"
        );
        warn_if_expired(&loaded);
        Ok(Arc::new(TlsTerminator {
            config: Arc::new(config),
            resolver,
            files,
            provider,
            handshake_timeout: limits.timeout,
            handshakes: Semaphore::new(limits.max_in_progress.max(1)),
            metrics,
            tls_metrics,
            state: Mutex::new(ReloadState {
                active: snapshot,
                pending: None,
                failed: None,
            }),
        }))
    }

    /// Runs the TLS handshake on an accepted connection, within `server.handshake_timeout`.
    ///
    /// Called from the connection's own task, never the accept loop, so a slow or silent client
    /// holds up nobody else. A failed handshake is counted and yields `None`. The connection
    /// comes back on [`TlsConn`], which keeps no buffers while idle (see [`crate::tls_stream`]).
    pub(crate) async fn accept(&self, stream: TcpStream) -> Option<TlsConn> {
        // Refused before any crypto: cheap, so a flood of handshakes costs what the permits allow.
        let Ok(_permit) = self.handshakes.try_acquire() else {
            tracing::debug!("TLS handshake refused: tls.max_handshakes in progress");
            self.metrics
                .handshake_failures
                .with_label_values(&["tls_busy"])
                .inc();
            return None;
        };
        let reason = match tokio::time::timeout(
            self.handshake_timeout,
            tls_stream::accept(stream, self.config.clone()),
        )
        .await
        {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                "tls_handshake"
            }
            Err(_) => {
                tracing::debug!("TLS handshake timed out");
                "tls_timeout"
            }
        };
        self.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
        None
    }

    /// Starts the task that polls the files (and listens for SIGHUP) for the life of the process.
    ///
    /// The SIGHUP handler is installed before this returns, so a SIGHUP sent once the node says
    /// it listens reloads instead of killing the process (the default action).
    pub fn spawn_reloader(self: &Arc<Self>) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS reload by polling only");
                None
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match hangup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    } } => true,
                };
                if forced {
                    tracing::info!("SIGHUP: reloading the TLS certificate");
                }
                this.check(forced);
            }
        });
    }

    /// One poll: reads the files and, if they changed and settled (or `forced`), loads them.
    ///
    /// Returns whether a new pair went into service.
    pub fn check(&self, forced: bool) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let seen = self.files.read().map_err(|e| e.to_string());
        if !forced {
            if seen.as_ref().is_ok_and(|s| *s == state.active) {
                // Back to (or still on) the pair in service: a later return of a rejected pair
                // is news again.
                state.pending = None;
                state.failed = None;
                return false;
            }
            if state.pending.as_ref() != Some(&seen) {
                // First sight of this content: wait a poll to see it settle.
                state.pending = Some(seen);
                return false;
            }
            if state.failed.as_ref() == Some(&seen) {
                return false;
            }
        }
        state.pending = None;
        let outcome = match &seen {
            Ok(snap) => self
                .files
                .parse(snap, &self.provider)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        match outcome {
            Ok(loaded) => {
                self.resolver.set(loaded.key.clone());
                self.tls_metrics.cert_expiry.set(loaded.not_after);
                self.tls_metrics.reloads.with_label_values(&["ok"]).inc();
                tracing::info!(
                    cert = %self.files.cert.display(),
                    subject = %loaded.subject,
                    serial = %loaded.serial,
                    not_after = loaded.not_after,
                    "TLS certificate reloaded; new handshakes use it"
                );
                warn_if_expired(&loaded);
                if let Ok(snap) = seen {
                    state.active = snap;
                }
                state.failed = None;
                true
            }
            Err(e) => {
                self.tls_metrics.reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    error = %e,
                    "TLS certificate reload failed; the previous certificate stays in service"
                );
                state.failed = Some(seen);
                false
            }
        }
    }
}

fn warn_if_expired(loaded: &Loaded) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    if loaded.not_after < now {
        tracing::warn!(
            subject = %loaded.subject,
            not_after = loaded.not_after,
            "the TLS certificate has expired; clients will refuse it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair in PEM: (cert, key).
    fn pair(name: &str) -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("rcgen");
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    struct Fixture {
        dir: PathBuf,
        tls: Arc<TlsTerminator>,
    }

    impl Fixture {
        fn new(first: &(String, String)) -> Fixture {
            let dir =
                std::env::temp_dir().join(format!("pubgate-tls-unit-{}", rand::random::<u64>()));
            std::fs::create_dir_all(&dir).expect("mkdir");
            std::fs::write(dir.join("c.pem"), &first.0).expect("write");
            std::fs::write(dir.join("k.pem"), &first.1).expect("write");
            let files = TlsFiles {
                cert: dir.join("c.pem"),
                key: dir.join("k.pem"),
            };
            let limits = HandshakeLimits {
                timeout: Duration::from_secs(1),
                max_in_progress: 16,
            };
            let tls = TlsTerminator::new(files, limits, Arc::new(Metrics::new()))
                .expect("first pair loads");
            Fixture { dir, tls }
        }

        fn write_cert(&self, pem: &str) {
            std::fs::write(self.dir.join("c.pem"), pem).expect("write");
        }

        fn write_key(&self, pem: &str) {
            std::fs::write(self.dir.join("k.pem"), pem).expect("write");
        }

        fn reloads(&self, result: &str) -> u64 {
            self.tls
                .tls_metrics
                .reloads
                .with_label_values(&[result])
                .get()
        }

        fn serving(&self) -> Vec<u8> {
            self.tls.resolver.get().cert[0].to_vec()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    #[test]
    fn a_pair_copied_file_by_file_is_waited_for_not_reported() {
        let (a, b) = (pair("a"), pair("b"));
        let f = Fixture::new(&a);
        assert!(!f.tls.check(false), "nothing changed");
        f.write_cert(&b.0);
        assert!(!f.tls.check(false), "first sight of a change waits a poll");
        f.write_key(&b.1);
        assert!(!f.tls.check(false), "still moving: waits again");
        assert!(f.tls.check(false), "settled: loaded");
        assert_eq!(f.serving(), der(&b.0));
        assert_eq!((f.reloads("ok"), f.reloads("error")), (1, 0));
        assert!(!f.tls.check(false), "loaded content is not reloaded");
    }

    #[test]
    fn a_broken_pair_is_rejected_once_and_the_old_one_stays() {
        let (a, b) = (pair("a"), pair("b"));
        let f = Fixture::new(&a);
        f.write_cert(&b.0); // b's certificate with a's key
        for _ in 0..5 {
            assert!(!f.tls.check(false));
        }
        assert_eq!((f.reloads("ok"), f.reloads("error")), (0, 1));
        assert_eq!(f.serving(), der(&a.0));

        // A missing file is an error too, reported once.
        std::fs::remove_file(f.dir.join("k.pem")).expect("rm");
        for _ in 0..3 {
            assert!(!f.tls.check(false));
        }
        assert_eq!(f.reloads("error"), 2);

        f.write_key(&b.1);
        f.tls.check(false);
        assert!(f.tls.check(false));
        assert_eq!(f.serving(), der(&b.0));
    }

    #[test]
    fn forced_reload_needs_no_settling() {
        let (a, b) = (pair("a"), pair("b"));
        let f = Fixture::new(&a);
        assert!(f.tls.check(true), "SIGHUP reloads even unchanged files");
        f.write_cert(&b.0);
        f.write_key(&b.1);
        assert!(f.tls.check(true));
        assert_eq!(f.serving(), der(&b.0));
        assert_eq!(f.reloads("ok"), 2);
    }

    #[test]
    fn load_errors_name_key_and_file() {
        let (a, b) = (pair("a"), pair("b"));
        let f = Fixture::new(&a);
        let files = f.tls.files.clone();
        let provider = rustls::crypto::aws_lc_rs::default_provider();
        let snap = |cert: &str, key: &str| Snapshot {
            cert: cert.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
        };
        let err = |s: Snapshot| match files.parse(&s, &provider) {
            Ok(_) => panic!("should fail"),
            Err(e) => e.to_string(),
        };
        let cert_path = files.cert.display().to_string();
        let key_path = files.key.display().to_string();
        let e = err(snap("", &a.1));
        assert!(e.starts_with("tls.cert: ") && e.contains(&cert_path), "{e}");
        let e = err(snap(&a.0, &a.0));
        assert!(e.starts_with("tls.key: ") && e.contains(&key_path), "{e}");
        let e = err(snap(&a.0, &b.1));
        assert!(
            e.contains("does not match") && e.contains(&cert_path) && e.contains(&key_path),
            "{e}"
        );
        let broken_key = a.1.replace("PRIVATE KEY-----\n", "PRIVATE KEY-----\nAAAA");
        let e = err(snap(&a.0, &broken_key));
        assert!(e.starts_with("tls.key: "), "{e}");
    }
}
