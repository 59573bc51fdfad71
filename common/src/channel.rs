//! One channel type for the generated gRPC clients, whether the service runs in
//! this process or behind a socket.
//!
//! In the embedded mode a client wraps the server's tower service directly: the
//! call is encoded and decoded like any gRPC call, but no socket is involved
//! (DESIGN.md section 1). In the distributed mode the same client type wraps a
//! `tonic::transport::Channel`.

use std::convert::Infallible;

use tonic::body::Body;
use tonic::transport::channel::Change;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceExt as _};

/// A type-erased gRPC channel; `XClient<GrpcChannel>` is every internal client.
pub type GrpcChannel = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, ChannelError>;

/// A transport failure of a [`GrpcChannel`].
///
/// A named type rather than a bare `BoxError`: the generated clients' futures then
/// stay `Send` inside `async_trait` methods (rustc cannot prove the higher-ranked
/// `From` bound for a boxed trait object there).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ChannelError(#[from] BoxError);

/// Returns a channel that calls `server` (a generated `XServer<T>`) in process.
pub fn in_process<S>(server: S) -> GrpcChannel
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(server.map_err(|never| match never {}))
}

/// Returns a channel over a real connection.
pub fn remote(channel: tonic::transport::Channel) -> GrpcChannel {
    BoxCloneSyncService::new(channel.map_err(|e| ChannelError(BoxError::from(e))))
}

/// Returns a channel spreading calls over several processes of one role, with
/// one HTTP/2 connection to each, reused by every call.
///
/// An address that refuses TCP connections (its process died) leaves the set
/// until it accepts again, probed every [`PROBE_INTERVAL`], so calls go to the
/// live processes only; calls that were already on their way to a dying process
/// fail with UNAVAILABLE, and [`retry_idempotent`] retries those that may be
/// repeated. Must be called within a Tokio runtime; the probes stop when the
/// channel is dropped. A call fails after `timeout` also while no process is
/// reachable at all (it would otherwise wait for one to come back).
pub fn balanced(
    endpoints: Vec<tonic::transport::Endpoint>,
    timeout: std::time::Duration,
) -> GrpcChannel {
    let (channel, changes) = tonic::transport::Channel::balance_channel::<usize>(64);
    for (key, endpoint) in endpoints.into_iter().enumerate() {
        tokio::spawn(probe(key, endpoint, changes.clone()));
    }
    let bounded = tower::timeout::Timeout::new(channel, timeout);
    BoxCloneSyncService::new(bounded.map_err(ChannelError))
}

/// How often [`balanced`] checks that each address accepts connections.
pub const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps `endpoint` in the balanced set while its address accepts TCP
/// connections.
async fn probe(
    key: usize,
    endpoint: tonic::transport::Endpoint,
    changes: tokio::sync::mpsc::Sender<Change<usize, tonic::transport::Endpoint>>,
) {
    let uri = endpoint.uri();
    let Some(host) = uri.host() else {
        tracing::warn!(%uri, "role address without a host");
        return;
    };
    let port = uri.port_u16().unwrap_or(80);
    let address = format!("{host}:{port}");
    let mut present = false;
    loop {
        let up = matches!(
            tokio::time::timeout(
                std::time::Duration::from_secs(1),
                tokio::net::TcpStream::connect(&address),
            )
            .await,
            Ok(Ok(_))
        );
        if up != present {
            let change = if up {
                Change::Insert(key, endpoint.clone())
            } else {
                tracing::warn!(%address, "role process unreachable; calls go to the others");
                Change::Remove(key)
            };
            if changes.send(change).await.is_err() {
                return;
            }
            present = up;
        }
        if changes.is_closed() {
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// Runs `call` again while it fails with UNAVAILABLE, up to three attempts in
/// all, 100 and 200 ms apart: for idempotent calls only (a send carries its
/// client_msg_id, watermarks only move forward, reads change nothing), so that
/// a role process dying between two calls is not seen by clients.
///
/// # Errors
///
/// The last attempt's status.
pub async fn retry_idempotent<T, F, Fut>(mut call: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let mut delay = std::time::Duration::from_millis(100);
    for _ in 1..3 {
        match call().await {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                metrics::counter!("confab_rpc_retries_total").increment(1);
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}
