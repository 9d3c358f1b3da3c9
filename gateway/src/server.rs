//! Listeners, HTTP serving and routing, WebSocket upgrades, and the drain on shutdown.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::config::Settings;
use crate::deflate;
use crate::http_api::{self, Body};
use crate::node::Node;
use crate::per_ip;
use crate::protocol::ErrorCode;
use crate::proxy_protocol;
use crate::send_queue::DirectWrite;
use crate::session::{self, Route};
use crate::tcp;
use crate::tls::{self, TlsTerminator};
use crate::tls_stream::{self, TlsConn};

/// A byte stream a connection can be served on, and how to split it for the session's reader and
/// writer tasks.
pub trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// Write half.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Splits the stream; the third part, when there is one, writes to the connection without
    /// waiting, beside the write half (see [`crate::send_queue::DirectWrite`]).
    fn split(self) -> (Self::Read, Self::Write, Option<Arc<dyn DirectWrite>>);
}

/// TLS connections split like plain ones, direct-write handle included: see [`crate::tls_stream`].
impl Transport for TlsConn {
    type Read = tls_stream::TlsRead;
    type Write = tls_stream::TlsWrite;
    fn split(self) -> (Self::Read, Self::Write, Option<Arc<dyn DirectWrite>>) {
        let (r, w, direct) = TlsConn::split(self);
        (r, w, Some(direct))
    }
}

impl Transport for TcpStream {
    type Read = tcp::TcpRead;
    type Write = tcp::TcpWrite;
    fn split(self) -> (Self::Read, Self::Write, Option<Arc<dyn DirectWrite>>) {
        let (r, w, direct) = tcp::split(self);
        (r, w, Some(direct))
    }
}

/// Which listener a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Listener {
    /// WebSocket + HTTP API.
    Main,
    /// The optional private listener for metrics and probes.
    Metrics,
}

/// Runs a node until SIGTERM/SIGINT, then drains it.
pub async fn run(mut settings: Settings) -> anyhow::Result<()> {
    settings.server.max_connections = fit_to_fd_limit(settings.server.max_connections);
    let main_addr = settings.server.listen;
    let metrics_addr = settings.server.metrics_listen;
    let drain = settings.drain.clone();
    tls::install_default_provider();
    let node = Node::new(settings)?;
    if node.access.is_open() {
        tracing::warn!(
            "NO AUTHENTICATION CONFIGURED: anyone who reaches this node may subscribe and publish to every topic; set auth.jwt_secret, auth.jwt_public_key, auth.jwks_file or auth.api_keys before exposing it (docs/security.md)"
        );
    }
    // Installed before anything is announced: a SIGTERM right after "listening" must drain, not
    // kill the process with the default action.
    let shutdown = shutdown_signal()?;
    // Loaded before binding, so a bad certificate fails start-up before anything listens.
    let tls = TlsTerminator::from_settings(&node.settings, node.metrics.clone())?;
    if let Some(tls) = &tls {
        tls.spawn_reloader();
    }

    let main = bind_listener(main_addr)
        .with_context(|| format!("server.listen: cannot listen on {main_addr}"))?;
    let main_local = main.local_addr()?;
    let metrics_listener = match metrics_addr {
        Some(addr) => Some(
            bind_listener(addr)
                .with_context(|| format!("server.metrics_listen: cannot listen on {addr}"))?,
        ),
        None => None,
    };
    // A plain line on stdout that scripts and tests can wait for, whatever the log format.
    println!("pubgate listening on {main_local}");
    if let Some(l) = &metrics_listener {
        println!("pubgate metrics listening on {}", l.local_addr()?);
    }
    tracing::info!(
        addr = %main_local,
        broker = ?node.settings.broker.kind,
        tls = tls.is_some(),
        "listening"
    );

    tokio::spawn(accept_loop(node.clone(), main, Listener::Main, tls));
    if let Some(l) = metrics_listener {
        // The metrics listener stays plain: it is meant for a private network (Prometheus, probes).
        tokio::spawn(accept_loop(node.clone(), l, Listener::Metrics, None));
    }

    shutdown.await;
    let deadline = tokio::time::Instant::now() + drain.grace;
    tracing::info!(grace = ?drain.grace, delay = ?drain.delay, connections = node.connection_count(), "draining: not ready");
    node.drain.begin();
    node.metrics.ready.set(0);
    tokio::time::sleep(drain.delay).await;
    // Close clients over most of what is left, keeping a margin for their close handshakes.
    let window = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .mul_f64(0.8);
    tracing::info!(connections = node.connection_count(), window = ?window, "draining: closing clients");
    node.drain.close_clients(node.connection_count(), window);
    while node.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(left = node.connection_count(), "drained, exiting");
    Ok(())
}

