//! Entry points for the fuzz targets in `fuzz/` and the benchmarks in
//! `benches/`, and for nothing else: hidden from the docs, not an API, free to
//! change with the decoders they reach. [`GrpcWebCalls`] runs gRPC-web request
//! bodies through the edge's real router.
//!
//! Each one runs the code a live connection runs on what the network hands
//! it, without a socket: [`WsConnection::dispatch`] is the WebSocket
//! transport's own dispatch of one message (binary protobuf or proto3 JSON
//! text to a client frame, control frames, close), and the two `decode_`
//! functions are that dispatch for one data message. Binary frames are also
//! what a gRPC `Edge.Stream` message goes through: tonic's codec is the same
//! prost decode.

use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::ws::Message;
use confab_proto::v1::{ClientFrame, ServerFrame};
use prost::Message as _;

use crate::engine::Inbound;
use crate::ws::{self, Step};

/// Decodes a binary WebSocket message to a client frame, as a connection does.
///
/// # Errors
///
/// Returns the text a malformed frame is answered with.
pub fn decode_ws_binary(bytes: &[u8]) -> Result<ClientFrame, String> {
    WsConnection::new()
        .dispatch(WsMessage::Binary(bytes))
        .into_frame()
}

/// Decodes a text WebSocket message (proto3 JSON) to a client frame, as a
/// connection does. The WebSocket layer has already refused text that is not
/// UTF-8.
///
/// # Errors
///
/// Returns the text a malformed frame is answered with.
pub fn decode_ws_text(text: &str) -> Result<ClientFrame, String> {
    WsConnection::new()
        .dispatch(WsMessage::Text(text))
        .into_frame()
}

/// Parses a client frame from its proto3 JSON form (the mapping alone, without
/// the WebSocket dispatch around it).
///
/// # Errors
///
/// Returns a one-line description of what is wrong with the text.
pub fn decode_json_client_frame(text: &str) -> Result<ClientFrame, String> {
    crate::json::decode_client_frame(text)
}

/// Renders a server frame in its proto3 JSON form.
pub fn encode_json_server_frame(frame: &ServerFrame) -> String {
    crate::json::encode_server_frame(frame)
}

