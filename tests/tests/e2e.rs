//! End-to-end tests of the real `confab` binary: each test starts its own server
//! (`confab serve` on port 0 with a fresh data dir) and drives it through real
//! gRPC, WebSocket and CLI clients.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use confab_proto::v1::accounts_client::AccountsClient;
use confab_proto::v1::{
    ClientFrame, ListConversationsRequest, Message, MeRequest, RefreshRequest, SendAck, SendMessage,
    client_frame, server_frame,
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

/// Collects `n` message events and returns them as (seq, message).
async fn messages<T: Transport>(conn: &mut Conn<T>, n: usize) -> Result<Vec<(u64, Message)>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(conn.next_message().await?);
    }
    Ok(out)
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
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// Registering, logging in and refreshing give working tokens; a wrong password is refused.
#[tokio::test]
async fn register_login_refresh() -> Result<()> {
    let server = Server::start().await?;
    let registered = server.register("alice").await?;
    assert_eq!(registered.user.username, "alice");
    assert!(!registered.access_token.is_empty() && !registered.refresh_token.is_empty());

    let logged_in = server.login("alice", PASSWORD).await?;
    assert_eq!(logged_in.id(), registered.id(), "login returns the registered user");

    let channel = server.channel().await?;
    let mut me = AccountsClient::with_interceptor(channel.clone(), Bearer(Some(logged_in.access_token.clone())));
    let user = me.me(MeRequest {}).await?.into_inner();
    assert_eq!((user.id, user.username.as_str()), (registered.id(), "alice"));

    let mut accounts = server.accounts().await?;
    let refresh = RefreshRequest {
        refresh_token: logged_in.refresh_token.clone(),
    };
    let refreshed = accounts.refresh(refresh).await?.into_inner();
    assert_eq!(refreshed.user.as_ref().map(|user| user.id), Some(registered.id()));
    let now_ms = i64::try_from(now_secs() * 1000)?;
    assert!(refreshed.access_expires_at_ms > now_ms, "a fresh token expires in the future");
    let mut me = AccountsClient::with_interceptor(channel.clone(), Bearer(Some(refreshed.access_token)));
    assert_eq!(me.me(MeRequest {}).await?.into_inner().id, registered.id());

    let wrong = server.login("alice", "not the password").await.expect_err("wrong password accepted");
    assert_eq!(status_code(&wrong), Some(Code::Unauthenticated), "wrong password: {wrong:#}");
    let unknown = server.login("nobody", PASSWORD).await.expect_err("unknown user accepted");
    assert_eq!(status_code(&unknown), Some(Code::Unauthenticated), "unknown user: {unknown:#}");
    let again = server.register("alice").await.expect_err("duplicate username accepted");
    assert!(status_code(&again).is_some(), "duplicate username: {again:#}");
    Ok(())
}

/// A WebSocket user and a gRPC user talk both ways live, and every device of the
/// sender, the sending one included, gets the message as an event.
#[tokio::test]
async fn websocket_and_grpc_users_talk() -> Result<()> {
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    assert_eq!(server.open_direct(&bob, &alice).await?, conversation, "one direct conversation per pair");

    let (mut alice_phone, synced) = server.ws_synced(&alice, Encoding::Binary, "alice-phone", 0).await?;
    assert_eq!(synced.welcome.user_id, alice.id());
    assert_eq!(synced.welcome.device_id, "alice-phone");
    assert!(synced.events.is_empty() && synced.seq == 0, "{synced:?}");
    let (mut alice_laptop, _) = server.grpc_synced(&alice, "alice-laptop", 0).await?;
    let (mut bob_phone, _) = server.grpc_synced(&bob, "bob-phone", 0).await?;

    let ack = alice_phone.send(conversation, "a-1", "hi bob").await?;
    assert!(!ack.duplicate);
    assert_eq!((ack.conversation_id, ack.client_msg_id.as_str()), (conversation, "a-1"));
    for device in [&mut bob_phone.next_message().await?, &mut alice_laptop.next_message().await?, &mut alice_phone.next_message().await?] {
        assert_eq!(device.0, 1, "first event of each user");
        assert_is(&device.1, &ack, &alice, "hi bob");
        assert_eq!(device.1.sender_device, "alice-phone");
    }

    let ack = bob_phone.send(conversation, "b-1", "hi alice").await?;
    for device in [&mut alice_phone.next_message().await?, &mut alice_laptop.next_message().await?, &mut bob_phone.next_message().await?] {
        assert_eq!(device.0, 2, "second event of each user");
        assert_is(&device.1, &ack, &bob, "hi alice");
    }
    Ok(())
}

