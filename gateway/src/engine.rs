//! The connection engine both live transports share.
//!
//! A connection's life: the first frame must be a `Hello` (device id, cursor, and
//! the token when the transport could not carry one); the device registers with
//! the hub *before* catch-up starts, so every event committed from then on is
//! queued live; catch-up sends the stored events after the cursor; then the live
//! queue is drained, skipping what catch-up already sent. The two join without a
//! gap or a duplicate (DESIGN.md section 5, invariant 4).
//!
//! **Gap fill.** In the embedded mode a user's live events arrive in sequence
//! order, every one of them. Over NATS (the distributed mode) one can be lost
//! (core NATS delivers at most once) or overtaken by a later one published by
//! another process. So a live event whose `seq` is beyond `last sent + 1` first
//! makes the engine fetch the missing events from the store, by the same path as
//! catch-up; the live event is then sent next, or skipped when the fetch sent it
//! already. The hub's resync request (after the bus reconnected) runs the same
//! fetch with no live event to trigger it, for losses at the tail.
//!
//! **Token lifetime.** A connection lives no longer than the access token it
//! authenticated with (its `exp` plus the leeway): then it gets a fatal error
//! frame of reason `token_expired`. A client keeps it open by sending
//! `Reauthenticate` with a fresh access token of the same user before that; the
//! new token's expiry (and session) replace the old. A new `Hello` is not
//! accepted for this: a hello starts a connection (cursor, catch-up), a
//! reauthentication changes nothing but the credentials. A logout closes the
//! connection through the hub (`Kicked::LoggedOut`, reason `logged_out`).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use confab_common::bus::LiveEvent;
use confab_common::channel::retry_idempotent;
use confab_proto::group::v1::{GetConversationRequest, GetMemberRequest};
use confab_proto::message::v1::{SendRequest, SendResponse, SyncRequest, UpdateReceiptsRequest};
use confab_proto::presence::v1::{
    DisconnectRequest, HeartbeatRequest, QueryRequest, TypingRequest,
};
use confab_proto::session::v1::{RegisterDeviceRequest, UnregisterDeviceRequest};
use confab_proto::v1::{
    ClientFrame, CloseChannel, ConversationKind, Delivered, Done, Error as ErrorFrame, Event,
    Heartbeat, Hello, MarkRead, OpenChannel, Pong, Reauthenticate, SendAck, SendMessage,
    ServerFrame, SyncComplete, Typing, Welcome, client_frame, event, server_frame,
};
use futures::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use crate::Gateway;
use crate::auth::Caller;
use crate::hub::{Kicked, MAX_WATCHED_USERS};
use crate::limits::Limits;

/// Events read per catch-up page.
const SYNC_PAGE: u32 = 500;

/// Where a catch-up starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The cursor of the device's hello. One beyond the user's last sequence
    /// number was not issued by this server and is reset to it.
    Cursor(u64),
    /// The last event this connection sent: only later events are sent, whatever
    /// the store says its head is (a lagging read must not cause resends).
    LastSent(u64),
}

/// What a transport hands the engine.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A decoded frame.
    Frame(ClientFrame),
    /// A frame that could not be decoded; answered with an error, not fatal.
    Malformed(String),
    /// A frame over the size limit; the transport closes after it.
    TooLarge,
    /// Nothing arrived for half the idle timeout: the transport's sink probes
    /// the peer (a WebSocket ping).
    Quiet,
    /// Nothing arrived for the whole idle timeout; the connection ends.
    Idle,
}

