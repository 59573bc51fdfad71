//! End-to-end tests of the real `confab` binary: each test starts its own server
//! (`confab serve` on port 0 with a fresh data dir) and drives it through real
//! gRPC, WebSocket and CLI clients.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::{
    ClientFrame, ListConversationsRequest, MeRequest, Message, RefreshRequest, SendAck,
    SendMessage, client_frame, server_frame,
};
use confab_tests::accounts::{Bearer, status_code};
use confab_tests::cli::CliUser;
use confab_tests::conn::{Transport, message_of};
use confab_tests::grpc::GrpcTransport;
use confab_tests::ws::{WsTransport, upgrade_status};
use confab_tests::{Account, Conn, Encoding, PASSWORD, Reply, Server, WsAuth, eventually, http};
use prost::Message as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;
use tonic::Code;

mod attacks;
mod auth;
mod channels;
mod cli;
mod groups;
mod grpc_web;
mod history;
mod messaging;
mod presence;
mod robustness;
mod security;
mod tokens;
mod transport;

/// Held by the tests that open hundreds of connections, so that no two of them
/// run at once (one process may hold at most 20,000 open files here).
static BIG_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Collects `n` message events and returns them as (seq, message).
async fn messages<T: Transport>(conn: &mut Conn<T>, n: usize) -> Result<Vec<(u64, Message)>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(conn.next_message().await?);
    }
    Ok(out)
}

/// Returns the next frame that is neither an event nor a sync-complete.
async fn next_non_event<T: Transport>(conn: &mut Conn<T>) -> Result<confab_proto::v1::ServerFrame> {
    loop {
        let frame = conn.next_frame().await?;
        if !matches!(
            frame.kind,
            Some(server_frame::Kind::Synced(_) | server_frame::Kind::Event(_))
        ) {
            return Ok(frame);
        }
    }
}

/// Asserts that `event` is `ack`'s message with `text`, sent by `sender`.
fn assert_is(message: &Message, ack: &SendAck, sender: &Account, text: &str) {
    assert_eq!(message.id, ack.message_id, "message id");
    assert_eq!(message.conversation_id, ack.conversation_id, "conversation");
    assert_eq!(message.sender_id, sender.id(), "sender");
    assert_eq!(message.client_msg_id, ack.client_msg_id, "client_msg_id");
    assert_eq!(message.text, text, "text");
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Signs `token`'s claims again with `secret`, `exp` moved by `exp_offset` seconds from now.
fn resign(token: &str, secret: &str, exp_offset: i64) -> Result<String> {
    let mut claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)?;
    let now = i64::try_from(now_secs())?;
    claims["exp"] = json!(now + exp_offset);
    claims["iat"] = json!(now - 7200);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )?)
}