/// Proto3 JSON text frames work end to end, with the token in the query or in the Hello.
#[tokio::test]
async fn websocket_json_text_frames() -> Result<()> {
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;

    let mut alice_ws = Conn::new(WsTransport::connect(&server, WsAuth::Query(&alice.access_token), Encoding::Json).await?);
    let synced = alice_ws.sync("alice-json", 0).await?;
    assert_eq!(synced.welcome.user_id, alice.id());
    let mut bob_ws = Conn::new(WsTransport::connect(&server, WsAuth::None, Encoding::Json).await?);
    bob_ws.send_hello(&bob.access_token, "bob-json", 0).await?;
    assert_eq!(bob_ws.expect_welcome().await?.user_id, bob.id());
    bob_ws.read_catch_up().await?;

    let text = "héllo \"bob\" 👋 \\ {json}";
    let ack = alice_ws.send(conversation, "json-1", text).await?;
    assert!(ack.message_id > 0 && ack.sent_at_ms > 0, "{ack:?}");
    let (seq, message) = bob_ws.next_message().await?;
    assert_eq!(seq, 1);
    assert_is(&message, &ack, &alice, text);
    assert_is(&alice_ws.next_message().await?.1, &ack, &alice, text);

    let ack = bob_ws.send(conversation, "json-2", "back at you").await?;
    assert_is(&alice_ws.next_message().await?.1, &ack, &bob, "back at you");
    alice_ws.ping(42).await?;
    Ok(())
}

/// A retried send (same client_msg_id, also after a reconnect and over unary)
/// returns the original id with `duplicate: true`, stores one copy and emits one event.
#[tokio::test]
async fn retried_send_is_deduplicated() -> Result<()> {
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;

    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let first = alice_conn.send(conversation, "retry-me", "once").await?;
    assert!(!first.duplicate);
    let again = alice_conn.send(conversation, "retry-me", "once").await?;
    assert_eq!((again.message_id, again.duplicate), (first.message_id, true), "same connection");
    drop(alice_conn);

    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 1).await?;
    let after_reconnect = alice_conn.send(conversation, "retry-me", "once").await?;
    assert_eq!((after_reconnect.message_id, after_reconnect.duplicate), (first.message_id, true), "after reconnect");
    let request = SendMessage {
        conversation_id: conversation,
        client_msg_id: "retry-me".into(),
        text: "once".into(),
    };
    let unary = server.conversations(&alice).await?.send(request).await?.into_inner();
    assert_eq!((unary.message_id, unary.duplicate), (first.message_id, true), "unary retry");

    let marker = alice_conn.send(conversation, "marker", "after the retries").await?;
    let received = messages(&mut bob_conn, 2).await?;
    assert_eq!(received[0].1.id, first.message_id);
    assert_eq!(received[1].1.id, marker.message_id, "no second copy before the marker");
    assert_eq!((received[0].0, received[1].0), (1, 2));

    let (_, alice_sync) = server.grpc_synced(&alice, "alice-2", 0).await?;
    let ids: Vec<i64> = alice_sync.events.into_iter().map(|e| message_of(e).map(|m| m.1.id)).collect::<Result<_>>()?;
    assert_eq!(ids, [first.message_id, marker.message_id], "the sender's own sequence has one copy");
    let history = server.history(&alice, conversation, 0, 0, 0).await?;
    let ids: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [marker.message_id, first.message_id], "history has one copy, newest first");
    Ok(())
}