/// Files kept free for listeners, broker connections, HTTP API clients and the process itself: a
/// sixteenth of the limit, between 16 and 256.
fn fd_reserve(limit: u64) -> u64 {
    (limit / 16).clamp(16, 256)
}

/// Raises the open-files soft limit to the hard limit, and fits `max_connections` to what the limit
/// can hold (0: all of it), so a full node answers upgrades with 503 instead of failing accept(2)
/// with EMFILE and leaving clients to time out. Logs the figure it settled on.
fn fit_to_fd_limit(max_connections: usize) -> usize {
    let (effective, limit) = fitted(max_connections);
    if max_connections != 0 && effective < max_connections {
        tracing::warn!(
            configured = max_connections,
            open_files_limit = limit,
            effective,
            "server.max_connections lowered to fit the open-files limit"
        );
    }
    tracing::info!(
        max_connections = effective,
        open_files_limit = limit,
        "holding up to {effective} WebSocket connections"
    );
    effective
}

/// The connection limit that fits the open-files limit (raised to its hard limit first), and that
/// limit (0 when it cannot be read).
fn fitted(max_connections: usize) -> (usize, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (max_connections.max(1), 0);
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    let room = lim.rlim_cur.saturating_sub(fd_reserve(lim.rlim_cur)).max(1);
    let room = usize::try_from(room).unwrap_or(usize::MAX);
    if max_connections == 0 || max_connections > room {
        return (room, lim.rlim_cur);
    }
    (max_connections, lim.rlim_cur)
}

/// Registers for SIGTERM and SIGINT now; the future completes when either arrives.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Connections the kernel may hold ready for accept(2) (it caps this at `net.core.somaxconn`).
/// `TcpListener::bind` listens with 128, the std default: a burst of connections (the clients of a
/// drained node reconnecting at once) fills that in microseconds, and the kernel then drops each
/// further SYN, so those clients wait 1 s, 3 s, 7 s… for retransmissions before pubgate even sees
/// them (measured by tests/hostile_handshakes.rs with 2000 connections).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listener like `TcpListener::bind` (SO_REUSEADDR on), with [`LISTEN_BACKLOG`].
fn bind_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts until the node drains (the metrics listener keeps going so probes see the drain).
/// With `tls`, each connection's TLS handshake runs in that connection's task.
async fn accept_loop(
    node: Arc<Node>,
    listener: TcpListener,
    which: Listener,
    tls: Option<Arc<TlsTerminator>>,
) {
    // Accept failures come in runs (out of file descriptors until clients leave): log at most one line
    // a second, with how many there were; the metric counts every one.
    let mut failures_unlogged = 0u64;
    let mut last_logged: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = node.drain.closing(), if which == Listener::Main => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let peer = peer.ip();
                if which == Listener::Main && node.settings.server.proxy_protocol {
                    tokio::spawn(proxied(node.clone(), stream, peer, tls.clone()));
                    continue;
                }
                // Each kind of connection spawns only the future it needs: a task holds its whole
                // future, and a plain connection must not carry the room of a TLS one.
                match &tls {
                    None => {
                        tokio::spawn(serve(node.clone(), stream, which, peer));
                    }
                    Some(tls) => {
                        tokio::spawn(serve_tls(node.clone(), tls.clone(), stream, which, peer));
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors (or similar): back off instead of spinning on accept.
                node.metrics
                    .handshake_failures
                    .with_label_values(&[accept_error_reason(&e)])
                    .inc();
                failures_unlogged += 1;
                if last_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(1)) {
                    tracing::warn!(
                        error = %e,
                        failures = failures_unlogged,
                        "accept failed; pausing accepts for 100ms each time"
                    );
                    failures_unlogged = 0;
                    last_logged = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The TLS handshake, then HTTP.
async fn serve_tls(
    node: Arc<Node>,
    tls: Arc<TlsTerminator>,
    stream: TcpStream,
    which: Listener,
    client: IpAddr,
) {
    if let Some(stream) = tls.accept(stream).await {
        serve(node, stream, which, client).await;
    }
}

/// A connection behind a TCP load balancer (`server.proxy_protocol`): from a trusted proxy, with a
/// PROXY protocol header naming the client; then TLS (when on) and HTTP.
async fn proxied(
    node: Arc<Node>,
    mut stream: TcpStream,
    peer: IpAddr,
    tls: Option<Arc<TlsTerminator>>,
) {
    let fail = |reason| {
        node.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
    };
    if !node.trusted_proxies.iter().any(|c| c.contains(peer)) {
        tracing::debug!(%peer, "connection refused: not from server.trusted_proxies");
        return fail("proxy_untrusted");
    }
    let timeout = node.settings.server.handshake_timeout;
    let client = match tokio::time::timeout(timeout, proxy_protocol::read_header(&mut stream)).await
    {
        Ok(Ok(from)) => from.unwrap_or(peer),
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "connection refused");
            return fail("proxy_header");
        }
        Err(_) => return fail("proxy_header"),
    };
    match tls {
        None => Box::pin(serve(node, stream, Listener::Main, client)).await,
        Some(tls) => Box::pin(serve_tls(node, tls, stream, Listener::Main, client)).await,
    }
}

fn accept_error_reason(e: &io::Error) -> &'static str {
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    match e.raw_os_error() {
        Some(ENFILE | EMFILE) => "accept_fd_limit",
        _ => "accept_error",
    }
}

