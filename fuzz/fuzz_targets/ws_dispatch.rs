//! A sequence of WebSocket messages (see `confab_fuzz::ws_messages` for the
//! input format) dispatched by one connection: nothing panics, replies follow
//! the format of the latest data message, a close ends the stream, and the
//! error frame answering a malformed message encodes and decodes in the reply
//! format.

#![no_main]

use confab_gateway::fuzzing::{Dispatched, WsConnection, WsMessage};
use confab_proto::v1::{ClientFrame, Error as ErrorFrame, ServerFrame, server_frame};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let connection = WsConnection::new();
    let mut text = false;
    for message in confab_fuzz::ws_messages(data) {
        match message {
            WsMessage::Binary(_) => text = false,
            WsMessage::Text(_) => text = true,
            WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Close => {}
        }
        let dispatched = connection.dispatch(message);
        assert_eq!(connection.replies_in_text(), text, "{message:?}");
        match dispatched {
            Dispatched::Frame(frame) => {
                let bytes = frame.encode_to_vec();
                let decoded = ClientFrame::decode(&*bytes).expect("a re-encoded frame decodes");
                assert_eq!(decoded, *frame);
            }
            Dispatched::Malformed(why) => check_reply(&connection, why),
            Dispatched::Control => {
                assert!(matches!(message, WsMessage::Ping(_) | WsMessage::Pong(_)));
            }
            Dispatched::Close => {
                assert!(matches!(message, WsMessage::Close));
                // The inbound stream has ended: nothing after it is read.
                return;
            }
        }
    }
});

/// Encodes the answer to a malformed message the way the connection's sink does
/// and checks it reads back.
fn check_reply(connection: &WsConnection, why: String) {
    let reply = ServerFrame {
        r#ref: 0,
        kind: Some(server_frame::Kind::Error(ErrorFrame {
            code: 3,
            reason: "malformed".to_owned(),
            message: format!("malformed frame: {why}"),
            fatal: false,
        })),
    };
    let bytes = connection.encode_reply(&reply);
    if connection.replies_in_text() {
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("a text reply is json");
        assert_eq!(
            json["error"]["message"].as_str(),
            Some(&*format!("malformed frame: {why}"))
        );
    } else {
        assert_eq!(
            ServerFrame::decode(&*bytes).expect("a binary reply decodes"),
            reply
        );
    }
}
