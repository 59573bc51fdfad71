//! Live messaging over gRPC and WebSocket: delivery, dedup, reconnects, membership.

use anyhow::bail;
use confab_proto::v1::{Hello, ServerFrame};
use confab_tests::raw::{RawClient, ws_client_binary, ws_server_frames, ws_upgrade_request};

use super::*;

/// A WebSocket user and a gRPC user talk both ways live, and every device of the
/// sender, the sending one included, gets the message as an event.
#[tokio::test]
async fn websocket_and_grpc_users_talk() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    assert_eq!(
        server.open_direct(&bob, &alice).await?,
        conversation,
        "one direct conversation per pair"
    );

    let (mut alice_phone, synced) = server
        .ws_synced(&alice, Encoding::Binary, "alice-phone", 0)
        .await?;
    assert_eq!(synced.welcome.user_id, alice.id());
    assert_eq!(synced.welcome.device_id, "alice-phone");
    assert!(synced.events.is_empty() && synced.seq == 0, "{synced:?}");
    let (mut alice_laptop, _) = server.grpc_synced(&alice, "alice-laptop", 0).await?;
    let (mut bob_phone, _) = server.grpc_synced(&bob, "bob-phone", 0).await?;

    let ack = alice_phone.send(conversation, "a-1", "hi bob").await?;
    assert!(!ack.duplicate);
    assert_eq!(
        (ack.conversation_id, ack.client_msg_id.as_str()),
        (conversation, "a-1")
    );
    for device in [
        &mut bob_phone.next_message().await?,
        &mut alice_laptop.next_message().await?,
        &mut alice_phone.next_message().await?,
    ] {
        assert_eq!(device.0, 1, "first event of each user");
        assert_is(&device.1, &ack, &alice, "hi bob");
        assert_eq!(device.1.sender_device, "alice-phone");
    }

    let ack = bob_phone.send(conversation, "b-1", "hi alice").await?;
    for device in [
        &mut alice_phone.next_message().await?,
        &mut alice_laptop.next_message().await?,
        &mut bob_phone.next_message().await?,
    ] {
        assert_eq!(device.0, 2, "second event of each user");
        assert_is(&device.1, &ack, &bob, "hi alice");
    }
    Ok(())
}

/// Proto3 JSON text frames work end to end, with the token in the query or in the Hello.
#[tokio::test]
async fn websocket_json_text_frames() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;

    let mut alice_ws = Conn::new(
        WsTransport::connect(&server, WsAuth::Query(&alice.access_token), Encoding::Json).await?,
    );
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

/// Frames that are ready together leave in one write: a reconnecting device's
/// welcome, its catch-up and the synced frame reach the socket at once, not a
/// write (a TCP segment, a wake-up of the client) each.
#[tokio::test]
async fn catch_up_leaves_in_one_write() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut alice_phone, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-phone", 0)
        .await?;
    for i in 0..20 {
        alice_phone
            .send(conversation, &format!("a-{i}"), "hi")
            .await?;
    }

    let mut bob_phone = RawClient::connect(server.addr()).await?;
    let token = format!("Authorization: Bearer {}\r\n", bob.access_token);
    let upgrade = ws_upgrade_request(server.addr(), &token, true);
    bob_phone.send(upgrade.as_bytes()).await?;
    let head = bob_phone.read_head().await?;
    ensure!(head.starts_with("HTTP/1.1 101"), "not upgraded: {head}");
    let hello = ClientFrame {
        r#ref: 1,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "bob-phone".into(),
            cursor: 0,
        })),
    };
    bob_phone
        .send(&ws_client_binary(&hello.encode_to_vec()))
        .await?;

    let frames = ws_server_frames(&bob_phone.read_once().await?)?
        .into_iter()
        .map(|payload| ServerFrame::decode(payload.as_slice()))
        .collect::<Result<Vec<_>, _>>()?;
    let kinds: Vec<_> = frames.into_iter().filter_map(|frame| frame.kind).collect();
    let Some((server_frame::Kind::Welcome(_), rest)) = kinds.split_first() else {
        bail!("the first frame is not the welcome: {kinds:?}");
    };
    let Some((server_frame::Kind::Synced(synced), events)) = rest.split_last() else {
        bail!("the read ends before the synced frame: {kinds:?}");
    };
    assert!(synced.seq >= 20, "{synced:?}");
    assert_eq!(events.len(), usize::try_from(synced.seq)?, "{kinds:?}");
    assert!(
        events
            .iter()
            .all(|kind| matches!(kind, server_frame::Kind::Event(_))),
        "{kinds:?}"
    );
    Ok(())
}