/// Where the engine writes frames; each transport encodes its own way.
///
/// A sent frame may wait in the transport's buffer until [`FrameSink::flush`]:
/// the engine flushes when it has nothing else ready, so frames that are ready
/// together (a send's acknowledgement and its own event, a burst of live
/// events, a catch-up page) leave in one write to the socket. A transport may
/// write earlier (a full buffer), and it flushes its last word itself.
pub(crate) trait FrameSink: Send {
    /// Queues one frame; fails once the peer is gone.
    fn send(&mut self, frame: ServerFrame) -> impl Future<Output = Result<(), ()>> + Send;
    /// Returns whether frames were queued since the last completed flush.
    fn queued(&self) -> bool;
    /// Writes what [`FrameSink::send`] queued.
    fn flush(&mut self) -> impl Future<Output = Result<(), ()>> + Send;
    /// Asks the peer for a sign of life (after [`Inbound::Quiet`]).
    fn probe(&mut self) -> impl Future<Output = Result<(), ()>> + Send;
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client closed its side.
    ClientClosed,
    /// The peer stopped reading or the socket failed.
    SinkClosed,
    /// No valid `Hello` first, or no valid token; or the token expired, or was
    /// revoked by a logout, while the connection was open.
    Refused,
    /// A frame over the size limit.
    TooLarge,
    /// The device fell behind its live queue; it resumes from its cursor.
    SlowConsumer,
    /// A newer connection of the same device took over.
    Replaced,
    /// The server is shutting down.
    Shutdown,
    /// Nothing arrived from the peer for the idle timeout.
    Idle,
}

/// Runs one connection until it ends, and hands the sink back for the
/// transport's last word (a close frame, a status). `caller` is set when the
/// transport authenticated already (header or metadata); otherwise the `Hello`
/// carries the token.
///
/// The sink is owned rather than borrowed so that a transport can spawn this
/// future as its connection's task as it is (then `.then` its last word):
/// wrapped in an `async` block that owned the sink, its arguments would be held
/// twice for the connection's whole life (an async block's captures keep their
/// place in its layout after they move on).
pub(crate) async fn run<I, S>(
    gateway: Arc<Gateway>,
    limits: Arc<Limits>,
    closing: CancellationToken,
    caller: Option<Caller>,
    mut inbound: I,
    mut sink: S,
) -> (End, S)
where
    I: Stream<Item = Inbound> + Unpin + Send,
    S: FrameSink,
{
    let end = 'run: {
        let hello = tokio::select! {
            first = tokio::time::timeout(gateway.config.hello_timeout, first_frame(&mut inbound, &mut sink)) => first,
            () = closing.cancelled() => break 'run End::Shutdown,
        };
        let (reference, hello) = match hello {
            Ok(Some(Inbound::Frame(ClientFrame {
                r#ref,
                kind: Some(client_frame::Kind::Hello(hello)),
            }))) => (r#ref, hello),
            Ok(Some(Inbound::TooLarge)) => break 'run End::TooLarge,
            Ok(Some(Inbound::Idle)) => break 'run End::Idle,
            Ok(None) => break 'run End::ClientClosed,
            Ok(Some(_)) | Err(_) => {
                let status = Status::invalid_argument("the first frame must be a hello");
                let _ = sink.send(error_frame(0, &status, true)).await;
                break 'run End::Refused;
            }
        };
        let caller = match caller {
            Some(caller) => caller,
            None => match Box::pin(crate::auth::caller(&gateway, &hello.token)).await {
                Ok(caller) => caller,
                Err(status) => {
                    let _ = sink.send(error_frame(reference, &status, true)).await;
                    break 'run End::Refused;
                }
            },
        };
        let user_id = caller.user_id;
        if let Err(status) = check_device_id(&hello) {
            let _ = sink.send(error_frame(reference, &status, true)).await;
            break 'run End::Refused;
        }
        // Checked again here for a token that came in the hello, and for connections
        // that raced past the transport's check.
        if let Err(status) = user_has_room(&gateway, &limits, user_id, &hello.device_id) {
            let reply = error_frame_reason(reference, &status, "too_many_connections", true);
            let _ = sink.send(reply).await;
            break 'run End::Refused;
        }

        let registration = gateway.hub.register_in_session(
            user_id,
            &hello.device_id,
            gateway.config.live_queue,
            &caller.session,
            caller.issued_at_ms,
        );
        metrics::gauge!("confab_gateway_connections").increment(1.0);
        let session = Session {
            gateway: gateway.clone(),
            limits,
            user_id,
            device_id: hello.device_id.clone(),
            connection_id: registration.connection_id,
            expires_at_ms: AtomicI64::new(caller.expires_at_ms),
        };
        // The calls of a connection's start and end are boxed: their futures are
        // large and short-lived, and inline they would size every idle
        // connection's task.
        Box::pin(session.announce()).await;
        let end = session
            .serve(
                closing,
                reference,
                hello.cursor,
                registration,
                &mut inbound,
                &mut sink,
            )
            .await;
        Box::pin(session.retire()).await;
        metrics::gauge!("confab_gateway_connections").decrement(1.0);
        end
    };
    (end, sink)
}

