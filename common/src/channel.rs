//! One channel type for the generated gRPC clients, whether the service runs in
//! this process or behind a socket.
//!
//! In the embedded mode a client wraps the server's tower service directly: the
//! call is encoded and decoded like any gRPC call, but no socket is involved
//! (DESIGN.md section 1). In the distributed mode the same client type wraps a
//! `tonic::transport::Channel`.

use std::convert::Infallible;

use tonic::body::Body;
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
