//! The gRPC edge services: the `Edge` stream (and its gRPC-web form for
//! browsers, `Subscribe` plus `Submit`) here, the unary calls in [`accounts`]
//! and [`conversations`]. They authenticate, call the internal
//! services through their generated clients, and convert; no domain logic
//! lives here.

mod accounts;
mod conversations;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ConnectInfo;
use confab_common::auth::TokenType;
use confab_proto::group::v1 as group;
use confab_proto::v1::edge_server::Edge;
use confab_proto::v1::{
    AuthResponse, ClientFrame, Hello, ServerFrame, SubmitRequest, User, client_frame,
};
use futures::future::Either;
use futures::stream::BoxStream;
use futures::{FutureExt as _, StreamExt as _};
use parking_lot::Mutex;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Gateway;
use crate::engine::{self, End, FrameSink, Inbound};
use crate::limits::{AddressSlot, Limits};

/// Implements the three edge services over one [`Gateway`].
#[derive(Debug, Clone)]
pub(crate) struct EdgeApi {
    gateway: Arc<Gateway>,
    /// Abuse limits, shared with the WebSocket transport.
    limits: Arc<Limits>,
    closing: CancellationToken,
    /// The live `Subscribe` streams, for `Submit`.
    subscriptions: Subscriptions,
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
            subscriptions: Subscriptions::default(),
        }
    }

    /// Returns the user the request's token speaks for.
    async fn caller<T>(&self, request: &Request<T>) -> Result<i64, Status> {
        Ok(self.authenticated(request).await?.user_id)
    }

    /// Returns what the request's token says: user, session, expiry.
    async fn authenticated<T>(&self, request: &Request<T>) -> Result<crate::auth::Caller, Status> {
        crate::auth::from_metadata(&self.gateway, request.metadata()).await
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

/// Frames `Submit` handed to one subscription that wait for their answer, by the
/// ref they were given inside it (the client's own ref goes back with the answer).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    last: u64,
    waiting: HashMap<u64, (u64, oneshot::Sender<ServerFrame>)>,
}

/// The way into one live `Subscribe` stream.
#[derive(Debug, Clone)]
pub(crate) struct Subscription {
    frames: mpsc::Sender<Inbound>,
    /// Also tells this subscription from a newer one of the same device.
    pending: Arc<Mutex<Pending>>,
}

/// The `Subscribe` streams this gateway holds, by user and device.
pub(crate) type Subscriptions = Arc<Mutex<HashMap<(i64, String), Subscription>>>;

/// Frames one subscription holds before `Submit` is refused: the engine answers
/// one frame at a time, a browser has no reason to queue more.
const SUBMIT_QUEUE: usize = 16;

/// The gRPC side of a live connection: frames go into the response stream,
/// except the answers to `Submit` calls, which go to their callers.
struct GrpcSink {
    out: mpsc::Sender<Queued>,
    /// Set for `Subscribe` streams.
    pending: Option<Arc<Mutex<Pending>>>,
}

impl FrameSink for GrpcSink {
    /// Routes the frame before the future is made, which then holds only the
    /// queue's send: every await of the engine on a send sizes the task.
    fn send(&mut self, mut frame: ServerFrame) -> impl Future<Output = Result<(), ()>> + Send {
        if let Some(pending) = self.pending.as_ref().filter(|_| frame.r#ref != 0) {
            let waiting = pending.lock().waiting.remove(&frame.r#ref);
            if let Some((reference, caller)) = waiting {
                frame.r#ref = reference;
                // A caller that gave up no longer wants it.
                let _ = caller.send(frame);
                return Either::Left(std::future::ready(Ok(())));
            }
        }
        let queued = self.out.send(Ok(Box::new(frame)));
        Either::Right(queued.map(|sent| sent.map_err(|_| ())))
    }

    /// The queue is the response stream's: HTTP/2 writes what it holds.
    fn queued(&self) -> bool {
        false
    }

    fn flush(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        std::future::ready(Ok(()))
    }

    /// HTTP/2 keeps its own pings; the inbound stream never reports quiet.
    fn probe(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        std::future::ready(Ok(()))
    }
}

/// Returns the remote address of a request served through the router.
fn peer<T>(request: &Request<T>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(address)| address.ip())
}

impl EdgeApi {
    /// Checks that the caller may open one more live connection from its
    /// address, and returns the address's slot, held for the connection's life.
    fn admit<T>(&self, request: &Request<T>, user_id: i64) -> Result<Option<AddressSlot>, Status> {
        // Refused before the stream opens; the device id comes later, with the
        // hello, so every connection of the user counts here.
        let slot = match peer(request) {
            Some(address) => Some(self.limits.connection_slot(address).ok_or_else(|| {
                Status::resource_exhausted("too many connections from this address")
            })?),
            None => None,
        };
        engine::user_has_room(&self.gateway, &self.limits, user_id, "")?;
        Ok(slot)
    }

