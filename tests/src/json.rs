//! The proto3 JSON mapping of the frames, by hand: lowerCamelCase names, 64-bit
//! integers as strings, default values omitted.
//!
//! Parsing is strict where the contract is: a 64-bit integer sent as a JSON
//! number is an error, so that the test catches a server that does so.

use anyhow::{Context, Result, bail};
use confab_proto::v1::{
    ClientFrame, Created, Done, Error as ErrorFrame, Event, MemberLeft, MemberRemoved,
    MembersAdded, Message, MetadataChanged, Notice, Pong, Presence, ReadState, Receipt, Role,
    RoleChanged, SendAck, ServerFrame, SyncComplete, TypingState, Welcome, client_frame, event,
    notice, server_frame,
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
        Some(client_frame::Kind::Delivered(mark)) => {
            let body = json!({
                "conversationId": mark.conversation_id.to_string(),
                "upTo": mark.up_to.to_string(),
            });
            object.insert("delivered".into(), body);
        }
        Some(client_frame::Kind::MarkRead(mark)) => {
            let body = json!({
                "conversationId": mark.conversation_id.to_string(),
                "upTo": mark.up_to.to_string(),
            });
            object.insert("markRead".into(), body);
        }
        Some(client_frame::Kind::OpenChannel(open)) => {
            let body = json!({ "conversationId": open.conversation_id.to_string() });
            object.insert("openChannel".into(), body);
        }
        Some(client_frame::Kind::Heartbeat(_)) => {
            object.insert("heartbeat".into(), json!({}));
        }
        Some(client_frame::Kind::WatchPresence(watch)) => {
            let ids: Vec<String> = watch.user_ids.iter().map(i64::to_string).collect();
            object.insert("watchPresence".into(), json!({ "userIds": ids }));
        }
        Some(client_frame::Kind::Typing(typing)) => {
            let body = json!({
                "conversationId": typing.conversation_id.to_string(),
                "typing": typing.typing,
            });
            object.insert("typing".into(), body);
        }
        Some(client_frame::Kind::CloseChannel(close)) => {
            let body = json!({ "conversationId": close.conversation_id.to_string() });
            object.insert("closeChannel".into(), body);
        }
        Some(client_frame::Kind::Reauthenticate(reauthenticate)) => {
            let body = json!({ "token": reauthenticate.token });
            object.insert("reauthenticate".into(), body);
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
    let kinds = [
        "welcome", "sent", "event", "synced", "error", "pong", "done",
    ];
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
        "done" => server_frame::Kind::Done(Done {}),
        _ => server_frame::Kind::Pong(Pong {
            nonce: uint64(body, "nonce")?,
        }),
    };
    Ok(ServerFrame {
        r#ref: uint64(object, "ref")?,
        kind: Some(kind),
    })
}

/// Reads an event: a message, a receipt, a read state or a channel post.
fn event_of(body: &Map<String, Value>) -> Result<Event> {
    let kinds = [
        "message",
        "receipt",
        "readState",
        "channelPost",
        "presence",
        "typing",
    ];
    let present: Vec<&str> = kinds
        .into_iter()
        .filter(|kind| body.contains_key(*kind))
        .collect();
    let kind = match present.as_slice() {
        [] => None,
        [kind] => {
            let inner = object(body, kind)?;
            Some(match *kind {
                "message" => event::Kind::Message(message_of(inner)?),
                "channelPost" => event::Kind::ChannelPost(message_of(inner)?),
                "receipt" => event::Kind::Receipt(Receipt {
                    conversation_id: int64(inner, "conversationId")?,
                    user_id: int64(inner, "userId")?,
                    delivered_up_to: int64(inner, "deliveredUpTo")?,
                    read_up_to: int64(inner, "readUpTo")?,
                }),
                "presence" => event::Kind::Presence(Presence {
                    user_id: int64(inner, "userId")?,
                    online: boolean(inner, "online")?,
                    last_seen_ms: int64(inner, "lastSeenMs")?,
                }),
                "typing" => event::Kind::Typing(TypingState {
                    conversation_id: int64(inner, "conversationId")?,
                    user_id: int64(inner, "userId")?,
                    typing: boolean(inner, "typing")?,
                }),
                _ => event::Kind::ReadState(ReadState {
                    conversation_id: int64(inner, "conversationId")?,
                    read_up_to: int64(inner, "readUpTo")?,
                    unread_count: uint32(inner, "unreadCount")?,
                }),
            })
        }
        more => bail!("an event has one kind, got {more:?}"),
    };
    Ok(Event {
        seq: uint64(body, "seq")?,
        kind,
    })
}