/// One message as the WebSocket layer delivers it.
#[derive(Debug, Clone, Copy)]
pub enum WsMessage<'a> {
    /// A binary data message: protobuf.
    Binary(&'a [u8]),
    /// A text data message: proto3 JSON.
    Text(&'a str),
    /// A ping (the WebSocket layer answers it).
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A close frame.
    Close,
}

/// What the connection makes of one message.
#[derive(Debug)]
pub enum Dispatched {
    /// A client frame for the engine.
    Frame(Box<ClientFrame>),
    /// An undecodable data message, answered with a non-fatal error frame
    /// carrying this text.
    Malformed(String),
    /// A control frame, left to the WebSocket layer.
    Control,
    /// The inbound stream ends.
    Close,
}

impl Dispatched {
    fn into_frame(self) -> Result<ClientFrame, String> {
        match self {
            Self::Frame(frame) => Ok(*frame),
            Self::Malformed(why) => Err(why),
            other => panic!("a data message dispatched to {other:?}"),
        }
    }
}

/// The state one WebSocket connection keeps between messages: the format of the
/// client's latest data message, which its replies follow.
#[derive(Debug, Default)]
pub struct WsConnection {
    /// Whether replies go out as proto3 JSON text.
    text: AtomicBool,
}

impl WsConnection {
    /// Returns a connection that has received nothing yet (replies in binary).
    pub fn new() -> Self {
        Self::default()
    }

    /// Dispatches `message` as the connection's read loop does.
    ///
    /// # Panics
    ///
    /// Panics if the dispatch reports a read error for a message that was read
    /// fine: that would be a bug for the fuzzer to find.
    pub fn dispatch(&self, message: WsMessage<'_>) -> Dispatched {
        let message = match message {
            WsMessage::Binary(bytes) => Message::Binary(bytes.to_vec().into()),
            WsMessage::Text(text) => Message::Text(text.into()),
            WsMessage::Ping(bytes) => Message::Ping(bytes.to_vec().into()),
            WsMessage::Pong(bytes) => Message::Pong(bytes.to_vec().into()),
            WsMessage::Close => Message::Close(None),
        };
        match ws::decode(Ok(message), &self.text) {
            Step::Yield(Inbound::Frame(frame)) => Dispatched::Frame(Box::new(frame)),
            Step::Yield(Inbound::Malformed(why)) => Dispatched::Malformed(why),
            Step::Skip => Dispatched::Control,
            Step::Stop => Dispatched::Close,
            Step::Yield(inbound) => panic!("a message read fine dispatched to {inbound:?}"),
            Step::InvalidText => panic!("a message read fine dispatched as invalid text"),
        }
    }

    /// Returns whether replies go out as proto3 JSON text (else protobuf).
    pub fn replies_in_text(&self) -> bool {
        self.text.load(Ordering::Relaxed)
    }

    /// Encodes `frame` in the connection's reply format, as its sink does.
    pub fn encode_reply(&self, frame: &ServerFrame) -> Vec<u8> {
        if self.replies_in_text() {
            crate::json::encode_server_frame(frame).into_bytes()
        } else {
            frame.encode_to_vec()
        }
    }
}

/// Returns a gateway with the default limits whose services behind it answer
/// UNAVAILABLE to every call: what runs is the edge alone.
///
/// # Panics
///
/// Never, with its fixed secret.
pub fn offline_gateway() -> crate::Gateway {
    use confab_common::channel::{GrpcChannel, in_process};
    let unavailable = || -> GrpcChannel {
        in_process(tower::service_fn(
            |_: http::Request<tonic::body::Body>| async {
                let status = tonic::Status::unavailable("no services behind this edge");
                Ok::<_, std::convert::Infallible>(status.into_http())
            },
        ))
    };
    crate::Gateway {
        tokens: confab_common::auth::TokenService::new(
            b"offline",
            std::time::Duration::from_secs(60),
            std::time::Duration::from_secs(60),
        )
        .expect("a token service"),
        groups: confab_proto::group::v1::groups_client::GroupsClient::new(unavailable()),
        external_users: std::sync::Arc::default(),
        messages: confab_proto::message::v1::messages_client::MessagesClient::new(unavailable()),
        sessions: confab_proto::session::v1::sessions_client::SessionsClient::new(unavailable()),
        presence: confab_proto::presence::v1::presences_client::PresencesClient::new(unavailable()),
        hub: std::sync::Arc::new(crate::Hub::new()),
        metrics: None,
        config: crate::GatewayConfig::default(),
    }
}

/// The gRPC-web call a browser makes, in the edge's real router (CORS, the
/// gRPC-web translation, tonic's deframing and decode limits, the service),
/// without a socket. The services behind the edge answer UNAVAILABLE to
/// everything: what is fuzzed is the way from request bytes to a handler.
#[derive(Debug)]
pub struct GrpcWebCalls {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

/// The calls [`GrpcWebCalls`] can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebMethod {
    /// `Edge.Subscribe` (a server stream).
    Subscribe,
    /// `Edge.Submit`.
    Submit,
    /// `Accounts.Register` (no token needed: reaches the service).
    Register,
    /// `Conversations.Send`.
    Send,
}

impl WebMethod {
    /// Every method, for a fuzzer to pick from.
    pub const ALL: [Self; 4] = [Self::Subscribe, Self::Submit, Self::Register, Self::Send];

    fn path(self) -> &'static str {
        match self {
            Self::Subscribe => "/confab.v1.Edge/Subscribe",
            Self::Submit => "/confab.v1.Edge/Submit",
            Self::Register => "/confab.v1.Accounts/Register",
            Self::Send => "/confab.v1.Conversations/Send",
        }
    }
}

/// What came back from one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebAnswer {
    /// The HTTP status.
    pub status: u16,
    /// `grpc-status` of a trailers-only answer (in the HTTP headers).
    pub header_status: Option<String>,
    /// The response body: gRPC-web frames, base64 in the text mode.
    pub body: Vec<u8>,
}

impl WebAnswer {
    /// The call's `grpc-status` in the binary mode: from the headers of a
    /// trailers-only answer, or from the body's trailers frame.
    pub fn grpc_status(&self) -> Option<String> {
        if let Some(status) = &self.header_status {
            return Some(status.clone());
        }
        let text = String::from_utf8_lossy(&self.body);
        let (_, rest) = text.split_once("grpc-status:")?;
        Some(rest.chars().take_while(char::is_ascii_digit).collect())
    }
}

impl Default for GrpcWebCalls {
    fn default() -> Self {
        Self::new()
    }
}

