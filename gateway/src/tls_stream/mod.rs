//! Server-side TLS connections that hold no buffers while idle, and that the fan-out can write to
//! directly, like plain TCP ones.
//!
//! tokio-rustls over rustls' buffered `ServerConnection` kept about 10 KB per idle `wss://`
//! connection: rustls' receive buffer is resized to 4 KiB before every socket read and stays so
//! between reads, beside the connection state and tokio's split halves. Here rustls' unbuffered
//! API runs the handshake, after which pubgate's own record layer ([`records`]) takes the keys and
//! rustls' connection object is freed; this module owns every buffer ([`engine`]): ciphertext is
//! read into a stack buffer, decrypted, and only a partial record or unread plaintext is kept on
//! the heap; ciphertext goes out as soon as it is made and its buffer is given back. An idle
//! connection holds the session's raw keys and nothing else.
//!
//! Both halves and the direct-write handle share one lock around the TLS state, held for
//! non-blocking work only (one encryption and one `writev`, or one decryption): a TLS session has
//! one state for both directions. Waiting for the socket happens outside it.

mod engine;
#[cfg(test)]
mod openssl_tests;
#[cfg(test)]
mod record_tests;
mod records;
#[cfg(test)]
mod tests;

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::send_queue::DirectWrite;
use engine::{Engine, READ_CHUNK, io_error};

/// The socket and the TLS state behind it, shared by a connection's halves.
struct Shared {
    tcp: TcpStream,
    engine: Mutex<Engine>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Engine> {
        // Nothing panics while holding the lock in a way that leaves the state half-written.
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads what the socket has (without waiting) and processes it. `Ok(false)` when the socket
    /// had nothing.
    fn read_socket(&self) -> io::Result<bool> {
        let mut chunk = [0u8; READ_CHUNK];
        match self.tcp.try_read(&mut chunk) {
            Ok(0) => {
                self.lock().receive_eof();
                Ok(true)
            }
            Ok(n) => {
                let mut engine = self.lock();
                let received = engine.receive(&chunk[..n]);
                // Best effort: what rustls answered (an alert, a handshake message) goes out now;
                // anything the socket does not take goes out before the next write.
                let flushed = engine.flush_to(&self.tcp);
                received.map_err(io_error)?;
                flushed.map(|_| true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            {
                let mut engine = self.lock();
                if engine.has_plaintext() {
                    let n = engine.read_plaintext(buf.initialize_unfilled());
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A failure (a forged or truncated record) is reported before the end of the
                // stream, so it never passes for a clean close.
                if let Some(e) = engine.failure() {
                    return Poll::Ready(Err(e));
                }
                if engine.is_read_closed() {
                    return Poll::Ready(Ok(()));
                }
            }
            ready!(self.tcp.poll_read_ready(cx))?;
            // `try_read` clears the readiness when the socket is empty, so the next
            // `poll_read_ready` waits for the next event.
            self.read_socket()?;
        }
    }

    fn poll_write(&self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        loop {
            match self.lock().write_some(&self.tcp, bufs, false) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.lock().flush_to(&self.tcp)? {
                return Poll::Ready(Ok(()));
            }
            ready!(self.tcp.poll_write_ready(cx))?;
        }
    }

    fn poll_shutdown(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.lock().close_notify().map_err(io_error)?;
        ready!(self.poll_flush(cx))?;
        let r = socket2::SockRef::from(&self.tcp).shutdown(std::net::Shutdown::Write);
        // Already reset or closed by the peer: the write side is shut either way.
        Poll::Ready(match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}

/// Runs the server side of a TLS handshake on `tcp`; the connection is ready for HTTP when it
/// returns. Plaintext the client sent right behind its last handshake message is kept for the
/// first read. No timeout here: the caller bounds it.
pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsConn> {
    let conn = UnbufferedServerConnection::new(config).map_err(io_error)?;
    let shared = Shared {
        tcp,
        engine: Mutex::new(Engine::new(conn)),
    };
    loop {
        let processed = shared.lock().process();
        // Send the flight rustls produced, or the alert that tells the client why it failed.
        while !shared.lock().flush_to(&shared.tcp)? {
            shared.tcp.writable().await?;
        }
        processed.map_err(io_error)?;
        {
            let engine = shared.lock();
            if engine.is_traffic() {
                break;
            }
            if engine.is_read_closed() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        shared.tcp.readable().await?;
        shared.read_socket()?;
    }
    // rustls' connection object goes; the record layer keeps the keys.
    let switched = shared.lock().switch_to_records();
    // An alert for records that arrived behind the Finished and failed (best effort).
    shared.lock().flush_to(&shared.tcp)?;
    switched.map_err(io_error)?;
    Ok(TlsConn(Arc::new(shared)))
}

/// A server-side TLS connection after its handshake: read and write it whole (hyper does, for the
/// HTTP request), then [`split`](TlsConn::split) it for a WebSocket session.
pub struct TlsConn(Arc<Shared>);

/// The reading half of a split [`TlsConn`].
pub struct TlsRead(Arc<Shared>);

/// The writing half of a split [`TlsConn`]. Shutting it down sends close_notify and half-closes
/// the socket.
pub struct TlsWrite(Arc<Shared>);

impl TlsConn {
    /// Splits the connection into its read half, its write half and the handle the fan-out writes
    /// through while the connection's writer is idle. The socket closes when all three are gone.
    pub fn split(self) -> (TlsRead, TlsWrite, Arc<dyn DirectWrite>) {
        let direct: Arc<dyn DirectWrite> = self.0.clone();
        (TlsRead(self.0.clone()), TlsWrite(self.0), direct)
    }

    /// Bytes the TLS state holds in buffers (tests).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.0.lock().buffered_capacity()
    }
}

impl DirectWrite for Shared {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.lock().write_some(&self.tcp, bufs, true)
    }

    fn limit_unsent(&self, bytes: u32) {
        crate::send_queue::set_notsent_lowat(&self.tcp, bytes);
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

impl AsyncRead for TlsRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, buf)
    }
}

/// The write side, shared by the whole connection and its write half.
macro_rules! impl_async_write {
    ($t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                self.0.poll_write(cx, &[IoSlice::new(buf)])
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                self.0.poll_write(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                true
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.0.poll_flush(cx)
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                self.0.poll_shutdown(cx)
            }
        }
    };
}

impl_async_write!(TlsConn);
impl_async_write!(TlsWrite);
