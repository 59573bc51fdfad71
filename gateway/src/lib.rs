//! The edge of Confab: one listener for native gRPC (h2c), WebSocket, `/metrics`
//! and health, with one connection engine behind both live transports.
//!
//! - [`hub`]: the live devices held by this node; implements the live bus.
//! - `auth`: bearer tokens to user ids.
//! - `error`: why the gateway stopped.
//! - `engine`: the connection engine both transports share (hello, catch-up
//!   from the cursor, live events, sends).
//! - `ws`: the WebSocket transport (binary protobuf or proto3 JSON text frames).
//! - `json`: the proto3 JSON mapping of frames.
//! - `grpc`: the gRPC edge services (`Edge`, `Accounts`, `Conversations`).
//! - `http`: the router that puts everything on one port, `/metrics`, `/healthz`.
//! - `limits`: abuse limits (rates per user, failed logins, connections per
//!   address, WebSocket origins) and the count of refusals.
//! - `accept`: the serving loop: TCP accept, hyper connections (HTTP/1.1 with
//!   upgrades, h2c), the header-read deadline, the drain at shutdown.
//! - `fuzzing`: the decoders of network input, reachable for the fuzz targets in
//!   `fuzz/` only (hidden, not an API).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use confab_common::auth::TokenService;
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use confab_proto::message::v1::messages_client::MessagesClient;
use confab_proto::presence::v1::presences_client::PresencesClient;
use confab_proto::session::v1::sessions_client::SessionsClient;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod accept;
mod auth;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod http;
pub mod hub;
mod json;
mod limits;
mod ws;

pub use auth::ExternalUsers;
pub use error::GatewayError;
pub use hub::Hub;

/// Limits and names of one gateway node.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// This node's name, under which session-svc records the devices it holds.
    pub node: String,
    /// Largest client frame accepted, in bytes (WebSocket message, gRPC message).
    pub max_frame_bytes: usize,
    /// Live events queued for one device before it counts as too slow and is
    /// disconnected (it resumes from its cursor).
    pub live_queue: usize,
    /// Frames queued towards one gRPC stream before the engine waits.
    pub outbound_queue: usize,
    /// How long a new connection may take to send its `Hello`.
    pub hello_timeout: Duration,
    /// How long shutdown waits for connections to close.
    pub grace: Duration,
    /// Messages one user may send at once, over all their devices.
    pub send_burst: u32,
    /// Messages one user may send per second, sustained.
    pub send_per_second: u32,
    /// Live connections one user may hold on this node.
    pub max_connections_per_user: usize,
    /// Live connections one remote address may hold.
    pub max_connections_per_ip: usize,
    /// Failed logins per username, and per address, within a minute before
    /// further attempts are refused until the minute has passed.
    pub login_failures_per_minute: u32,
    /// Groups and channels one user may create per minute.
    pub creations_per_minute: u32,
    /// Users one user may add to conversations per minute.
    pub invitations_per_minute: u32,
    /// Browser origins allowed to open a WebSocket or call through gRPC-web;
    /// `*` allows any. Requests without an `Origin` (native clients) always
    /// pass.
    pub allowed_origins: Vec<String>,
    /// A WebSocket from which nothing (no frame, no pong) arrived for this long
    /// is closed; the server pings after half of it. An h2c connection is
    /// pinged after half of it too, and closed when the ping goes unanswered
    /// for the other half.
    pub ws_idle_timeout: Duration,
    /// How long a new TCP connection may take to send its request headers
    /// (HTTP/1.1; also each later request of a kept-alive connection) or its
    /// preface and settings (h2c) before it is closed.
    pub header_read_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            node: "local".to_owned(),
            max_frame_bytes: 64 * 1024,
            live_queue: 1024,
            outbound_queue: 64,
            hello_timeout: Duration::from_secs(10),
            grace: Duration::from_secs(10),
            send_burst: 30,
            send_per_second: 10,
            max_connections_per_user: 32,
            max_connections_per_ip: 1000,
            login_failures_per_minute: 10,
            creations_per_minute: 30,
            invitations_per_minute: 300,
            allowed_origins: vec!["*".to_owned()],
            ws_idle_timeout: Duration::from_secs(60),
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything a gateway node needs: its limits and the clients of the services
/// behind it.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// Limits and names.
    pub config: GatewayConfig,
    /// Mints and verifies bearer tokens.
    pub tokens: TokenService,
    /// Users, conversations, membership.
    pub groups: GroupsClient<GrpcChannel>,
    /// The users of external token subjects seen here.
    pub external_users: Arc<ExternalUsers>,
    /// Sends, history, sync.
    pub messages: MessagesClient<GrpcChannel>,
    /// The device registry.
    pub sessions: SessionsClient<GrpcChannel>,
    /// Heartbeats, presence, typing, privacy.
    pub presence: PresencesClient<GrpcChannel>,
    /// The live devices of this node; message-svc publishes into it.
    pub hub: Arc<Hub>,
    /// Renders `/metrics`; `None` serves an empty page.
    pub metrics: Option<PrometheusHandle>,
}

/// Serves the edge on `listener` until `shutdown` resolves, then closes every live
/// connection (with a close frame or a final status) and drains in-flight calls
/// under the configured grace period.
///
/// # Errors
///
/// Fails when the reflection service cannot be built. Accept errors (such as
/// running out of file descriptors) are logged and retried, never fatal.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    let grace = gateway.config.grace;
    let front = accept::Front {
        header_read_timeout: gateway.config.header_read_timeout,
        h2_keep_alive: gateway.config.ws_idle_timeout / 2,
    };
    let closing = CancellationToken::new();
    // Upgraded WebSockets leave hyper's connections: they are tracked here so
    // that the drain waits for their close frames too.
    let websockets = TaskTracker::new();
    let limits = Arc::new(limits::Limits::new(&gateway.config));
    tokio::spawn(prune(limits.clone(), closing.clone()));
    let (router, health) = http::router(
        Arc::new(gateway),
        limits,
        closing.clone(),
        websockets.clone(),
    )?;
    let stop = {
        let closing = closing.clone();
        async move {
            shutdown.await;
            health.set_not_serving().await;
            // Live connections end on this token: WebSockets with a close frame,
            // gRPC streams with a final status.
            closing.cancel();
        }
    };
    let connections = accept::accept_until(listener, router, front, closing, stop).await;
    // No new connection from here on; hyper closes idle connections, sends
    // GOAWAY on h2c, and waits for what is in flight.
    websockets.close();
    let drained = async {
        connections.shutdown().await;
        websockets.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the grace period"
        );
    }
    Ok(())
}

/// Forgets idle rate state every minute until the server closes.
async fn prune(limits: Arc<limits::Limits>, closing: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            () = closing.cancelled() => return,
            _ = every.tick() => limits.prune(),
        }
    }
}