/// History pages newest first via `before`, bounds with `after`, and `has_more` is right.
#[tokio::test]
async fn history_pagination() -> Result<()> {
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let mut alice_client = server.conversations(&alice).await?;
    let mut bob_client = server.conversations(&bob).await?;
    let mut sent = Vec::new();
    for n in 0..120 {
        let request = SendMessage {
            conversation_id: conversation,
            client_msg_id: format!("m-{n}"),
            text: format!("message {n}"),
        };
        let client = if n % 3 == 0 { &mut bob_client } else { &mut alice_client };
        sent.push(client.send(request).await?.into_inner().message_id);
    }
    assert!(sent.windows(2).all(|w| w[0] < w[1]), "ids increase in send order");

    let page1 = server.history(&alice, conversation, 0, 0, 50).await?;
    let page2 = server.history(&alice, conversation, page1.messages[49].id, 0, 50).await?;
    let page3 = server.history(&bob, conversation, page2.messages[49].id, 0, 50).await?;
    let newest_first: Vec<i64> = sent.iter().rev().copied().collect();
    let ids = |page: &confab_proto::v1::HistoryResponse| page.messages.iter().map(|m| m.id).collect::<Vec<_>>();
    assert_eq!(ids(&page1), newest_first[..50]);
    assert!(page1.has_more);
    assert_eq!(ids(&page2), newest_first[50..100]);
    assert!(page2.has_more);
    assert_eq!(ids(&page3), newest_first[100..]);
    assert!(!page3.has_more, "the oldest page has no more");
    assert_eq!(page1.messages[0].text, "message 119");

    // `after` bounds from below: the 50 messages after the 70th, and nothing older in range.
    let above = server.history(&alice, conversation, 0, sent[69], 50).await?;
    assert_eq!(ids(&above), newest_first[..50]);
    assert!(!above.has_more, "nothing older than the last one within `after`");
    let tail = server.history(&alice, conversation, 0, sent[99], 50).await?;
    assert_eq!(ids(&tail), newest_first[..20]);
    assert!(!tail.has_more);
    // Both bounds: messages 11..=20 (ids strictly between the 10th and the 21st).
    let window = server.history(&alice, conversation, sent[20], sent[9], 50).await?;
    let expected: Vec<i64> = sent[10..20].iter().rev().copied().collect();
    assert_eq!(ids(&window), expected);
    assert!(!window.has_more);
    let default_limit = server.history(&alice, conversation, 0, 0, 0).await?;
    assert_eq!(default_limit.messages.len(), 50, "limit 0 means 50");
    Ok(())
}

/// Reads events on one connection from `cursor` until `max` events or `total` overall.
async fn receive_some<T: Transport>(
    conn: &mut Conn<T>,
    device_id: &str,
    cursor: u64,
    max: usize,
    total: usize,
    received: &mut Vec<(u64, Message)>,
) -> Result<()> {
    conn.hello(device_id, cursor).await?;
    let mut taken = 0;
    while taken < max && received.len() < total {
        match conn.next_frame().await?.kind {
            Some(server_frame::Kind::Event(event)) => {
                received.push(message_of(event)?);
                taken += 1;
            }
            Some(server_frame::Kind::Synced(_)) => {}
            other => anyhow::bail!("unexpected frame {other:?}"),
        }
    }
    Ok(())
}

