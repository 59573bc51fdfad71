//! The serving loop: accepts TCP connections and serves each with hyper
//! (HTTP/1.1 with upgrades, or h2c), under deadlines against clients that hold a
//! connection open without ever sending a request.
//!
//! A connection has [`Front::header_read_timeout`] from its accept to say what
//! it is: an HTTP/1.1 client to send its request headers (hyper's own header
//! timer, which also bounds the wait for each later request of a kept-alive
//! connection), an h2c client to send its preface and first SETTINGS frame
//! (read here, since hyper's HTTP/2 server has no such deadline). A client that
//! sends nothing is cut by the same deadline. After that an h2c connection
//! lives as long as it answers pings; a WebSocket, as long as the idle timeout
//! of `ws` allows.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use bytes::{Buf as _, Bytes};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use crate::limits::Refusal;

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header.
const H2_FRAME_HEADER: usize = 9;
/// The largest first frame read here: HTTP/2's initial maximum frame size. A
/// peer announcing more is handed to hyper at once, which refuses it.
const H2_MAX_FIRST_FRAME: usize = 16 * 1024;

/// The deadlines of the serving loop.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Front {
    /// How long a connection may take to send its request headers (HTTP/1.1)
    /// or its preface and settings (h2c).
    pub(crate) header_read_timeout: Duration,
    /// An h2c connection silent this long is pinged, and closed when the ping is
    /// not answered within as long again: dead peers do not hold memory.
    pub(crate) h2_keep_alive: Duration,
}

/// Accepts connections on `listener` and serves `router` on each until `stop`
/// resolves; returns the handle that drains the connections still open.
///
/// Connections still reading their first bytes when `closing` is cancelled
/// are dropped; they have asked for nothing yet.
pub(crate) async fn accept_until(
    listener: TcpListener,
    router: Router,
    front: Front,
    closing: CancellationToken,
    stop: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    accept_failed(error).await;
                    continue;
                }
            },
        };
        // Small frames (acks, events) must leave at once: without TCP_NODELAY,
        // Nagle's algorithm meets the peer's delayed ACK and holds them for tens
        // of ms.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
        let connection = Connection {
            router: router.clone(),
            front,
            closing: closing.clone(),
            watcher: graceful.watcher(),
        };
        tokio::spawn(connection.serve(tcp, peer));
    }
    graceful
}

/// Waits out an accept error: at once for the errors of one connection (it was
/// reset before we took it), a second for the others (out of file descriptors:
/// retrying at once would spin).
async fn accept_failed(error: io::Error) {
    let of_one_connection = matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    );
    if !of_one_connection {
        tracing::warn!(%error, "accept failed");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// What one connection's task needs.
struct Connection {
    /// Every route: gRPC, WebSocket, `/metrics`, `/healthz`.
    router: Router,
    front: Front,
    /// Cancelled at shutdown.
    closing: CancellationToken,
    /// Starts hyper's graceful shutdown of this connection when the server drains.
    watcher: Watcher,
}

impl Connection {
    async fn serve(self, mut tcp: TcpStream, peer: SocketAddr) {
        let deadline = Instant::now() + self.front.header_read_timeout;
        let first = tokio::select! {
            first = tokio::time::timeout_at(deadline, first_bytes(&mut tcp)) => first,
            () = self.closing.cancelled() => return,
        };
        let first = match first {
            Ok(Ok(first)) if first.is_empty() => return,
            Ok(Ok(first)) => first,
            Ok(Err(error)) => {
                tracing::trace!(%error, %peer, "connection failed before its first request");
                return;
            }
            Err(_elapsed) => {
                Refusal::HeaderTimeout.count();
                tracing::debug!(%peer, "connection closed: no request before the header deadline");
                return;
            }
        };
        let io = TokioIo::new(Prefixed {
            prefix: first,
            inner: tcp,
        });
        let router = self.router;
        // The peer address feeds the limits per address (WebSocket and gRPC alike),
        // read through axum's `ConnectInfo`.
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move { router.oneshot(request).await }
        });
        let mut builder = Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.front.header_read_timeout);
        builder
            .http2()
            .timer(TokioTimer::new())
            // WebSocket over HTTP/2 (RFC 8441), as axum's own server allows.
            .enable_connect_protocol()
            .keep_alive_interval(self.front.h2_keep_alive)
            .keep_alive_timeout(self.front.h2_keep_alive);
        let connection = builder.serve_connection_with_upgrades(io, service);
        match self.watcher.watch(connection).await {
            Ok(()) => {}
            Err(error) if is_header_timeout(&*error) => {
                Refusal::HeaderTimeout.count();
                tracing::debug!(%peer, "connection closed: request headers not read before the deadline");
            }
            Err(error) => tracing::trace!(%error, %peer, "connection ended with an error"),
        }
    }
}

/// Reads until the first bytes tell what the client speaks (see [`told`]);
/// returns them (empty when the client closed without sending anything).
async fn first_bytes(tcp: &mut TcpStream) -> io::Result<Bytes> {
    let mut read = Vec::with_capacity(256);
    while !told(&read) {
        if tcp.read_buf(&mut read).await? == 0 {
            break;
        }
    }
    Ok(read.into())
}

/// Returns whether `read` is enough to hand the connection to hyper: a byte
/// that strays from the HTTP/2 preface (HTTP/1.1, whose header timer then runs
/// in hyper), or the whole preface and the client's first frame (its SETTINGS).
fn told(read: &[u8]) -> bool {
    let common = read.len().min(H2_PREFACE.len());
    if read[..common] != H2_PREFACE[..common] {
        return true;
    }
    let Some(header) = read.get(H2_PREFACE.len()..H2_PREFACE.len() + H2_FRAME_HEADER) else {
        return false;
    };
    let length =
        usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    length > H2_MAX_FIRST_FRAME || read.len() >= H2_PREFACE.len() + H2_FRAME_HEADER + length
}

/// Returns whether hyper closed the connection for its header-read timeout.
fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    error
        .downcast_ref::<hyper::Error>()
        .is_some_and(hyper::Error::is_timeout)
}

/// A TCP stream whose first bytes were read already: they are read again first.
struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.prefix.len().min(buf.remaining());
        buf.put_slice(&this.prefix[..n]);
        this.prefix.advance(n);
        if this.prefix.is_empty() {
            // Frees the read's buffer: an upgraded WebSocket keeps this
            // wrapper for its whole life.
            this.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// HTTP/1.1 is told by its first byte; h2c needs the preface and the whole
    /// first frame; an oversized first frame goes to hyper at once.
    #[test]
    fn first_bytes_tell_the_protocol() {
        assert!(!told(b""));
        assert!(told(b"G"));
        assert!(!told(b"P"));
        assert!(told(b"PO"));
        assert!(!told(H2_PREFACE));
        let mut settings = H2_PREFACE.to_vec();
        settings.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        assert!(!told(&settings));
        settings.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        assert!(told(&settings));
        let mut huge = H2_PREFACE.to_vec();
        huge.extend_from_slice(&[0xff, 0xff, 0xff, 4, 0, 0, 0, 0, 0]);
        assert!(told(&huge));
    }
}
