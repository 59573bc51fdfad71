//! The proto3 JSON mapping of the frames, by hand: lowerCamelCase names, 64-bit
//! integers as strings, default values omitted.
//!
//! Parsing is strict where the contract is: a 64-bit integer sent as a JSON
//! number is an error, so that the test catches a server that does so.

use anyhow::{Context, Result, bail};
use confab_proto::v1::{
    ClientFrame, Error as ErrorFrame, Event, Message, Pong, SendAck, ServerFrame, SyncComplete,
    Welcome, client_frame, event, server_frame,
};
use serde_json::{Map, Value, json};

/// Returns the JSON form of a client frame.
pub fn client_frame(frame: &ClientFrame) -> Value {
    let mut object = Map::new();
    if frame.r#ref != 0 {
        object.insert("ref".into(), Value::String(frame.r#ref.to_string()));
    }
    match &frame.kind {
        Some(client_frame::Kind::Hello(hello)) => {
            let mut body =
                json!({ "deviceId": hello.device_id, "cursor": hello.cursor.to_string() });
            if !hello.token.is_empty() {
                body["token"] = Value::String(hello.token.clone());
            }
            object.insert("hello".into(), body);
        }
        Some(client_frame::Kind::Send(send)) => {
            let body = json!({
                "conversationId": send.conversation_id.to_string(),
                "clientMsgId": send.client_msg_id,
                "text": send.text,
            });
            object.insert("send".into(), body);
        }
        Some(client_frame::Kind::Ping(ping)) => {
            object.insert("ping".into(), json!({ "nonce": ping.nonce.to_string() }));
        }
        None => {}
    }
    Value::Object(object)
}

/// Parses a server frame from JSON text.
///
/// # Errors
///
/// Fails on anything the proto3 JSON mapping of `ServerFrame` does not allow.
pub fn parse_server_frame(text: &str) -> Result<ServerFrame> {
    let value: Value = serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))?;
    server_frame(&value).with_context(|| format!("bad server frame: {text}"))
}

/// Decodes a server frame from its JSON value.
///
/// # Errors
///
/// Fails on anything the proto3 JSON mapping of `ServerFrame` does not allow.
pub fn server_frame(value: &Value) -> Result<ServerFrame> {
    let object = value.as_object().context("frame is not an object")?;
    let kinds = ["welcome", "sent", "event", "synced", "error", "pong"];
    let present: Vec<&str> = kinds
        .into_iter()
        .filter(|kind| object.contains_key(*kind))
        .collect();
    let [kind] = present.as_slice() else {
        bail!("expected exactly one of {kinds:?}, got {present:?}");
    };
    let body = object[*kind]
        .as_object()
        .with_context(|| format!("{kind} is not an object"))?;
    let kind = match *kind {
        "welcome" => server_frame::Kind::Welcome(Welcome {
            user_id: int64(body, "userId")?,
            device_id: string(body, "deviceId")?,
        }),
        "sent" => server_frame::Kind::Sent(SendAck {
            message_id: int64(body, "messageId")?,
            conversation_id: int64(body, "conversationId")?,
            client_msg_id: string(body, "clientMsgId")?,
            sent_at_ms: int64(body, "sentAtMs")?,
            duplicate: boolean(body, "duplicate")?,
        }),
        "event" => server_frame::Kind::Event(event_of(body)?),
        "synced" => server_frame::Kind::Synced(SyncComplete {
            seq: uint64(body, "seq")?,
        }),
        "error" => server_frame::Kind::Error(ErrorFrame {
            code: int32(body, "code")?,
            reason: string(body, "reason")?,
            message: string(body, "message")?,
            fatal: boolean(body, "fatal")?,
        }),
        _ => server_frame::Kind::Pong(Pong {
            nonce: uint64(body, "nonce")?,
        }),
    };
    Ok(ServerFrame {
        r#ref: uint64(object, "ref")?,
        kind: Some(kind),
    })
}

fn event_of(body: &Map<String, Value>) -> Result<Event> {
    let kind = match body.get("message") {
        Some(Value::Object(message)) => Some(event::Kind::Message(message_of(message)?)),
        Some(other) => bail!("event.message is not an object: {other}"),
        None => None,
    };
    Ok(Event {
        seq: uint64(body, "seq")?,
        kind,
    })
}

fn message_of(body: &Map<String, Value>) -> Result<Message> {
    Ok(Message {
        id: int64(body, "id")?,
        conversation_id: int64(body, "conversationId")?,
        sender_id: int64(body, "senderId")?,
        sender_device: string(body, "senderDevice")?,
        client_msg_id: string(body, "clientMsgId")?,
        sent_at_ms: int64(body, "sentAtMs")?,
        text: string(body, "text")?,
    })
}

/// A 64-bit integer: a decimal string, 0 when absent.
fn int64(body: &Map<String, Value>, name: &str) -> Result<i64> {
    match body.get(name) {
        None => Ok(0),
        Some(Value::String(text)) => text.parse().with_context(|| format!("{name}: {text:?}")),
        Some(other) => bail!("{name} must be a string (64-bit integer), got {other}"),
    }
}

fn uint64(body: &Map<String, Value>, name: &str) -> Result<u64> {
    match body.get(name) {
        None => Ok(0),
        Some(Value::String(text)) => text.parse().with_context(|| format!("{name}: {text:?}")),
        Some(other) => bail!("{name} must be a string (64-bit integer), got {other}"),
    }
}

/// A 32-bit integer: a JSON number (a string is accepted too, as parsers must).
fn int32(body: &Map<String, Value>, name: &str) -> Result<i32> {
    match body.get(name) {
        None => Ok(0),
        Some(Value::Number(number)) => {
            let wide = number
                .as_i64()
                .with_context(|| format!("{name}: {number}"))?;
            Ok(i32::try_from(wide)?)
        }
        Some(Value::String(text)) => text.parse().with_context(|| format!("{name}: {text:?}")),
        Some(other) => bail!("{name} must be a number, got {other}"),
    }
}

fn string(body: &Map<String, Value>, name: &str) -> Result<String> {
    match body.get(name) {
        None => Ok(String::new()),
        Some(Value::String(text)) => Ok(text.clone()),
        Some(other) => bail!("{name} must be a string, got {other}"),
    }
}

fn boolean(body: &Map<String, Value>, name: &str) -> Result<bool> {
    match body.get(name) {
        None => Ok(false),
        Some(Value::Bool(flag)) => Ok(*flag),
        Some(other) => bail!("{name} must be a boolean, got {other}"),
    }
}