/// A device reconnecting with its cursor while messages keep coming ends with
/// every message exactly once, seqs gap-free, in id order per conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_with_cursor_under_load() -> Result<()> {
    const PER_SENDER: usize = 150;
    const PER_CONNECTION: usize = 37;
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let carol = server.register("carol").await?;
    let bob = server.register("bob").await?;
    let mut senders = Vec::new();
    for sender in [alice, carol] {
        let conversation = server.open_direct(&sender, &bob).await?;
        let (mut conn, _) = server.grpc_synced(&sender, "sender", 0).await?;
        senders.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for n in 0..PER_SENDER {
                acks.push(conn.send(conversation, &format!("c-{n}"), &format!("{n}")).await?);
            }
            anyhow::Ok(acks)
        }));
    }

    let total = 2 * PER_SENDER;
    let mut received: Vec<(u64, Message)> = Vec::new();
    let mut round = 0;
    while received.len() < total {
        let cursor = received.last().map_or(0, |(seq, _)| *seq);
        // Alternate the transports: the cursor belongs to the user, not the transport.
        if round % 2 == 0 {
            let mut conn = server.ws(&bob, Encoding::Binary).await?;
            receive_some(&mut conn, "bob-device", cursor, PER_CONNECTION, total, &mut received).await?;
        } else {
            let mut conn = server.grpc(&bob).await?;
            receive_some(&mut conn, "bob-device", cursor, PER_CONNECTION, total, &mut received).await?;
        }
        round += 1;
    }
    let mut acked: Vec<Vec<SendAck>> = Vec::new();
    for sender in senders {
        acked.push(sender.await??);
    }
    assert!(round > 3, "reconnected {round} times");

    let seqs: Vec<u64> = received.iter().map(|(seq, _)| *seq).collect();
    let expected: Vec<u64> = (1..=total as u64).collect();
    assert_eq!(seqs, expected, "seqs are 1..=n: gap-free, no duplicates");
    let mut per_conversation: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for (_, message) in &received {
        per_conversation.entry(message.conversation_id).or_default().push(message.id);
    }
    for acks in acked {
        let conversation = acks[0].conversation_id;
        let sent: Vec<i64> = acks.iter().map(|ack| ack.message_id).collect();
        assert_eq!(per_conversation.get(&conversation), Some(&sent), "every message once, in id order");
    }
    Ok(())
}

/// Signs `token`'s claims again with `secret`, `exp` moved by `exp_offset` seconds from now.
fn resign(token: &str, secret: &str, exp_offset: i64) -> Result<String> {
    let mut claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)?;
    let now = i64::try_from(now_secs())?;
    claims["exp"] = json!(now + exp_offset);
    claims["iat"] = json!(now - 7200);
    let key = jsonwebtoken::EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256), &claims, &key)?)
}

/// A stream or unary call without, with a garbage, a foreign, an expired or a
/// refresh token is UNAUTHENTICATED; a WebSocket upgrade with a bad token gets
/// 401 and a bad token in the Hello gets a fatal error frame.
#[tokio::test]
async fn unauthenticated_is_refused() -> Result<()> {
    const SECRET: &str = "e2e-test-secret-e2e-test-secret-0123456789";
    let server = Server::start_with(&["--jwt-secret", SECRET]).await?;
    let alice = server.register("alice").await?;

    let control = resign(&alice.access_token, SECRET, 600)?;
    let mut list = server.conversations_with(Some(&control)).await?;
    list.list(ListConversationsRequest {}).await.context("a re-signed valid token must work")?;

    let expired = resign(&alice.access_token, SECRET, -3600)?;
    let foreign = resign(&alice.access_token, "some other secret entirely, 0123456789", 600)?;
    let bad_tokens: [(&str, Option<&str>); 5] = [
        ("none", None),
        ("garbage", Some("not-a-jwt")),
        ("foreign", Some(&foreign)),
        ("expired", Some(&expired)),
        ("refresh", Some(&alice.refresh_token)),
    ];
    for (what, token) in bad_tokens {
        let mut client = server.conversations_with(token).await?;
        let status = client.list(ListConversationsRequest {}).await.expect_err(what);
        assert_eq!(status.code(), Code::Unauthenticated, "unary with {what} token: {status:?}");

        let mut conn = Conn::new(GrpcTransport::open(&server, token).await?);
        conn.send_hello("", "d", 0).await?;
        let (frames, closed) = conn.expect_closed().await?;
        assert!(frames.is_empty(), "stream with {what} token got frames {frames:?}");
        assert_eq!(closed.grpc_code, Some(Code::Unauthenticated), "stream with {what} token: {closed:?}");

        let Some(token) = token else { continue };
        assert_eq!(upgrade_status(&server, WsAuth::Header(token)).await?, 401, "ws header with {what} token");
        assert_eq!(upgrade_status(&server, WsAuth::Query(token)).await?, 401, "ws query with {what} token");

        let mut ws = Conn::new(WsTransport::connect(&server, WsAuth::None, Encoding::Binary).await?);
        ws.send_hello(token, "d", 0).await?;
        let (frames, closed) = ws.expect_closed().await?;
        let [frame] = frames.as_slice() else {
            panic!("ws hello with {what} token: expected one error frame, got {frames:?}");
        };
        let Some(server_frame::Kind::Error(error)) = &frame.kind else {
            panic!("ws hello with {what} token: expected an error frame, got {frame:?}");
        };
        assert_eq!((error.code, error.fatal), (16, true), "ws hello with {what} token: {error:?}");
        assert_eq!(error.reason, "unauthenticated");
        assert!(closed.grpc_code.is_none(), "{closed:?}");
    }
    Ok(())
}

