//! The one router behind the listener: native gRPC (h2c), gRPC-web (HTTP/1.1
//! or h2c, binary or base64 text, with CORS for the allowed origins),
//! WebSocket, `/metrics` and `/healthz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use confab_proto::v1::accounts_server::AccountsServer;
use confab_proto::v1::conversations_server::ConversationsServer;
use confab_proto::v1::edge_server::EdgeServer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic_health::server::HealthReporter;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::grpc::EdgeApi;
use crate::limits::Limits;
use crate::{Gateway, GatewayError};

/// What the HTTP handlers share.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) gateway: Arc<Gateway>,
    /// Cancelled when the server shuts down; live connections end on it.
    pub(crate) closing: CancellationToken,
    /// Abuse limits shared by every transport.
    pub(crate) limits: Arc<Limits>,
    /// Holds every upgraded WebSocket, so that shutdown waits for their close
    /// frames.
    pub(crate) websockets: TaskTracker,
}

/// Flips every edge service to NOT_SERVING on shutdown, so that load balancers
/// stop sending new connections before the old ones are closed.
#[derive(Debug)]
pub(crate) struct Health(HealthReporter);

impl Health {
    pub(crate) async fn set_not_serving(&self) {
        self.0.set_not_serving::<EdgeServer<EdgeApi>>().await;
        self.0.set_not_serving::<AccountsServer<EdgeApi>>().await;
        self.0
            .set_not_serving::<ConversationsServer<EdgeApi>>()
            .await;
        self.0
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// Most messages in one response page (message-svc's history limit).
const MAX_PAGE_MESSAGES: usize = 200;

/// Builds the router and the health reporter.
pub(crate) fn router(
    gateway: Arc<Gateway>,
    limits: Arc<Limits>,
    closing: CancellationToken,
    websockets: TaskTracker,
) -> Result<(Router, Health), GatewayError> {
    let api = EdgeApi::new(gateway.clone(), limits.clone(), closing.clone());
    let max = gateway.config.max_frame_bytes;
    let (reporter, health_service) = tonic_health::server::health_reporter();
    // Every service starts SERVING: the stores are open before the listener is.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(confab_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    // Responses are bounded by their page sizes (at most 200 messages, each
    // smaller than a frame); the encode limit makes that a checked promise.
    let out = max.saturating_mul(MAX_PAGE_MESSAGES).max(4 * 1024 * 1024);
    let grpc = tonic::service::Routes::new(
        EdgeServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(out),
    )
    .add_service(
        AccountsServer::new(api.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(out),
    )
    .add_service(
        ConversationsServer::new(api)
            .max_decoding_message_size(max)
            .max_encoding_message_size(out),
    )
    .add_service(health_service)
    .add_service(reflection)
    .into_axum_router()
    // Browsers: gRPC-web (binary and text) over HTTP/1.1 or HTTP/2, to the same
    // services with the same limits; native gRPC passes through untouched.
    .layer(tonic_web::GrpcWebLayer::new())
    .layer(cors())
    .layer(axum::middleware::from_fn_with_state(
        limits.clone(),
        allowed_origin,
    ));
    let state = AppState {
        gateway,
        closing,
        limits,
        websockets,
    };
    let http = Router::new()
        .route("/v1/ws", get(crate::ws::upgrade))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    Ok((grpc.merge(http), Health(reporter)))
}

/// The CORS answer of the gRPC services, for browsers calling from the app's
/// own origin: every origin that reaches it passed [`allowed_origin`].
fn cors() -> CorsLayer {
    use axum::http::{HeaderName, Method, header};
    CorsLayer::new()
        .allow_origin(AllowOrigin::mirror_request())
        .allow_methods([Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-grpc-web"),
            HeaderName::from_static("x-user-agent"),
            HeaderName::from_static("grpc-timeout"),
        ])
        .expose_headers([
            HeaderName::from_static("grpc-status"),
            HeaderName::from_static("grpc-message"),
            HeaderName::from_static("grpc-status-details-bin"),
        ])
        .max_age(std::time::Duration::from_secs(24 * 3600))
}

/// Refuses a browser request (preflight or call) from an origin not on the
/// allow-list with 403 before any work; native clients send no `Origin`.
async fn allowed_origin(
    State(limits): State<Arc<Limits>>,
    request: Request,
    next: Next,
) -> Response {
    if limits.origin_header_allowed(request.headers().get(axum::http::header::ORIGIN)) {
        next.run(request).await
    } else {
        (StatusCode::FORBIDDEN, "origin not allowed").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> String {
    state
        .gateway
        .metrics
        .as_ref()
        .map(|handle| handle.render())
        .unwrap_or_default()
}