/// Returns the first inbound item that is not [`Inbound::Quiet`], probing the
/// peer on each of those.
async fn first_frame<I, S>(inbound: &mut I, sink: &mut S) -> Option<Inbound>
where
    I: Stream<Item = Inbound> + Unpin + Send,
    S: FrameSink,
{
    loop {
        match inbound.next().await {
            Some(Inbound::Quiet) => {
                if sink.probe().await.is_err() {
                    return None;
                }
            }
            other => return other,
        }
    }
}

/// Checks that `user_id` may open one more connection (of `device_id`) here.
///
/// # Errors
///
/// RESOURCE_EXHAUSTED when the user holds `--max-connections-per-user` already.
pub(crate) fn user_has_room(
    gateway: &Gateway,
    limits: &Limits,
    user_id: i64,
    device_id: &str,
) -> Result<(), Status> {
    if gateway.hub.connections_of(user_id, device_id) >= limits.max_per_user {
        crate::limits::Refusal::ConnectionsPerUser.count();
        return Err(Status::resource_exhausted(format!(
            "at most {} live connections per user",
            limits.max_per_user
        )));
    }
    Ok(())
}

/// One authenticated device connection.
struct Session {
    gateway: Arc<Gateway>,
    /// Rates per user; sends take from them.
    limits: Arc<Limits>,
    user_id: i64,
    device_id: String,
    connection_id: u64,
    /// When the connection's access token expires (ms since the Unix epoch,
    /// leeway not added); `Reauthenticate` moves it.
    expires_at_ms: AtomicI64,
}

