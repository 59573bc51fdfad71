//! A TCP proxy that a test can cut: it makes a server (PostgreSQL) briefly
//! unreachable for the processes under test without touching the server, which
//! other tests share.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

/// Forwards every connection made to [`Proxy::addr`] to the upstream address.
///
/// While cut, it closes every forwarded connection and resets new ones at once;
/// restored, it forwards again. Everything stops when the value drops.
#[derive(Debug)]
pub struct Proxy {
    /// Where clients connect.
    addr: SocketAddr,
    /// Where connections are forwarded.
    upstream: SocketAddr,
    /// What the accept loop and the forwarding tasks share.
    shared: Arc<Shared>,
    /// The accept loop, aborted on drop.
    accept: AbortHandle,
}

#[derive(Debug, Default)]
struct Shared {
    /// The forwarding tasks: one per open connection.
    connections: Mutex<JoinSet<()>>,
    /// True while the proxy is cut. Read and changed under the `connections`
    /// lock so that no connection slips in while `cut` aborts the others.
    cut: Mutex<bool>,
}

impl Proxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    ///
    /// # Errors
    ///
    /// Fails when no port can be bound.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept_loop(listener, upstream, Arc::clone(&shared)));
        Ok(Self {
            addr,
            upstream,
            shared,
            accept: accept.abort_handle(),
        })
    }

    /// Where clients connect instead of the upstream.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where connections go.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Closes every forwarded connection and refuses new ones until
    /// [`Proxy::restore`].
    pub fn cut(&self) {
        let mut connections = lock(&self.shared.connections);
        *lock(&self.shared.cut) = true;
        // Aborting a forwarding task drops both of its sockets, which closes them.
        connections.abort_all();
        connections.detach_all();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        let _connections = lock(&self.shared.connections);
        *lock(&self.shared.cut) = false;
    }

    /// Returns how many connections are being forwarded now.
    pub fn open_connections(&self) -> usize {
        let mut connections = lock(&self.shared.connections);
        while connections.try_join_next().is_some() {}
        connections.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        lock(&self.shared.connections).abort_all();
    }
}

/// Accepts connections and hands each to a forwarding task, or resets it at
/// once while the proxy is cut.
async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _peer)) = listener.accept().await else {
            continue;
        };
        let mut connections = lock(&shared.connections);
        if *lock(&shared.cut) {
            // A reset rather than an orderly close: the client sees the server
            // as gone, not as a server that hung up after connecting.
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        // Reap the tasks of connections that ended by themselves.
        while connections.try_join_next().is_some() {}
        connections.spawn(forward(client, upstream));
    }
}

/// Copies bytes both ways until either side closes.
async fn forward(mut client: TcpStream, upstream: SocketAddr) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        let _ = client.set_zero_linger();
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// An upstream that echoes every byte back.
    async fn echo_server() -> Result<SocketAddr> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        Ok(addr)
    }

    /// Sends `text` and reads it back; fails when the connection breaks.
    async fn round_trip(socket: &mut TcpStream, text: &[u8]) -> Result<()> {
        socket.write_all(text).await?;
        let mut back = vec![0; text.len()];
        tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut back)).await??;
        anyhow::ensure!(back == text, "echoed {back:?}");
        Ok(())
    }

    /// Returns true when the connection is closed or reset (a read returns
    /// end of file or an error) rather than echoing.
    async fn is_dead(socket: &mut TcpStream) -> bool {
        let _ = socket.write_all(b"x").await;
        let mut byte = [0; 1];
        match tokio::time::timeout(Duration::from_secs(5), socket.read(&mut byte)).await {
            Ok(Ok(0) | Err(_)) => true,
            Ok(Ok(_)) | Err(_) => false,
        }
    }

    /// The proxy forwards both ways; `cut` kills open connections and refuses
    /// new ones; `restore` forwards again.
    #[tokio::test]
    async fn forwards_cuts_and_restores() -> Result<()> {
        let proxy = Proxy::start(echo_server().await?).await?;
        let mut before = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut before, b"hello").await?;
        assert_eq!(proxy.open_connections(), 1);

        proxy.cut();
        assert!(
            is_dead(&mut before).await,
            "an open connection survived the cut"
        );
        let mut during = TcpStream::connect(proxy.addr()).await?;
        assert!(
            is_dead(&mut during).await,
            "a new connection was forwarded while cut"
        );
        assert_eq!(proxy.open_connections(), 0);

        proxy.restore();
        let mut after = TcpStream::connect(proxy.addr()).await?;
        round_trip(&mut after, b"again").await?;
        Ok(())
    }
}