/// A third user can neither send to, nor read, nor stream into the others'
/// conversation: not_found / NOT_FOUND, the same as an unknown id, and nothing is stored.
#[tokio::test]
async fn non_member_is_refused() -> Result<()> {
    const UNKNOWN: i64 = 4_242_424_242;
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let ack = server
        .conversations(&alice)
        .await?
        .send(SendMessage {
            conversation_id: conversation,
            client_msg_id: "a".into(),
            text: "for bob only".into(),
        })
        .await?
        .into_inner();

    let mut carol_client = server.conversations(&carol).await?;
    for target in [conversation, UNKNOWN] {
        let request = SendMessage {
            conversation_id: target,
            client_msg_id: format!("intrude-{target}"),
            text: "let me in".into(),
        };
        let status = carol_client.send(request).await.expect_err("non-member send accepted");
        assert_eq!(status.code(), Code::NotFound, "unary send to {target}: {status:?}");
        let error = server.history(&carol, target, 0, 0, 0).await.expect_err("non-member history");
        assert_eq!(status_code(&error), Some(Code::NotFound), "history of {target}: {error:#}");
    }

    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol-1", 0).await?;
    for target in [conversation, UNKNOWN] {
        let Reply::Error(error) = carol_conn.send_reply(target, &format!("s-{target}"), "let me in").await? else {
            panic!("stream send by a non-member to {target} was accepted");
        };
        assert_eq!((error.code, error.reason.as_str(), error.fatal), (5, "not_found", false), "{error:?}");
    }
    carol_conn.ping(7).await.context("the connection survives a refused send")?;

    let history = server.history(&alice, conversation, 0, 0, 0).await?;
    let ids: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [ack.message_id], "nothing stored");
    let (_, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    assert_eq!(bob_sync.events.len(), 1, "bob got nothing from carol: {bob_sync:?}");
    let (_, carol_sync) = server.grpc_synced(&carol, "carol-2", 0).await?;
    assert!(carol_sync.events.is_empty(), "carol's sequence is empty: {carol_sync:?}");
    let listed = carol_client.list(ListConversationsRequest {}).await?.into_inner();
    assert!(listed.conversations.is_empty(), "{listed:?}");
    Ok(())
}