    /// Runs the engine for one live connection and returns its response stream;
    /// `ended` runs once the connection is over.
    fn open(
        &self,
        caller: crate::auth::Caller,
        slot: Option<AddressSlot>,
        inbound: BoxStream<'static, Inbound>,
        pending: Option<Arc<Mutex<Pending>>>,
        ended: impl FnOnce() + Send + 'static,
    ) -> FrameStream {
        let (out, receiver) = mpsc::channel(self.gateway.config.outbound_queue);
        // A client that went away drops the response stream: the connection
        // ends then, not at the next frame it would have been sent (a
        // subscription's inbound side never ends on its own).
        let gone = out.clone();
        let inbound = inbound
            .take_until(async move { gone.closed().await })
            .boxed();
        let gateway = self.gateway.clone();
        let limits = self.limits.clone();
        let closing = self.closing.clone();
        let sink = GrpcSink { out, pending };
        // Spawned as the engine's own future, not inside an async block that
        // would keep a second copy of its arguments (see `engine::run`).
        let connection = engine::run(gateway, limits, closing, Some(caller), inbound, sink).then(
            move |(end, sink)| async move {
                ended();
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
                    let _ = sink.out.send(Err(status)).await;
                }
            },
        );
        tokio::spawn(connection);
        let unbox: fn(Queued) -> Result<ServerFrame, Status> = |queued| queued.map(|frame| *frame);
        ReceiverStream::new(receiver).map(unbox)
    }
}

#[tonic::async_trait]
impl Edge for EdgeApi {
    type StreamStream = FrameStream;
    type SubscribeStream = FrameStream;

    async fn stream(
        &self,
        request: Request<Streaming<ClientFrame>>,
    ) -> Result<Response<FrameStream>, Status> {
        let caller = self.authenticated(&request).await?;
        let slot = self.admit(&request, caller.user_id)?;
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
        Ok(Response::new(self.open(caller, slot, inbound, None, || {})))
    }

    async fn subscribe(&self, request: Request<Hello>) -> Result<Response<FrameStream>, Status> {
        let caller = self.authenticated(&request).await?;
        let slot = self.admit(&request, caller.user_id)?;
        let hello = request.into_inner();
        let key = (caller.user_id, hello.device_id.clone());
        let (frames, submitted) = mpsc::channel(SUBMIT_QUEUE);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let subscription = Subscription {
            frames,
            pending: pending.clone(),
        };
        // A newer subscription of the device takes over (the engine closes the
        // older one as replaced).
        self.subscriptions.lock().insert(key.clone(), subscription);
        let hello = ClientFrame {
            r#ref: 0,
            kind: Some(client_frame::Kind::Hello(hello)),
        };
        let inbound = futures::stream::once(std::future::ready(Inbound::Frame(hello)))
            .chain(ReceiverStream::new(submitted))
            .boxed();
        let subscriptions = self.subscriptions.clone();
        let ours = pending.clone();
        let ended = move || {
            let mut subscriptions = subscriptions.lock();
            if subscriptions
                .get(&key)
                .is_some_and(|s| Arc::ptr_eq(&s.pending, &ours))
            {
                subscriptions.remove(&key);
            }
        };
        let frames = self.open(caller, slot, inbound, Some(pending), ended);
        Ok(Response::new(frames))
    }

    async fn submit(
        &self,
        request: Request<SubmitRequest>,
    ) -> Result<Response<ServerFrame>, Status> {
        let user_id = self.caller(&request).await?;
        let SubmitRequest { device_id, frame } = request.into_inner();
        let mut frame = frame.ok_or_else(|| Status::invalid_argument("frame is required"))?;
        if matches!(frame.kind, Some(client_frame::Kind::Hello(_))) {
            return Err(Status::invalid_argument(
                "a hello opens a subscription: call Subscribe",
            ));
        }
        let subscription = self
            .subscriptions
            .lock()
            .get(&(user_id, device_id))
            .cloned()
            .ok_or_else(|| {
                Status::failed_precondition(
                    "no live subscription of this device on this gateway: call Subscribe first",
                )
            })?;
        let (caller, answer) = oneshot::channel();
        // Registered before the engine can see the frame, so that its answer
        // finds its way back.
        let inside = {
            let mut pending = subscription.pending.lock();
            pending.last += 1;
            let inside = pending.last;
            pending.waiting.insert(inside, (frame.r#ref, caller));
            inside
        };
        frame.r#ref = inside;
        if let Err(error) = subscription.frames.try_send(Inbound::Frame(frame)) {
            subscription.pending.lock().waiting.remove(&inside);
            return Err(match error {
                TrySendError::Full(_) => Status::resource_exhausted(
                    "too many frames in flight on this subscription; wait for their answers",
                ),
                TrySendError::Closed(_) => Status::failed_precondition(GONE),
            });
        }
        let answer = answer
            .await
            .map_err(|_| Status::failed_precondition(GONE))?;
        Ok(Response::new(answer))
    }
}

/// Why a `Submit` found its subscription gone.
const GONE: &str = "the subscription closed: call Subscribe again with your cursor";

/// Returns whether a stream error means the client is gone (rather than one bad
/// frame the engine should answer).
fn is_end(status: &Status) -> bool {
    !matches!(
        status.code(),
        Code::ResourceExhausted | Code::OutOfRange | Code::Internal
    )
}