impl GrpcWebCalls {
    /// Builds the router with the default limits.
    ///
    /// # Panics
    ///
    /// Panics when the runtime or the router cannot be built.
    pub fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let router = runtime.block_on(async {
            let gateway = offline_gateway();
            let limits = std::sync::Arc::new(crate::limits::Limits::new(&gateway.config));
            let (router, _health) = crate::http::router(
                std::sync::Arc::new(gateway),
                limits,
                tokio_util::sync::CancellationToken::new(),
                tokio_util::task::TaskTracker::new(),
            )
            .expect("the router");
            router
        });
        Self { runtime, router }
    }

    /// Posts `body` to `method` as a browser does, in the text mode (base64)
    /// or binary, and reads the whole answer.
    ///
    /// # Panics
    ///
    /// Panics when the request cannot be built or the answer cannot be read:
    /// the router must answer every body.
    pub fn call(&self, method: WebMethod, text: bool, body: &[u8]) -> WebAnswer {
        use tower::ServiceExt as _;
        let content_type = if text {
            "application/grpc-web-text"
        } else {
            "application/grpc-web+proto"
        };
        let request = http::Request::post(method.path())
            .header(http::header::CONTENT_TYPE, content_type)
            .header("x-grpc-web", "1")
            .body(axum::body::Body::from(body.to_vec()))
            .expect("a request");
        self.runtime.block_on(async {
            let response = self
                .router
                .clone()
                .oneshot(request)
                .await
                .expect("the router is infallible");
            let status = response.status().as_u16();
            let header_status = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned);
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("the answer is readable");
            WebAnswer {
                status,
                header_status,
                body: body.to_vec(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use confab_proto::v1::{Ping, client_frame};

    use super::*;

    /// The fuzzing entry points dispatch as the connection does: frames in
    /// either encoding, malformed data answered, control frames skipped, a close
    /// ending the stream, replies following the latest data message.
    #[test]
    fn dispatch_matches_the_connection() {
        let ping = ClientFrame {
            r#ref: 3,
            kind: Some(client_frame::Kind::Ping(Ping { nonce: 1 })),
        };
        assert_eq!(decode_ws_binary(&ping.encode_to_vec()), Ok(ping.clone()));
        assert_eq!(
            decode_ws_text(r#"{"ref":"3","ping":{"nonce":"1"}}"#),
            Ok(ping)
        );
        assert!(decode_ws_binary(&[0xff, 0xff, 0xff]).is_err());

        let connection = WsConnection::new();
        assert!(matches!(
            connection.dispatch(WsMessage::Text("{")),
            Dispatched::Malformed(_)
        ));
        assert!(connection.replies_in_text());
        assert!(matches!(
            connection.dispatch(WsMessage::Ping(b"p")),
            Dispatched::Control
        ));
        assert!(connection.replies_in_text());
        assert!(matches!(
            connection.dispatch(WsMessage::Binary(&[])),
            Dispatched::Frame(_)
        ));
        assert!(!connection.replies_in_text());
        assert!(matches!(
            connection.dispatch(WsMessage::Close),
            Dispatched::Close
        ));
    }

    /// gRPC-web bodies reach the handlers through the real router: a
    /// well-formed call gets the services' answer, broken ones a gRPC error,
    /// never an HTTP failure.
    #[test]
    fn grpc_web_calls_reach_the_handlers() {
        use confab_proto::v1::RegisterRequest;
        let calls = GrpcWebCalls::new();
        let register = RegisterRequest {
            username: "webby".into(),
            password: "long enough password".into(),
        }
        .encode_to_vec();
        let mut framed = vec![0];
        framed.extend_from_slice(&u32::try_from(register.len()).unwrap().to_be_bytes());
        framed.extend_from_slice(&register);
        // Reached group-svc, which is not there.
        let answer = calls.call(WebMethod::Register, false, &framed);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.grpc_status().as_deref(), Some("14"), "{answer:?}");
        // No token.
        let answer = calls.call(WebMethod::Subscribe, false, &[0, 0, 0, 0, 0]);
        assert_eq!(answer.grpc_status().as_deref(), Some("16"), "{answer:?}");
        // A length prefix over the limit.
        let answer = calls.call(WebMethod::Submit, false, &[0, 0x7f, 0, 0, 0]);
        assert_eq!(answer.grpc_status().as_deref(), Some("11"), "{answer:?}");
        // Not base64, a truncated frame, an empty body.
        for (text, body) in [
            (true, &b"!!!!"[..]),
            (false, &[0, 0, 0][..]),
            (true, &[][..]),
        ] {
            let answer = calls.call(WebMethod::Send, text, body);
            assert_eq!(answer.status, 200, "{answer:?}");
        }
    }
}
