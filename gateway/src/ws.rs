//! The WebSocket transport: `GET /v1/ws`.
//!
//! Binary frames carry protobuf `ClientFrame` / `ServerFrame`; text frames carry
//! their proto3 JSON mapping. The server answers in the format of the client's
//! latest frame. The token comes in the `Authorization: Bearer` header or the
//! `access_token` query parameter (refused with 401 before the upgrade), or, when
//! neither is present, in the `Hello`.
//!
//! Before the upgrade: a browser's `Origin` must be on the allow-list (403), and
//! the address and the user must have a connection to spare (429). After it,
//! the server pings a quiet client and closes one silent for the idle timeout.
//! A text frame that is not UTF-8 closes the connection with 1007 (RFC 6455,
//! section 8.1). No extension is negotiated: a `permessage-deflate` offer is
//! answered without it, since compressing attacker-chosen data next to secrets
//! leaks them (CRIME, BREACH) and inflating costs memory the frame limit does
//! not bound.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use confab_proto::v1::{ClientFrame, ServerFrame};
use futures::stream::SplitSink;
use futures::{FutureExt as _, SinkExt as _, Stream, StreamExt as _};
use prost::Message as _;
use tokio::time::Instant;

use crate::engine::{self, End, FrameSink, Inbound};
use crate::http::AppState;
use crate::limits::Refusal;

/// Per-connection read buffer, allocated at the upgrade and held for the
/// connection's life. tungstenite's default is 128 KiB; at 8 KiB it was still
/// half of an idle connection's memory (measured with massif). Chat frames are
/// a few hundred bytes, several fit in one read; a larger frame grows the
/// buffer to its size (and the buffer stays that size).
const READ_BUFFER: usize = 512;
/// Bytes buffered before a write is forced. A threshold, not an allocation:
/// the engine flushes whenever it has nothing else ready, so the buffer holds
/// the frames that were ready together.
const WRITE_BUFFER: usize = 8 * 1024;

/// Upgrades to a WebSocket after checking a token given at the upgrade.
pub(crate) async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(query): Query<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    // A page of another site must not ride on the user's cookies or network
    // position; native clients send no Origin.
    if !state
        .limits
        .origin_header_allowed(headers.get(axum::http::header::ORIGIN))
    {
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let Some(slot) = state.limits.connection_slot(peer.ip()) else {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address",
        )
            .into_response();
    };
    let header_token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer);
    let token = header_token.or_else(|| query.get("access_token").map(String::as_str));
    let caller = match token {
        Some(token) => {
            let gateway = &state.gateway;
            match crate::auth::caller(gateway, token).await {
                Ok(caller) => Some(caller),
                Err(status) => {
                    return (StatusCode::UNAUTHORIZED, status.message().to_owned()).into_response();
                }
            }
        }
        None => None,
    };
    if let Some(caller) = &caller {
        // No device id yet: every connection of the user counts.
        if let Err(status) =
            crate::engine::user_has_room(&state.gateway, &state.limits, caller.user_id, "")
        {
            // user_has_room counted the refusal.
            return (StatusCode::TOO_MANY_REQUESTS, status.message().to_owned()).into_response();
        }
    }
    let max = state.gateway.config.max_frame_bytes;
    // Counts the connection as live until its close frame is out.
    let live = state.websockets.token();
    upgrade
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER.max(max) * 4)
        .max_message_size(max)
        .max_frame_size(max)
        // The address's slot is held for the connection's whole life.
        .on_upgrade(move |socket| connection(state, caller, socket, (slot, live)))
}

/// Returns the future of one upgraded connection: the engine, then the close
/// frame. Everything is built before the future, which is returned as is, not
/// wrapped in an `async` block: its task holds it for the connection's whole
/// life, and an async block's captures (the socket alone is 368 bytes) would
/// keep their place in its layout after they moved into the engine.
fn connection(
    state: AppState,
    caller: Option<crate::auth::Caller>,
    socket: WebSocket,
    held: impl Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    // The format of the client's latest data frame; the replies follow it.
    let text = Arc::new(AtomicBool::new(false));
    // Set when the client broke the protocol in a way that decides the close code.
    let invalid_text = Arc::new(AtomicBool::new(false));
    let idle = state.gateway.config.ws_idle_timeout;
    let inbound = {
        let text = text.clone();
        let invalid_text = invalid_text.clone();
        watch_idle(stream, idle)
            .map(move |read| match read {
                Read::Message(message) => {
                    let step = decode(message, &text);
                    if matches!(step, Step::InvalidText) {
                        invalid_text.store(true, Ordering::Relaxed);
                    }
                    step
                }
                Read::Quiet => Step::Yield(Inbound::Quiet),
                Read::Idle => Step::Yield(Inbound::Idle),
            })
            .take_while(|step| std::future::ready(!matches!(step, Step::Stop | Step::InvalidText)))
            .filter_map(|step| {
                std::future::ready(match step {
                    Step::Yield(inbound) => Some(inbound),
                    Step::Skip | Step::Stop | Step::InvalidText => None,
                })
            })
            .boxed()
    };
    let sink = WsSink {
        sink,
        text,
        queued: false,
    };
    engine::run(
        state.gateway,
        state.limits,
        state.closing,
        caller,
        inbound,
        sink,
    )
    .then(move |(end, sink)| close(sink, end, invalid_text, held))
}

