//! A plain TCP connection split three ways: a read half for the session's reader, a write half for
//! its writer task, and a shared handle the fan-out path writes through directly while the writer
//! is idle (see [`crate::send_queue::DirectWrite`]).
//!
//! tokio's own `into_split` halves cannot be shared that way: the write half is owned by one task.
//! These halves are the same readiness-driven calls on one `Arc<TcpStream>`, so all three stay
//! valid, and the socket stays open, until the last of them is dropped.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::send_queue::DirectWrite;

/// Splits a stream into its read half, its write half and the direct-write handle.
pub fn split(stream: TcpStream) -> (TcpRead, TcpWrite, Arc<TcpStream>) {
    let stream = Arc::new(stream);
    (TcpRead(stream.clone()), TcpWrite(stream.clone()), stream)
}

/// The reading side of a split [`TcpStream`].
pub struct TcpRead(Arc<TcpStream>);

/// The writing side of a split [`TcpStream`]. Shutting it down half-closes the socket.
pub struct TcpWrite(Arc<TcpStream>);

impl AsyncRead for TcpRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // `try_read_buf` clears the readiness when the socket has nothing, so the next
            // `poll_read_ready` waits for the next epoll event.
            match self.0.try_read_buf(buf) {
                Ok(_) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl TcpWrite {
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }
}

impl AsyncWrite for TcpWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |s| s.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing is buffered above the socket.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        // Already reset or closed by the peer: the write side is shut either way.
        Poll::Ready(match r {
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
            r => r,
        })
    }
}

impl DirectWrite for TcpStream {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    fn limit_unsent(&self, bytes: u32) {
        crate::send_queue::set_notsent_lowat(self, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn halves_and_the_direct_handle_share_one_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut r, mut w, direct) = split(server);

        w.write_all(b"from the writer, ").await.unwrap();
        // The direct handle may find the socket not yet known writable; wait for it like the
        // writer would, then write without waiting.
        direct.writable().await.unwrap();
        let n = DirectWrite::try_write_vectored(&*direct, &[IoSlice::new(b"then direct")]).unwrap();
        assert_eq!(n, 11);
        w.shutdown().await.unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "from the writer, then direct");

        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        r.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(client);
        assert_eq!(
            r.read(&mut buf).await.unwrap(),
            0,
            "EOF after the peer closed"
        );
    }
}