impl Session {
    async fn serve<I, S>(
        &self,
        closing: CancellationToken,
        reference: u64,
        cursor: u64,
        registration: crate::hub::Registration,
        inbound: &mut I,
        sink: &mut S,
    ) -> End
    where
        I: Stream<Item = Inbound> + Unpin + Send,
        S: FrameSink,
    {
        let welcome = server_frame::Kind::Welcome(Welcome {
            user_id: self.user_id,
            device_id: self.device_id.clone(),
        });
        if sink.send(frame(reference, welcome)).await.is_err() {
            return End::SinkClosed;
        }
        let mut last_sent = match Box::pin(self.catch_up(Start::Cursor(cursor), sink)).await {
            Ok(last) => last,
            Err(end) => return end,
        };
        let synced = server_frame::Kind::Synced(SyncComplete { seq: last_sent });
        if sink.send(frame(0, synced)).await.is_err() {
            return End::SinkClosed;
        }

        // The one client frame being answered. Frames are answered one at a time
        // in arrival order (a device's messages keep their order), while live
        // events keep flowing to the device during a send's commit.
        let mut answering: Option<Pin<Box<dyn Future<Output = Vec<ServerFrame>> + Send + '_>>> =
            None;
        // Fires at the token's expiry as it was when armed; the expiry is read
        // again then, as a reauthentication may have moved it.
        // One registration with the queue for the connection's life, not one per
        // turn of the loop.
        let mut live_events = registration.events.stream();
        let expiry = tokio::time::sleep_until(self.token_deadline());
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                biased;
                () = closing.cancelled() => {
                    let status = Status::unavailable("server shutting down; reconnect with your cursor");
                    let _ = sink.send(error_frame(0, &status, true)).await;
                    return End::Shutdown;
                }
                () = &mut expiry => {
                    let deadline = self.token_deadline();
                    if deadline > tokio::time::Instant::now() {
                        expiry.as_mut().reset(deadline);
                        continue;
                    }
                    let status = Status::unauthenticated(
                        "token expired; reauthenticate, or reconnect with a new token",
                    );
                    let reply = error_frame_reason(0, &status, "token_expired", true);
                    let _ = sink.send(reply).await;
                    return End::Refused;
                }
                () = registration.resync.notified() => {
                    metrics::counter!("confab_gateway_gap_fills_total", "cause" => "resync").increment(1);
                    last_sent = match Box::pin(self.catch_up(Start::LastSent(last_sent), sink)).await {
                        Ok(last) => last,
                        Err(end) => return end,
                    };
                }
                live = live_events.next() => {
                    let Some(live) = live else {
                        return Box::pin(self.kicked(&registration, sink)).await;
                    };
                    // Internal (the hub acts on it and never queues it): never
                    // a client's data.
                    if matches!(live.event.kind, Some(event::Kind::Revocation(_))) {
                        continue;
                    }
                    // Channel posts, presence and typing (seq 0) are in no sequence.
                    // For the rest, catch-up may have sent the event already: the
                    // join of the two is by seq.
                    if live.event.seq != 0 {
                        if live.event.seq > last_sent.saturating_add(1) {
                            // Events before this one were lost or are late: the
                            // store has every committed one.
                            metrics::counter!("confab_gateway_gap_fills_total", "cause" => "gap").increment(1);
                            last_sent = match Box::pin(self.catch_up(Start::LastSent(last_sent), sink)).await {
                                Ok(last) => last,
                                Err(end) => return end,
                            };
                        }
                        if live.event.seq <= last_sent {
                            continue;
                        }
                        last_sent = live.event.seq;
                    }
                    self.observe_latency(&live);
                    let event = server_frame::Kind::Event(live.event.clone());
                    if sink.send(frame(0, event)).await.is_err() {
                        return End::SinkClosed;
                    }
                }
                replies = async { answering.as_mut().expect("guarded by is_some").await },
                    if answering.is_some() =>
                {
                    answering = None;
                    for reply in replies {
                        if sink.send(reply).await.is_err() {
                            return End::SinkClosed;
                        }
                    }
                }
                incoming = inbound.next(), if answering.is_none() => {
                    match incoming {
                        None => return End::ClientClosed,
                        Some(Inbound::TooLarge) => return End::TooLarge,
                        Some(Inbound::Idle) => return End::Idle,
                        Some(Inbound::Quiet) => {
                            if sink.probe().await.is_err() {
                                return End::SinkClosed;
                            }
                        }
                        Some(Inbound::Malformed(why)) => {
                            let status = Status::invalid_argument(format!("malformed frame: {why}"));
                            let reply = error_frame_reason(0, &status, "malformed", false);
                            if sink.send(reply).await.is_err() {
                                return End::SinkClosed;
                            }
                        }
                        Some(Inbound::Frame(client)) => answering = Some(Box::pin(self.handle(client))),
                    }
                }
                // Last: reached only when nothing above is ready, so that what
                // is ready together leaves together.
                flushed = sink.flush(), if sink.queued() => {
                    if flushed.is_err() {
                        return End::SinkClosed;
                    }
                }
            }
        }
    }

    /// Returns when the connection's token stops being accepted: its expiry
    /// plus the leeway.
    fn token_deadline(&self) -> tokio::time::Instant {
        let leeway = self.gateway.tokens.leeway();
        let expires_at_ms = self.expires_at_ms.load(Ordering::Relaxed);
        let left_ms = expires_at_ms.saturating_sub(confab_common::now_ms());
        let left = Duration::from_millis(u64::try_from(left_ms).unwrap_or(0)) + leeway;
        // Far enough for any token, small enough not to overflow an Instant.
        tokio::time::Instant::now() + left.min(Duration::from_secs(100 * 365 * 24 * 3600))
    }

    /// Replaces the connection's token with `token`, a valid access token of
    /// the same user: its expiry and session from now on.
    async fn reauthenticate(&self, reference: u64, token: &str) -> ServerFrame {
        let gateway = &self.gateway;
        let caller = match crate::auth::caller(gateway, token).await {
            Ok(caller) if caller.user_id == self.user_id => caller,
            // Another user's token: as terse as any refused token.
            Ok(_) => {
                let status = Status::unauthenticated(crate::auth::REFUSED);
                return error_frame(reference, &status, false);
            }
            Err(status) => return error_frame(reference, &status, false),
        };
        gateway.hub.reauthenticated(
            self.user_id,
            self.connection_id,
            &caller.session,
            caller.issued_at_ms,
        );
        self.expires_at_ms
            .store(caller.expires_at_ms, Ordering::Relaxed);
        frame(reference, server_frame::Kind::Done(Done {}))
    }

    /// Sends every stored event after `start`; returns the last seq sent (the
    /// start when there was none).
    ///
    /// A cursor beyond the user's last sequence number was not issued by this
    /// server (a restored backup, a wiped store): it is reset to that number, or
    /// the device would skip the live events up to its cursor. A start at the
    /// last event sent is never reset: the device has that event.
    async fn catch_up<S: FrameSink>(&self, start: Start, sink: &mut S) -> Result<u64, End> {
        let (cursor, mut check_head) = match start {
            Start::Cursor(cursor) => (cursor, true),
            Start::LastSent(last_sent) => (last_sent, false),
        };
        let mut after = cursor;
        loop {
            let request = SyncRequest {
                user_id: self.user_id,
                after,
                limit: SYNC_PAGE,
            };
            let messages = &self.gateway.messages;
            let page = retry_idempotent(|| {
                let mut messages = messages.clone();
                async move { messages.sync(request).await }
            })
            .await;
            let page = match page {
                Ok(page) => page.into_inner(),
                Err(status) => {
                    tracing::warn!(user_id = self.user_id, %status, "catch-up failed");
                    let _ = sink.send(error_frame(0, &status, true)).await;
                    return Err(End::SinkClosed);
                }
            };
            if std::mem::take(&mut check_head) && after > page.head {
                tracing::info!(
                    user_id = self.user_id,
                    cursor,
                    head = page.head,
                    "cursor beyond head; reset"
                );
                after = page.head;
            }
            // Sync returns events after `after` only; the guard keeps "nothing
            // twice" true whatever the store answers.
            for event in page.events {
                if event.seq <= after {
                    continue;
                }
                after = event.seq;
                let event = server_frame::Kind::Event(event);
                if sink.send(frame(0, event)).await.is_err() {
                    return Err(End::SinkClosed);
                }
            }
            if !page.has_more {
                return Ok(after);
            }
        }
    }

    /// Answers one client frame after the hello (usually with one frame).
    async fn handle(&self, client: ClientFrame) -> Vec<ServerFrame> {
        let reference = client.r#ref;
        let done = || frame(reference, server_frame::Kind::Done(Done {}));
        let answer = match client.kind {
            Some(client_frame::Kind::Send(send)) => self.send(reference, send).await,
            Some(client_frame::Kind::Ping(ping)) => frame(
                reference,
                server_frame::Kind::Pong(Pong { nonce: ping.nonce }),
            ),
            Some(client_frame::Kind::Delivered(Delivered {
                conversation_id,
                up_to,
            })) => self.receipts(reference, conversation_id, up_to, 0).await,
            Some(client_frame::Kind::MarkRead(MarkRead {
                conversation_id,
                up_to,
            })) => self.receipts(reference, conversation_id, 0, up_to).await,
            Some(client_frame::Kind::OpenChannel(OpenChannel { conversation_id })) => {
                self.open_channel(reference, conversation_id).await
            }
            Some(client_frame::Kind::CloseChannel(CloseChannel { conversation_id })) => {
                let hub = &self.gateway.hub;
                hub.close_channel(self.user_id, self.connection_id, conversation_id);
                done()
            }
            Some(client_frame::Kind::Heartbeat(Heartbeat {})) => match self.heartbeat().await {
                Ok(()) => done(),
                Err(status) => error_frame(reference, &status, false),
            },
            Some(client_frame::Kind::WatchPresence(watch)) => {
                return self.watch_presence(reference, watch.user_ids).await;
            }
            Some(client_frame::Kind::Typing(Typing {
                conversation_id,
                typing,
            })) => {
                let request = TypingRequest {
                    user_id: self.user_id,
                    conversation_id,
                    typing,
                };
                match self.gateway.presence.clone().typing(request).await {
                    Ok(_) => done(),
                    Err(status) => error_frame(reference, &status, false),
                }
            }
            Some(client_frame::Kind::Reauthenticate(Reauthenticate { token })) => {
                self.reauthenticate(reference, &token).await
            }
            Some(client_frame::Kind::Hello(_)) => {
                let status = Status::invalid_argument("hello was sent already");
                error_frame(reference, &status, false)
            }
            None => {
                let status = Status::invalid_argument("empty frame");
                error_frame_reason(reference, &status, "malformed", false)
            }
        };
        vec![answer]
    }

    /// Follows the presence of `user_ids` (replacing the previous list): answers
    /// with their current presence, as far as this user may see it, then `Done`.
    ///
    /// The watch is registered before the state is read, so that no change falls
    /// between the snapshot and the live stream.
    async fn watch_presence(&self, reference: u64, user_ids: Vec<i64>) -> Vec<ServerFrame> {
        if user_ids.len() > MAX_WATCHED_USERS {
            let status =
                Status::invalid_argument(format!("watch at most {MAX_WATCHED_USERS} users"));
            return vec![error_frame(reference, &status, false)];
        }
        let query = || QueryRequest {
            watcher_id: self.user_id,
            user_ids: user_ids.clone(),
        };
        let mut presence = self.gateway.presence.clone();
        let watchable = match presence.query(query()).await {
            Ok(answer) => answer.into_inner().watchable_ids,
            Err(status) => return vec![error_frame(reference, &status, false)],
        };
        let hub = &self.gateway.hub;
        hub.watch_presence(self.user_id, self.connection_id, &watchable);
        let snapshot = match presence.query(query()).await {
            Ok(answer) => answer.into_inner().presences,
            Err(status) => return vec![error_frame(reference, &status, false)],
        };
        let mut frames: Vec<ServerFrame> = snapshot
            .into_iter()
            .map(|presence| {
                let event = Event {
                    seq: 0,
                    kind: Some(event::Kind::Presence(presence)),
                };
                frame(0, server_frame::Kind::Event(event))
            })
            .collect();
        frames.push(frame(reference, server_frame::Kind::Done(Done {})));
        frames
    }

    /// Tells presence-svc that this device is connected and in the foreground.
    async fn heartbeat(&self) -> Result<(), Status> {
        let request = HeartbeatRequest {
            user_id: self.user_id,
            device_id: self.device_id.clone(),
            connection_id: self.connection_id,
            node: self.gateway.config.node.clone(),
        };
        self.gateway.presence.clone().heartbeat(request).await?;
        Ok(())
    }

    async fn send(&self, reference: u64, send: SendMessage) -> ServerFrame {
        if let Err(status) = self.limits.send(self.user_id) {
            return error_frame(reference, &status, false);
        }
        let request = SendRequest {
            sender_id: self.user_id,
            sender_device: self.device_id.clone(),
            conversation_id: send.conversation_id,
            client_msg_id: send.client_msg_id,
            text: send.text,
        };
        let messages = &self.gateway.messages;
        let sent = retry_idempotent(|| {
            let (mut messages, request) = (messages.clone(), request.clone());
            async move { messages.send(request).await }
        })
        .await;
        match sent {
            Ok(response) => frame(
                reference,
                server_frame::Kind::Sent(send_ack(response.into_inner())),
            ),
            Err(status) => error_frame(reference, &status, false),
        }
    }

    /// Moves this user's watermarks (0 leaves one unchanged).
    async fn receipts(
        &self,
        reference: u64,
        conversation_id: i64,
        delivered: i64,
        read: i64,
    ) -> ServerFrame {
        let request = UpdateReceiptsRequest {
            user_id: self.user_id,
            conversation_id,
            delivered_up_to: delivered,
            read_up_to: read,
        };
        let messages = &self.gateway.messages;
        let moved = retry_idempotent(|| {
            let mut messages = messages.clone();
            async move { messages.update_receipts(request).await }
        })
        .await;
        match moved {
            Ok(_) => frame(reference, server_frame::Kind::Done(Done {})),
            Err(status) => error_frame(reference, &status, false),
        }
    }

    /// Sends the channel's posts to this connection while it is open; subscribers
    /// only.
    async fn open_channel(&self, reference: u64, conversation_id: i64) -> ServerFrame {
        let request = GetConversationRequest { conversation_id };
        let checked = async {
            let member = GetMemberRequest {
                conversation_id,
                user_id: self.user_id,
            };
            self.gateway.groups.clone().get_member(member).await?;
            let conversation = self
                .gateway
                .groups
                .clone()
                .get_conversation(request)
                .await?;
            if conversation.get_ref().kind() != ConversationKind::Channel {
                return Err(Status::invalid_argument("not a channel"));
            }
            Ok(())
        };
        if let Err(status) = checked.await {
            // Not a member: the same NOT_FOUND as a conversation that does not exist.
            let status = match status.code() {
                Code::NotFound => Status::not_found("no such conversation"),
                _ => status,
            };
            return error_frame(reference, &status, false);
        }
        if !self
            .gateway
            .hub
            .open_channel(self.user_id, self.connection_id, conversation_id)
        {
            let status = Status::resource_exhausted(format!(
                "at most {} channels open per connection",
                crate::hub::MAX_OPEN_CHANNELS
            ));
            return error_frame(reference, &status, false);
        }
        frame(reference, server_frame::Kind::Done(Done {}))
    }

    async fn kicked<S: FrameSink>(
        &self,
        registration: &crate::hub::Registration,
        sink: &mut S,
    ) -> End {
        let (status, reason, end) = match registration.kicked.get() {
            Some(Kicked::Replaced) => (
                Status::aborted("replaced by a newer connection of this device"),
                "replaced",
                End::Replaced,
            ),
            Some(Kicked::LoggedOut) => (
                Status::unauthenticated("logged out"),
                "logged_out",
                End::Refused,
            ),
            Some(Kicked::SlowConsumer) | None => (
                Status::resource_exhausted("too slow to keep up; reconnect with your cursor"),
                "slow_consumer",
                End::SlowConsumer,
            ),
        };
        let _ = sink
            .send(error_frame_reason(0, &status, reason, true))
            .await;
        end
    }

    fn observe_latency(&self, live: &LiveEvent) {
        if live.origin_device.as_deref() != Some(self.device_id.as_str()) {
            metrics::histogram!("confab_delivery_latency_seconds")
                .record(live.accepted_at.elapsed().as_secs_f64());
        }
    }

    /// Tells session-svc that this node holds the device.
    async fn announce(&self) {
        let request = RegisterDeviceRequest {
            user_id: self.user_id,
            device_id: self.device_id.clone(),
            node: self.gateway.config.node.clone(),
            connection_id: self.connection_id,
        };
        if let Err(status) = self.gateway.sessions.clone().register_device(request).await {
            tracing::warn!(user_id = self.user_id, %status, "device registration failed");
        }
        // A live connection is the first sign of presence.
        if let Err(status) = self.heartbeat().await {
            tracing::warn!(user_id = self.user_id, %status, "presence heartbeat failed");
        }
    }

    /// Leaves the hub and session-svc.
    async fn retire(&self) {
        self.gateway
            .hub
            .unregister(self.user_id, self.connection_id);
        let request = UnregisterDeviceRequest {
            user_id: self.user_id,
            device_id: self.device_id.clone(),
            node: self.gateway.config.node.clone(),
            connection_id: self.connection_id,
        };
        if let Err(status) = self
            .gateway
            .sessions
            .clone()
            .unregister_device(request)
            .await
        {
            tracing::warn!(user_id = self.user_id, %status, "device unregistration failed");
        }
        let request = DisconnectRequest {
            user_id: self.user_id,
            device_id: self.device_id.clone(),
            connection_id: self.connection_id,
            node: self.gateway.config.node.clone(),
        };
        if let Err(status) = self.gateway.presence.clone().disconnect(request).await {
            tracing::warn!(user_id = self.user_id, %status, "presence disconnect failed");
        }
    }
}