/// Sends the close frame that says why the connection ended, then lets go of
/// what was `held` for the connection's life.
async fn close(mut sink: WsSink, end: End, invalid_text: Arc<AtomicBool>, held: impl Send) {
    let (code, reason) = match end {
        // The inbound stream ended on the bad frame; the engine saw it as a close.
        _ if invalid_text.load(Ordering::Relaxed) => (close_code::INVALID, "text frame not utf-8"),
        End::ClientClosed | End::SinkClosed => (close_code::NORMAL, ""),
        End::Refused => (close_code::POLICY, "refused"),
        End::TooLarge => (close_code::SIZE, "frame too large"),
        End::SlowConsumer => (close_code::AGAIN, "too slow; resync from your cursor"),
        End::Replaced => (close_code::POLICY, "replaced by a newer connection"),
        End::Shutdown => (close_code::AWAY, "server shutting down"),
        End::Idle => (close_code::AWAY, "idle timeout"),
    };
    let close = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = sink.sink.send(close).await;
    drop(held);
}

/// What the idle watch saw on the socket.
enum Read {
    /// A message (a ping or pong included: any of them is a sign of life).
    Message(Result<Message, axum::Error>),
    /// Nothing for half the idle timeout: time to ping.
    Quiet,
    /// Nothing for the whole idle timeout; the stream ends after this.
    Idle,
}

/// Reads `socket`, reporting silence: [`Read::Quiet`] every `idle / 2` without a
/// message, then [`Read::Idle`] once nothing arrived for `idle`.
fn watch_idle<S>(socket: S, idle: Duration) -> impl Stream<Item = Read> + Send
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let probe_every = idle / 2;
    let now = Instant::now();
    // (socket, last message, next probe, done)
    let state = (socket, now, now + probe_every, false);
    futures::stream::unfold(
        state,
        move |(mut socket, last, next_probe, done)| async move {
            if done {
                return None;
            }
            let deadline = next_probe.min(last + idle);
            match tokio::time::timeout_at(deadline, socket.next()).await {
                Ok(Some(message)) => {
                    let now = Instant::now();
                    let read = Read::Message(message);
                    Some((read, (socket, now, now + probe_every, false)))
                }
                Ok(None) => None,
                Err(_) if Instant::now() >= last + idle => {
                    Some((Read::Idle, (socket, last, next_probe, true)))
                }
                Err(_) => {
                    let next = Instant::now() + probe_every;
                    Some((Read::Quiet, (socket, last, next, false)))
                }
            }
        },
    )
}

/// What one WebSocket message means to the engine.
pub(crate) enum Step {
    Yield(Inbound),
    /// A control frame, answered by the WebSocket layer itself.
    Skip,
    /// A close frame or a broken socket: the inbound stream ends.
    Stop,
    /// A text frame that is not UTF-8: the inbound stream ends, and the close
    /// frame says 1007.
    InvalidText,
}

pub(crate) fn decode(message: Result<Message, axum::Error>, text: &AtomicBool) -> Step {
    match message {
        Ok(Message::Binary(bytes)) => {
            text.store(false, Ordering::Relaxed);
            Step::Yield(match ClientFrame::decode(bytes) {
                Ok(frame) => Inbound::Frame(frame),
                Err(error) => Inbound::Malformed(error.to_string()),
            })
        }
        Ok(Message::Text(body)) => {
            text.store(true, Ordering::Relaxed);
            Step::Yield(match crate::json::decode_client_frame(body.as_str()) {
                Ok(frame) => Inbound::Frame(frame),
                Err(error) => Inbound::Malformed(error),
            })
        }
        Ok(Message::Ping(_) | Message::Pong(_)) => Step::Skip,
        Ok(Message::Close(_)) => Step::Stop,
        Err(error) if caused_by(&error, CAPACITY) => {
            Refusal::FrameSize.count();
            Step::Yield(Inbound::TooLarge)
        }
        Err(error) if caused_by(&error, NOT_UTF8) => Step::InvalidText,
        Err(error) => {
            tracing::debug!(%error, "websocket read failed");
            Step::Stop
        }
    }
}