/// A text over the limit gets a non-fatal too_large; a frame over the frame limit
/// closes that connection (WS 1009) while the server keeps serving; a malformed
/// frame gets a non-fatal "malformed" error.
#[tokio::test]
async fn oversized_and_malformed_input() -> Result<()> {
    const MAX_TEXT: usize = 16_384;
    const MAX_FRAME: usize = 65_536;
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut alice_ws, _) = server.ws_synced(&alice, Encoding::Binary, "alice-ws", 0).await?;

    let at_limit = "x".repeat(MAX_TEXT);
    alice_ws.send(conversation, "at-limit", &at_limit).await.context("a text of exactly the limit is accepted")?;
    let over = "x".repeat(MAX_TEXT + 1);
    let Reply::Error(error) = alice_ws.send_reply(conversation, "over", &over).await? else {
        panic!("a text over the limit was accepted");
    };
    assert_eq!((error.code, error.reason.as_str(), error.fatal), (8, "too_large", false), "{error:?}");
    alice_ws.send(conversation, "after-too-large", "still here").await?;

    let malformed = tungstenite::Message::Binary(vec![0xff, 0xff, 0xff, 0xff].into());
    alice_ws.transport_mut().send_raw(malformed).await?;
    let frame = alice_ws.next_frame().await?;
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("expected a malformed error, got {frame:?}");
    };
    assert_eq!((error.reason.as_str(), error.fatal), ("malformed", false), "{error:?}");
    alice_ws.send(conversation, "after-malformed", "still here").await?;

    let mut json_ws = server.ws(&alice, Encoding::Json).await?;
    json_ws.hello("alice-json", u64::MAX / 2).await?;
    json_ws.transport_mut().send_raw(tungstenite::Message::Text("{not json".into())).await?;
    let frame = loop {
        let frame = json_ws.next_frame().await?;
        if !matches!(frame.kind, Some(server_frame::Kind::Synced(_) | server_frame::Kind::Event(_))) {
            break frame;
        }
    };
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("expected a malformed error for bad JSON, got {frame:?}");
    };
    assert_eq!((error.reason.as_str(), error.fatal), ("malformed", false), "{error:?}");
    json_ws.ping(3).await.context("the JSON connection survives malformed input")?;

    let huge = ClientFrame {
        r#ref: 99,
        kind: Some(client_frame::Kind::Send(SendMessage {
            conversation_id: conversation,
            client_msg_id: "huge".into(),
            text: "y".repeat(MAX_FRAME + 1000),
        })),
    };
    alice_ws.transport_mut().send_raw(tungstenite::Message::Binary(huge.encode_to_vec().into())).await?;
    let (_, closed) = alice_ws.expect_closed().await?;
    assert_eq!(closed.ws_close_code, Some(1009), "oversized ws frame: {closed:?}");

    let (mut alice_grpc, _) = server.grpc_synced(&alice, "alice-grpc", 0).await?;
    let Reply::Error(error) = alice_grpc.send_reply(conversation, "over-grpc", &over).await? else {
        panic!("a text over the limit was accepted over gRPC");
    };
    assert_eq!((error.reason.as_str(), error.fatal), ("too_large", false), "{error:?}");
    alice_grpc.send_message(conversation, "huge-grpc", &"y".repeat(MAX_FRAME + 1000)).await?;
    let (_, closed) = alice_grpc.expect_closed().await?;
    assert!(
        matches!(closed.grpc_code, Some(code) if code != Code::Ok),
        "oversized gRPC frame must end the stream with an error: {closed:?}"
    );

    // The server still serves everyone else, and stored nothing oversized.
    let (mut bob_conn, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    let texts: Vec<String> = bob_sync.events.into_iter().map(|e| message_of(e).map(|m| m.1.text)).collect::<Result<_>>()?;
    assert_eq!(texts, [at_limit.as_str(), "still here", "still here"]);
    bob_conn.send(conversation, "b-1", "all good").await?;
    Ok(())
}