/// Serves HTTP/1.1 on one connection, handing upgraded WebSockets to sessions.
async fn serve<T: Transport>(node: Arc<Node>, io: T, which: Listener, peer: IpAddr) {
    let svc_node = node.clone();
    let service = service_fn(move |req| {
        let node = svc_node.clone();
        async move { Ok::<_, Infallible>(route::<T>(node, req, which, peer).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(node.settings.server.handshake_timeout)
        .max_buf_size(node.settings.server.max_header_bytes)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // Only the main listener winds down. The metrics listener keeps serving until exit, so that
        // probes and scrapes see the drain: a graceful shutdown would close a probe's connection
        // before its request was read, failing /healthz (and /readyz, /metrics) for the whole drain.
        _ = node.drain.closing(), if which == Listener::Main => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        let reason = if e.is_timeout() {
            "handshake_timeout"
        } else {
            "http_error"
        };
        node.metrics
            .handshake_failures
            .with_label_values(&[reason])
            .inc();
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

async fn route<T: Transport>(
    node: Arc<Node>,
    req: Request<Incoming>,
    which: Listener,
    peer: IpAddr,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let exposes_metrics =
        which == Listener::Metrics || node.settings.server.metrics_listen.is_none();
    match path.as_str() {
        "/healthz" => http_api::healthz(),
        "/readyz" => http_api::readyz(&node),
        "/metrics" if exposes_metrics => http_api::metrics(&node),
        _ if which == Listener::Metrics => http_api::not_found(),
        "/ws" => upgrade::<T>(node, req, WsRoute::PubSub, peer).await,
        p if node.settings.server.page && (p == "/" || p.starts_with("/_pubgate/")) => {
            http_api::page_asset(p, req.method())
        }
        p if node.settings.server.echo_path.as_deref() == Some(p) => {
            upgrade::<T>(node, req, WsRoute::Echo, peer).await
        }
        "/v1/publish" => http_api::publish_batch(&node, req).await,
        p if p.starts_with("/v1/publish/") => {
            let topic = &p["/v1/publish/".len()..];
            http_api::publish_one(&node, topic, req).await
        }
        p if p.starts_with("/v1/history/") => {
            let topic = &p["/v1/history/".len()..];
            http_api::history(&node, topic, req).await
        }
        _ => http_api::not_found(),
    }
}

enum WsRoute {
    PubSub,
    Echo,
}

fn refuse(node: &Node, status: StatusCode, reason: &'static str, message: &str) -> Response<Body> {
    node.metrics
        .handshake_failures
        .with_label_values(&[reason])
        .inc();
    let code = match status {
        StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => ErrorCode::Forbidden,
        StatusCode::SERVICE_UNAVAILABLE => ErrorCode::Unavailable,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
        _ => ErrorCode::BadRequest,
    };
    http_api::error(status, code, message)
}

/// What the client's permessage-deflate offers come to: `None` when compression is off, or no offer
/// is acceptable (the connection then goes on uncompressed, as RFC 7692 §7.1 says).
fn negotiate_deflate(node: &Node, req: &Request<Incoming>) -> Option<deflate::Agreement> {
    if !node.settings.compression.enabled {
        return None;
    }
    let offers = req.headers().get_all(header::SEC_WEBSOCKET_EXTENSIONS);
    match deflate::negotiate(offers.iter().map(|v| v.as_bytes())) {
        Ok(agreed) => Some(agreed),
        Err(why) => {
            if !matches!(why, deflate::Decline::NotOffered) {
                tracing::debug!(reason = %why, "permessage-deflate declined");
            }
            None
        }
    }
}

/// Checks an upgrade request and, if it passes, answers 101 and starts the session.
async fn upgrade<T: Transport>(
    node: Arc<Node>,
    mut req: Request<Incoming>,
    route: WsRoute,
    peer: IpAddr,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut r = refuse(
            &node,
            StatusCode::UPGRADE_REQUIRED,
            "not_websocket",
            "this route takes WebSocket upgrades only",
        );
        r.headers_mut()
            .insert(header::UPGRADE, http::HeaderValue::from_static("websocket"));
        return r;
    }
    if node.drain.is_closing() {
        return refuse(
            &node,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "node is shutting down",
        );
    }
    let allowed = &node.settings.server.allowed_origins;
    if !allowed.is_empty() {
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|v| v.to_str().ok());
        if !origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
            return refuse(&node, StatusCode::FORBIDDEN, "origin", "origin not allowed");
        }
    }
    let route = match route {
        WsRoute::Echo => Route::Echo,
        WsRoute::PubSub => {
            let (parts, body) = req.into_parts();
            let who = node
                .access
                .with_fresh_keys(|| node.access.identify(&parts))
                .await;
            req = Request::from_parts(parts, body);
            match who {
                Ok(who) => Route::PubSub(who),
                Err(denied) => {
                    node.metrics
                        .handshake_failures
                        .with_label_values(&["unauthorized"])
                        .inc();
                    return http_api::unauthorized(&node, &denied);
                }
            }
        }
    };
    // Validate the handshake before claiming a slot: an invalid request gets its 400 even when the
    // node is full, and never counts as an accepted connection. Refusing after this point just drops
    // the upgrade future; without a 101 the connection is never upgraded.
    let (mut response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(e) => {
            return refuse(
                &node,
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                &format!("invalid WebSocket handshake: {e}"),
            );
        }
    };
    let deflate = negotiate_deflate(&node, &req);
    if let Some(agreed) = &deflate
        && let Ok(value) = http::HeaderValue::from_str(&agreed.response())
    {
        response
            .headers_mut()
            .insert(header::SEC_WEBSOCKET_EXTENSIONS, value);
    }
    let client = per_ip::client_ip(peer, req.headers(), &node.trusted_proxies);
    let ip_slot = match node.per_ip.claim(client) {
        Ok(slot) => slot,
        Err(_) => {
            return refuse(
                &node,
                StatusCode::TOO_MANY_REQUESTS,
                "max_connections_per_ip",
                "too many connections from this address",
            );
        }
    };
    let Some(admission) = node.try_admit() else {
        return refuse(
            &node,
            StatusCode::SERVICE_UNAVAILABLE,
            "max_connections",
            "connection limit reached",
        );
    };
    tokio::spawn(async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                node.metrics
                    .handshake_failures
                    .with_label_values(&["upgrade_failed"])
                    .inc();
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Unwrap hyper's boxed IO back to the transport we served, so reads and writes go straight
        // to the socket. Bytes the client sent right behind its request are read first.
        match ws.into_inner().into_inner().downcast::<TokioIo<T>>() {
            Ok(parts) => {
                let (r, w, direct) = parts.io.into_inner().split();
                // read_buf (even empty) points into hyper's 8 KiB read buffer: copy what the client
                // sent early and let the buffer go before the session starts.
                let early = Bytes::copy_from_slice(&parts.read_buf);
                drop(parts.read_buf);
                let r = std::io::Cursor::new(early).chain(r);
                session::run(node, admission, r, w, direct, route, deflate).await;
                drop(ip_slot);
            }
            Err(_) => tracing::error!("upgraded connection has an unexpected transport type"),
        }
    });
    response.map(|_| Full::new(Bytes::new()))
}