/// A retried send (same client_msg_id, also after a reconnect and over unary)
/// returns the original id with `duplicate: true`, stores one copy and emits one event.
#[tokio::test]
async fn retried_send_is_deduplicated() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;

    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let first = alice_conn.send(conversation, "retry-me", "once").await?;
    assert!(!first.duplicate);
    let again = alice_conn.send(conversation, "retry-me", "once").await?;
    assert_eq!(
        (again.message_id, again.duplicate),
        (first.message_id, true),
        "same connection"
    );
    drop(alice_conn);

    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 1).await?;
    let after_reconnect = alice_conn.send(conversation, "retry-me", "once").await?;
    assert_eq!(
        (after_reconnect.message_id, after_reconnect.duplicate),
        (first.message_id, true),
        "after reconnect"
    );
    let request = SendMessage {
        conversation_id: conversation,
        client_msg_id: "retry-me".into(),
        text: "once".into(),
    };
    let unary = server
        .conversations(&alice)
        .await?
        .send(request)
        .await?
        .into_inner();
    assert_eq!(
        (unary.message_id, unary.duplicate),
        (first.message_id, true),
        "unary retry"
    );

    let marker = alice_conn
        .send(conversation, "marker", "after the retries")
        .await?;
    let received = messages(&mut bob_conn, 2).await?;
    assert_eq!(received[0].1.id, first.message_id);
    assert_eq!(
        received[1].1.id, marker.message_id,
        "no second copy before the marker"
    );
    assert_eq!((received[0].0, received[1].0), (1, 2));

    let (_, alice_sync) = server.grpc_synced(&alice, "alice-2", 0).await?;
    let ids: Vec<i64> = alice_sync
        .events
        .into_iter()
        .map(|e| message_of(e).map(|m| m.1.id))
        .collect::<Result<_>>()?;
    assert_eq!(
        ids,
        [first.message_id, marker.message_id],
        "the sender's own sequence has one copy"
    );
    let history = server.history(&alice, conversation, 0, 0, 0).await?;
    let ids: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    assert_eq!(
        ids,
        [marker.message_id, first.message_id],
        "history has one copy, newest first"
    );
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
    let (server, [alice, carol, bob]) = Server::start_with_users(["alice", "carol", "bob"]).await?;
    let mut senders = Vec::new();
    for sender in [alice, carol] {
        let conversation = server.open_direct(&sender, &bob).await?;
        let (mut conn, _) = server.grpc_synced(&sender, "sender", 0).await?;
        senders.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for n in 0..PER_SENDER {
                acks.push(
                    conn.send(conversation, &format!("c-{n}"), &format!("{n}"))
                        .await?,
                );
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
            receive_some(
                &mut conn,
                "bob-device",
                cursor,
                PER_CONNECTION,
                total,
                &mut received,
            )
            .await?;
        } else {
            let mut conn = server.grpc(&bob).await?;
            receive_some(
                &mut conn,
                "bob-device",
                cursor,
                PER_CONNECTION,
                total,
                &mut received,
            )
            .await?;
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
        per_conversation
            .entry(message.conversation_id)
            .or_default()
            .push(message.id);
    }
    for acks in acked {
        let conversation = acks[0].conversation_id;
        let sent: Vec<i64> = acks.iter().map(|ack| ack.message_id).collect();
        assert_eq!(
            per_conversation.get(&conversation),
            Some(&sent),
            "every message once, in id order"
        );
    }
    Ok(())
}
/// A third user can neither send to, nor read, nor stream into the others'
/// conversation: not_found / NOT_FOUND, the same as an unknown id, and nothing is stored.
#[tokio::test]
async fn non_member_is_refused() -> Result<()> {
    const UNKNOWN: i64 = 4_242_424_242;
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
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
        let status = carol_client
            .send(request)
            .await
            .expect_err("non-member send accepted");
        assert_eq!(
            status.code(),
            Code::NotFound,
            "unary send to {target}: {status:?}"
        );
        let error = server
            .history(&carol, target, 0, 0, 0)
            .await
            .expect_err("non-member history");
        assert_eq!(
            status_code(&error),
            Some(Code::NotFound),
            "history of {target}: {error:#}"
        );
    }

    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol-1", 0).await?;
    for target in [conversation, UNKNOWN] {
        let Reply::Error(error) = carol_conn
            .send_reply(target, &format!("s-{target}"), "let me in")
            .await?
        else {
            panic!("stream send by a non-member to {target} was accepted");
        };
        assert_eq!(
            (error.code, error.reason.as_str(), error.fatal),
            (5, "not_found", false),
            "{error:?}"
        );
    }
    carol_conn
        .ping(7)
        .await
        .context("the connection survives a refused send")?;

    let history = server.history(&alice, conversation, 0, 0, 0).await?;
    let ids: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, [ack.message_id], "nothing stored");
    let (_, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    assert_eq!(
        bob_sync.events.len(),
        1,
        "bob got nothing from carol: {bob_sync:?}"
    );
    let (_, carol_sync) = server.grpc_synced(&carol, "carol-2", 0).await?;
    assert!(
        carol_sync.events.is_empty(),
        "carol's sequence is empty: {carol_sync:?}"
    );
    let listed = carol_client
        .list(ListConversationsRequest::default())
        .await?
        .into_inner();
    assert!(listed.conversations.is_empty(), "{listed:?}");
    Ok(())
}