/// How tungstenite's errors start (it is not a dependency of ours, so its
/// error type cannot be matched): an oversized message is a capacity error.
const CAPACITY: &str = "Space limit exceeded";
/// A text message that is not UTF-8.
const NOT_UTF8: &str = "UTF-8 encoding error";

/// Returns whether `error` or one of its causes reads `prefix...`.
fn caused_by(error: &axum::Error, prefix: &str) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.to_string().starts_with(prefix) {
            return true;
        }
        source = cause.source();
    }
    false
}

struct WsSink {
    sink: SplitSink<WebSocket, Message>,
    text: Arc<AtomicBool>,
    /// Frames were fed since the last completed flush.
    queued: bool,
}

impl FrameSink for WsSink {
    /// Encodes before the future is made: every await of the engine on a send
    /// sizes the connection's task, and this one holds only the encoded message.
    fn send(&mut self, frame: ServerFrame) -> impl Future<Output = Result<(), ()>> + Send {
        let message = if self.text.load(Ordering::Relaxed) {
            Message::Text(crate::json::encode_server_frame(&frame).into())
        } else {
            Message::Binary(frame.encode_to_vec().into())
        };
        self.queued = true;
        self.sink.feed(message).map(|fed| fed.map_err(|_| ()))
    }

    fn queued(&self) -> bool {
        self.queued
    }

    /// Clears [`WsSink::queued`] once the flush completed: a flush dropped
    /// half way (the engine had something else to do) leaves it set.
    fn flush(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        self.sink.flush().map(written(&mut self.queued))
    }

    /// A ping is sent and flushed with whatever was queued.
    fn probe(&mut self) -> impl Future<Output = Result<(), ()>> + Send {
        let ping = Message::Ping(bytes::Bytes::new());
        self.sink.send(ping).map(written(&mut self.queued))
    }
}

/// The outcome of a write that flushes the sink: once it completed, nothing
/// is `queued` any more.
fn written<E>(queued: &mut bool) -> impl FnOnce(Result<(), E>) -> Result<(), ()> + Send + '_ {
    move |outcome| {
        if outcome.is_ok() {
            *queued = false;
        }
        outcome.map_err(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use confab_proto::v1::{SendMessage, client_frame};

    use super::*;

    fn send_frame() -> ClientFrame {
        ClientFrame {
            r#ref: 9,
            kind: Some(client_frame::Kind::Send(SendMessage {
                conversation_id: 1 << 40,
                client_msg_id: "m-1".into(),
                text: "héllo".into(),
            })),
        }
    }

    /// A binary frame decodes to the client frame it encodes, and the replies
    /// switch to binary.
    #[test]
    fn binary_frame_round_trips() {
        let text = AtomicBool::new(true);
        let bytes = send_frame().encode_to_vec();
        let step = decode(Ok(Message::Binary(bytes.into())), &text);
        let Step::Yield(Inbound::Frame(frame)) = step else {
            panic!("not a frame");
        };
        assert_eq!(frame, send_frame());
        assert!(!text.load(Ordering::Relaxed));
    }

    /// A text frame is read as proto3 JSON, and the replies switch to text.
    #[test]
    fn text_frame_is_json() {
        let text = AtomicBool::new(false);
        let json = r#"{"ref":"9","send":{"conversationId":"1099511627776","clientMsgId":"m-1","text":"héllo"}}"#;
        let step = decode(Ok(Message::Text(json.into())), &text);
        let Step::Yield(Inbound::Frame(frame)) = step else {
            panic!("not a frame");
        };
        assert_eq!(frame, send_frame());
        assert!(text.load(Ordering::Relaxed));
    }

    /// Undecodable bytes and text are answered as malformed, not fatal; control
    /// frames are left to the WebSocket layer; a close ends the stream.
    #[test]
    fn malformed_and_control_frames() {
        let text = AtomicBool::new(false);
        let garbage = decode(Ok(Message::Binary(vec![0xff, 0xff, 0xff].into())), &text);
        assert!(matches!(garbage, Step::Yield(Inbound::Malformed(_))));
        let bad_json = decode(Ok(Message::Text("{\"send\":".into())), &text);
        assert!(matches!(bad_json, Step::Yield(Inbound::Malformed(_))));
        assert!(matches!(
            decode(Ok(Message::Ping(Vec::new().into())), &text),
            Step::Skip
        ));
        assert!(matches!(
            decode(Ok(Message::Close(None)), &text),
            Step::Stop
        ));
    }
}
