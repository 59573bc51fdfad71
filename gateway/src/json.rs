//! The proto3 JSON mapping of frames, for WebSocket text frames: any WebSocket tool
//! can talk to Confab with `{"ref":"1","hello":{"deviceId":"d1"}}`.
//!
//! The mapping is the standard one (lowerCamelCase names, 64-bit integers as
//! strings, enums by name), read from the descriptors the build embedded.

use std::sync::LazyLock;

use confab_proto::v1::{ClientFrame, ServerFrame};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};

struct Descriptors {
    client_frame: MessageDescriptor,
    server_frame: MessageDescriptor,
}

static DESCRIPTORS: LazyLock<Descriptors> = LazyLock::new(|| {
    let pool = DescriptorPool::decode(confab_proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set embedded at build time decodes");
    let message = |name: &str| {
        pool.get_message_by_name(name)
            .unwrap_or_else(|| panic!("{name} is in the embedded descriptor set"))
    };
    Descriptors {
        client_frame: message("confab.v1.ClientFrame"),
        server_frame: message("confab.v1.ServerFrame"),
    }
});

/// Parses a client frame from its proto3 JSON form.
///
/// # Errors
///
/// Returns a one-line description of what is wrong with the text.
pub(crate) fn decode_client_frame(text: &str) -> Result<ClientFrame, String> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let message = DynamicMessage::deserialize(DESCRIPTORS.client_frame.clone(), &mut deserializer)
        .map_err(|e| e.to_string())?;
    deserializer.end().map_err(|e| e.to_string())?;
    message.transcode_to().map_err(|e| e.to_string())
}

/// Renders a server frame in its proto3 JSON form.
pub(crate) fn encode_server_frame(frame: &ServerFrame) -> String {
    let mut message = DynamicMessage::new(DESCRIPTORS.server_frame.clone());
    message
        .transcode_from(frame)
        .expect("a ServerFrame transcodes to its own descriptor");
    serde_json::to_string(&message).expect("a dynamic message serializes to JSON")
}

#[cfg(test)]
mod tests {
    use confab_proto::v1::{Event, Hello, Message, client_frame, server_frame};

    use super::*;

    /// A hello in proto3 JSON decodes, with 64-bit numbers as strings or numbers.
    #[test]
    fn decodes_hello() {
        for text in [
            r#"{"ref":"7","hello":{"deviceId":"d1","cursor":"42"}}"#,
            r#"{"ref":7,"hello":{"deviceId":"d1","cursor":42}}"#,
        ] {
            let frame = decode_client_frame(text).unwrap();
            assert_eq!(frame.r#ref, 7);
            let Some(client_frame::Kind::Hello(Hello {
                device_id, cursor, ..
            })) = frame.kind
            else {
                panic!("not a hello: {frame:?}");
            };
            assert_eq!((device_id.as_str(), cursor), ("d1", 42));
        }
    }

    /// Malformed JSON, unknown fields and trailing garbage are refused, not panicked on.
    #[test]
    fn refuses_malformed() {
        for text in [
            "",
            "{",
            "[]",
            r#"{"hello":5}"#,
            r#"{"nope":1}"#,
            r#"{"ref":"1"} x"#,
            "\"\\ud800\"",
        ] {
            assert!(decode_client_frame(text).is_err(), "{text}");
        }
    }

    /// An event renders with camelCase names and 64-bit ids as strings.
    #[test]
    fn encodes_event() {
        let frame = ServerFrame {
            r#ref: 0,
            kind: Some(server_frame::Kind::Event(Event {
                seq: 3,
                kind: Some(confab_proto::v1::event::Kind::Message(Message {
                    id: 9_007_199_254_740_993,
                    conversation_id: 5,
                    text: "hi".into(),
                    ..Default::default()
                })),
            })),
        };
        let json: serde_json::Value = serde_json::from_str(&encode_server_frame(&frame)).unwrap();
        assert_eq!(json["event"]["seq"], "3");
        assert_eq!(json["event"]["message"]["id"], "9007199254740993");
        assert_eq!(json["event"]["message"]["conversationId"], "5");
    }
}