/// Returns the *sent* acknowledgement of a stored (or deduplicated) message.
pub(crate) fn send_ack(response: SendResponse) -> SendAck {
    let message = response.message.unwrap_or_default();
    SendAck {
        message_id: message.id,
        conversation_id: message.conversation_id,
        client_msg_id: message.client_msg_id,
        sent_at_ms: message.sent_at_ms,
        duplicate: response.duplicate,
    }
}

fn check_device_id(hello: &Hello) -> Result<(), Status> {
    let len = hello.device_id.chars().count();
    if !(1..=64).contains(&len) || hello.device_id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "device_id must be 1-64 printable characters",
        ));
    }
    Ok(())
}

fn frame(reference: u64, kind: server_frame::Kind) -> ServerFrame {
    ServerFrame {
        r#ref: reference,
        kind: Some(kind),
    }
}

/// Returns the machine-readable reason of a status code.
pub(crate) fn reason(status: &Status) -> &'static str {
    if crate::limits::is_rate_limited(status) {
        return "rate_limited";
    }
    match status.code() {
        Code::NotFound => "not_found",
        Code::ResourceExhausted => "too_large",
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => "bad_request",
        Code::Unauthenticated => "unauthenticated",
        Code::PermissionDenied => "permission_denied",
        Code::AlreadyExists => "already_exists",
        Code::Unavailable => "unavailable",
        Code::Aborted => "aborted",
        _ => "internal",
    }
}