/// Reads a message, text or notice.
fn message_of(body: &Map<String, Value>) -> Result<Message> {
    let notice = match body.get("notice") {
        None => None,
        Some(Value::Object(notice)) => Some(notice_of(notice)?),
        Some(other) => bail!("notice is not an object: {other}"),
    };
    Ok(Message {
        id: int64(body, "id")?,
        conversation_id: int64(body, "conversationId")?,
        sender_id: int64(body, "senderId")?,
        sender_device: string(body, "senderDevice")?,
        client_msg_id: string(body, "clientMsgId")?,
        sent_at_ms: int64(body, "sentAtMs")?,
        text: string(body, "text")?,
        notice,
    })
}

fn notice_of(body: &Map<String, Value>) -> Result<Notice> {
    let kinds = [
        "created",
        "membersAdded",
        "memberRemoved",
        "memberLeft",
        "metadataChanged",
        "roleChanged",
    ];
    let present: Vec<&str> = kinds
        .into_iter()
        .filter(|kind| body.contains_key(*kind))
        .collect();
    let [kind] = present.as_slice() else {
        bail!("a notice has exactly one of {kinds:?}, got {present:?}");
    };
    let inner = object(body, kind)?;
    let kind = match *kind {
        "created" => notice::Kind::Created(Created {}),
        "membersAdded" => notice::Kind::MembersAdded(MembersAdded {
            user_ids: int64_list(inner, "userIds")?,
        }),
        "memberRemoved" => notice::Kind::MemberRemoved(MemberRemoved {
            user_id: int64(inner, "userId")?,
        }),
        "memberLeft" => notice::Kind::MemberLeft(MemberLeft {}),
        "metadataChanged" => notice::Kind::MetadataChanged(MetadataChanged {
            name: string(inner, "name")?,
            topic: string(inner, "topic")?,
            avatar_url: string(inner, "avatarUrl")?,
        }),
        _ => notice::Kind::RoleChanged(RoleChanged {
            user_id: int64(inner, "userId")?,
            role: role(inner, "role")?,
        }),
    };
    Ok(Notice {
        actor_id: int64(body, "actorId")?,
        kind: Some(kind),
    })
}

fn object<'a>(body: &'a Map<String, Value>, name: &str) -> Result<&'a Map<String, Value>> {
    body.get(name)
        .and_then(Value::as_object)
        .with_context(|| format!("{name} is not an object"))
}

fn int64_list(body: &Map<String, Value>, name: &str) -> Result<Vec<i64>> {
    match body.get(name) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(text) => text.parse().with_context(|| format!("{name}: {text:?}")),
                other => bail!("{name} items must be strings (64-bit integers), got {other}"),
            })
            .collect(),
        Some(other) => bail!("{name} must be an array, got {other}"),
    }
}

/// An enum: its name (or, as parsers must accept, its number).
fn role(body: &Map<String, Value>, name: &str) -> Result<i32> {
    match body.get(name) {
        None => Ok(0),
        Some(Value::String(text)) => Role::from_str_name(text)
            .map(i32::from)
            .with_context(|| format!("{name}: unknown role {text:?}")),
        Some(Value::Number(_)) => int32(body, name),
        Some(other) => bail!("{name} must be an enum name, got {other}"),
    }
}

fn uint32(body: &Map<String, Value>, name: &str) -> Result<u32> {
    Ok(u32::try_from(int32(body, name)?)?)
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