/// A message acknowledged just before a SIGKILL is in history and in the
/// recipient's sync after a restart on the same data dir.
#[tokio::test]
async fn acknowledged_messages_survive_kill9() -> Result<()> {
    const PIPELINED: usize = 20;
    let mut server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let mut refs = Vec::new();
    for n in 0..PIPELINED {
        refs.push(alice_conn.send_message(conversation, &format!("p-{n}"), &format!("pipelined {n}")).await?);
    }
    let mut acked = Vec::new();
    for r in refs {
        let Reply::Sent(ack) = alice_conn.reply_to(r).await? else {
            panic!("pipelined send {r} refused");
        };
        acked.push(ack.message_id);
    }
    let last = alice_conn.send(conversation, "last", "the last words").await?;
    acked.push(last.message_id);
    server.kill9().await?;
    drop(alice_conn);

    server.restart().await?;
    let history = server.history(&bob, conversation, 0, 0, 200).await?;
    let mut stored: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    stored.reverse();
    assert_eq!(stored, acked, "every acknowledged message is in history, in order");
    let (_, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    let synced: Vec<(u64, i64)> = bob_sync.events.into_iter().map(|e| message_of(e).map(|(s, m)| (s, m.id))).collect::<Result<_>>()?;
    let expected: Vec<(u64, i64)> = (1..).zip(acked.iter().copied()).collect();
    assert_eq!(synced, expected, "the recipient's sequence has every message");
    Ok(())
}

/// After a delivery, /metrics shows the connection gauge, the accepted counter and
/// the delivery latency histogram; /healthz is 200 and gRPC health is SERVING.
#[tokio::test]
async fn metrics_and_health() -> Result<()> {
    let server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let ack = alice_conn.send(conversation, "m", "measured").await?;
    assert_eq!(bob_conn.next_message().await?.1.id, ack.message_id);

    let addr = server.addr();
    let shown = eventually("/metrics shows the delivery", || async move {
        let metrics = http::get(addr, "/metrics").await?;
        ensure!(metrics.status == 200, "status {}", metrics.status);
        let body = metrics.body;
        let has_type = |name: &str, kind: &str| body.contains(&format!("# TYPE {name} {kind}"));
        Ok(has_type("confab_gateway_connections", "gauge")
            && has_type("confab_messages_accepted_total", "counter")
            && has_type("confab_delivery_latency_seconds", "histogram")
            && body.contains("confab_delivery_latency_seconds_count"))
    })
    .await;
    if let Err(error) = shown {
        let body = http::get(addr, "/metrics").await.map(|r| r.body).unwrap_or_default();
        let ours: Vec<&str> = body.lines().filter(|l| l.contains("confab_")).collect();
        panic!("{error:#}; confab_ lines of /metrics: {ours:#?}");
    }

    let healthz = http::get(addr, "/healthz").await?;
    assert_eq!(healthz.status, 200, "/healthz: {healthz:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await?);
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    let status = health.check(request).await?.into_inner().status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    Ok(())
}

/// Two `confab client chat` processes exchange messages; one quits, and what was
/// sent meanwhile shows when it chats again; `history` and `conversations` print it.
#[tokio::test]
async fn cli_chat_history_and_catch_up() -> Result<()> {
    let server = Server::start().await?;
    let dirs = (tempfile::tempdir()?, tempfile::tempdir()?);
    let alice = CliUser::new(&server, dirs.0.path());
    let bob = CliUser::new(&server, dirs.1.path());
    alice.run_ok(&["register", "alice", "--password", "pw-alice"]).await?;
    let finished = bob.run(&["register", "bob"], "pw-bob\n").await?;
    assert!(finished.status.success(), "password from stdin: {finished:?}");

    let mut bob_chat = bob.chat("alice")?;
    let mut alice_chat = alice.chat("bob")?;
    alice_chat.say("hello bob").await?;
    alice_chat.expect_line("✓").await?;
    bob_chat.expect_line("alice: hello bob").await?;
    bob_chat.say("hi alice").await?;
    alice_chat.expect_line("bob: hi alice").await?;
    bob_chat.expect_line("✓").await?;
    bob_chat.quit().await?;

    alice_chat.say("are you there?").await?;
    alice_chat.expect_line("✓").await?;
    alice_chat.say("second").await?;
    alice_chat.expect_line("✓").await?;
    alice_chat.quit().await?;

    let mut bob_chat = bob.chat("alice")?;
    bob_chat.expect_line("alice: are you there?").await?;
    bob_chat.expect_line("alice: second").await?;
    let seen = bob_chat.seen().join("\n");
    assert!(!seen.contains("hello bob"), "the saved cursor skips what was shown: {seen}");
    assert!(seen.contains(" alice: are you there?") && seen.contains("] "), "format [HH:MM:SS] name: text: {seen}");
    bob_chat.say("back").await?;
    bob_chat.expect_line("✓").await?;
    bob_chat.quit().await?;

    let history = bob.run_ok(&["history", "alice"]).await?;
    let order = ["alice: hello bob", "bob: hi alice", "alice: are you there?", "alice: second", "bob: back"];
    let positions: Vec<Option<usize>> = order.iter().map(|text| history.find(text)).collect();
    assert!(positions.iter().all(Option::is_some), "history lacks messages: {history}");
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "history oldest to newest: {history}");
    let page = bob.run_ok(&["history", "alice", "--limit", "2"]).await?;
    assert!(page.contains("bob: back") && !page.contains("hello bob"), "{page}");

    let listed = alice.run_ok(&["conversations"]).await?;
    assert!(listed.contains("bob") && listed.contains("back"), "conversations: {listed}");

    let refused = alice.run(&["login", "alice", "--password", "wrong"], "").await?;
    assert!(!refused.status.success(), "wrong password accepted: {refused:?}");
    assert_eq!(refused.stderr.trim().lines().count(), 1, "one clear line: {:?}", refused.stderr);
    Ok(())
}