fn error_frame(reference: u64, status: &Status, fatal: bool) -> ServerFrame {
    error_frame_reason(reference, status, reason(status), fatal)
}

fn error_frame_reason(reference: u64, status: &Status, reason: &str, fatal: bool) -> ServerFrame {
    frame(
        reference,
        server_frame::Kind::Error(ErrorFrame {
            code: status.code() as i32,
            reason: reason.to_owned(),
            message: status.message().to_owned(),
            fatal,
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoSink;

    impl FrameSink for NoSink {
        async fn send(&mut self, _frame: ServerFrame) -> Result<(), ()> {
            Ok(())
        }

        fn queued(&self) -> bool {
            false
        }

        async fn flush(&mut self) -> Result<(), ()> {
            Ok(())
        }

        async fn probe(&mut self) -> Result<(), ()> {
            Ok(())
        }
    }

    /// An idle connection's task holds the engine's future for the
    /// connection's whole life: the calls of its start and end (token check,
    /// registration, catch-up, retirement; each over 1.5 KiB) are boxed so that
    /// they do not size it. It was 2,832 bytes (debug build) before they were.
    #[test]
    fn idle_connection_future_stays_small() {
        let gateway = Arc::new(crate::fuzzing::offline_gateway());
        let limits = Arc::new(Limits::new(&gateway.config));
        let inbound = futures::stream::empty::<Inbound>().boxed();
        let closing = CancellationToken::new();
        let connection = run(gateway, limits, closing, None, inbound, NoSink);
        let size = std::mem::size_of_val(&connection);
        assert!(size < 2048, "the engine's future takes {size} bytes");
    }
}
