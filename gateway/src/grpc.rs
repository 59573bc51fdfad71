//! The gRPC edge services: the `Edge` stream here, the unary calls in
//! [`accounts`] and [`conversations`]. They authenticate, call the internal
//! services through their generated clients, and convert; no domain logic
//! lives here.

mod accounts;
mod conversations;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use confab_common::auth::TokenType;
use confab_proto::group::v1 as group;
use confab_proto::v1::edge_server::Edge;
use confab_proto::v1::{AuthResponse, ClientFrame, ServerFrame, User};
use futures::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Gateway;
use crate::engine::{self, End, FrameSink, Inbound};
use crate::limits::Limits;

/// Implements the three edge services over one [`Gateway`].
#[derive(Debug, Clone)]
pub(crate) struct EdgeApi {
    gateway: Arc<Gateway>,
    /// Abuse limits, shared with the WebSocket transport.
    limits: Arc<Limits>,
    closing: CancellationToken,
}

impl EdgeApi {
    pub(crate) fn new(
        gateway: Arc<Gateway>,
        limits: Arc<Limits>,
        closing: CancellationToken,
    ) -> Self {
        Self {
            gateway,
            limits,
            closing,
        }
    }

    /// Returns the user the request's token speaks for.
    async fn caller<T>(&self, request: &Request<T>) -> Result<i64, Status> {
        Ok(self.authenticated(request).await?.user_id)
    }

    /// Returns what the request's token says: user, session, expiry.
    async fn authenticated<T>(&self, request: &Request<T>) -> Result<crate::auth::Caller, Status> {
        crate::auth::from_metadata(
            &self.gateway.tokens,
            &self.gateway.groups,
            request.metadata(),
        )
        .await
    }

    async fn user(&self, id: i64) -> Result<User, Status> {
        let request = group::GetUserRequest {
            id,
            username: String::new(),
        };
        Ok(self
            .gateway
            .groups
            .clone()
            .get_user(request)
            .await?
            .into_inner())
    }

    /// Returns a new token pair for `user` in `session`.
    fn auth_response(&self, user: User, session: &str) -> AuthResponse {
        let tokens = &self.gateway.tokens;
        let access = tokens.mint_in_session(user.id, TokenType::Access, session);
        let refresh = tokens.mint_in_session(user.id, TokenType::Refresh, session);
        AuthResponse {
            user: Some(user),
            access_token: access.token,
            access_expires_at_ms: access.expires_at_ms,
            refresh_token: refresh.token,
        }
    }
}

/// What the engine queues towards a gRPC stream. Frames are boxed: the queue's
/// first block of slots is allocated with it, and 32 slots of 8 bytes cost far less
/// per idle connection than 32 slots of a whole frame (about 6.5 KiB).
type Queued = Result<Box<ServerFrame>, Status>;

/// The response stream of a live connection.
type FrameStream =
    futures::stream::Map<ReceiverStream<Queued>, fn(Queued) -> Result<ServerFrame, Status>>;

/// The gRPC side of a live connection: frames go into the response stream.
struct GrpcSink(mpsc::Sender<Queued>);

impl FrameSink for GrpcSink {
    async fn send(&mut self, frame: ServerFrame) -> Result<(), ()> {
        self.0.send(Ok(Box::new(frame))).await.map_err(|_| ())
    }

    /// HTTP/2 keeps its own pings; the inbound stream never reports quiet.
    async fn probe(&mut self) -> Result<(), ()> {
        Ok(())
    }
}

/// Returns the remote address of a request served through the router.
fn peer<T>(request: &Request<T>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

#[tonic::async_trait]
impl Edge for EdgeApi {
    type StreamStream = FrameStream;

    async fn stream(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let caller = self.authenticated(&request).await?;
        let user_id = caller.user_id;
        // Refused before the stream opens; the device id comes later, with the
        // hello, so every connection of the user counts here.
        let slot = match peer(&request) {
            Some(address) => Some(self.limits.connection_slot(address).ok_or_else(|| {
                Status::resource_exhausted("too many connections from this address")
            })?),
            None => None,
        };
        engine::user_has_room(&self.gateway, &self.limits, user_id, "")?;
        let inbound = request
            .into_inner()
            .take_while(|item| std::future::ready(!matches!(item, Err(s) if is_end(s))))
            .map(|item| match item {
                Ok(frame) => Inbound::Frame(frame),
                Err(status)
                    if matches!(status.code(), Code::ResourceExhausted | Code::OutOfRange) =>
                {
                    Inbound::TooLarge
                }
                // A decode error of a well-framed message: the bytes were not a ClientFrame.
                Err(status) => Inbound::Malformed(status.message().to_owned()),
            })
            .boxed();
        let (sender, receiver) = mpsc::channel(self.gateway.config.outbound_queue);
        let gateway = self.gateway.clone();
        let limits = self.limits.clone();
        let closing = self.closing.clone();
        tokio::spawn(async move {
            let mut sink = GrpcSink(sender);
            let end = engine::run(gateway, limits, closing, Some(caller), inbound, &mut sink).await;
            // The address's slot is held for the stream's whole life.
            drop(slot);
            let status = match end {
                End::TooLarge => {
                    crate::limits::Refusal::FrameSize.count();
                    Some(Status::resource_exhausted("frame too large"))
                }
                End::Shutdown => Some(Status::unavailable("server shutting down")),
                _ => None,
            };
            if let Some(status) = status {
                let _ = sink.0.send(Err(status)).await;
            }
        });
        let unbox: fn(Queued) -> Result<ServerFrame, Status> = |queued| queued.map(|frame| *frame);
        Ok(Response::new(ReceiverStream::new(receiver).map(unbox)))
    }
}

/// Returns whether a stream error means the client is gone (rather than one bad
/// frame the engine should answer).
fn is_end(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::ResourceExhausted | Code::OutOfRange | Code::Internal
    )
}
