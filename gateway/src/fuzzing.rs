//! Entry points for the fuzz targets in `fuzz/` and the benchmarks in
//! `benches/`, and for nothing else: hidden from the docs, not an API, free to
//! change with the decoders they reach.
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
}
