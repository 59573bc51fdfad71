//! Bad input, crashes, and the operational endpoints.

use super::*;

/// A text over the limit gets a non-fatal too_large; a frame over the frame limit
/// closes that connection (WS 1009) while the server keeps serving; a malformed
/// frame gets a non-fatal "malformed" error.
#[tokio::test]
async fn oversized_and_malformed_input() -> Result<()> {
    const MAX_TEXT: usize = 16_384;
    const MAX_FRAME: usize = 65_536;
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut alice_ws, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-ws", 0)
        .await?;

    let at_limit = "x".repeat(MAX_TEXT);
    alice_ws
        .send(conversation, "at-limit", &at_limit)
        .await
        .context("a text of exactly the limit is accepted")?;
    let over = "x".repeat(MAX_TEXT + 1);
    let Reply::Error(error) = alice_ws.send_reply(conversation, "over", &over).await? else {
        panic!("a text over the limit was accepted");
    };
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (8, "too_large", false),
        "{error:?}"
    );
    alice_ws
        .send(conversation, "after-too-large", "still here")
        .await?;

    let malformed = tungstenite::Message::Binary(vec![0xff, 0xff, 0xff, 0xff].into());
    alice_ws.transport_mut().send_raw(malformed).await?;
    let frame = next_non_event(&mut alice_ws).await?;
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("expected a malformed error, got {frame:?}");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("malformed", false),
        "{error:?}"
    );
    alice_ws
        .send(conversation, "after-malformed", "still here")
        .await?;

    let mut json_ws = server.ws(&alice, Encoding::Json).await?;
    json_ws.hello("alice-json", u64::MAX / 2).await?;
    json_ws
        .transport_mut()
        .send_raw(tungstenite::Message::Text("{not json".into()))
        .await?;
    let frame = next_non_event(&mut json_ws).await?;
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("expected a malformed error for bad JSON, got {frame:?}");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("malformed", false),
        "{error:?}"
    );
    json_ws
        .ping(3)
        .await
        .context("the JSON connection survives malformed input")?;

    let huge = ClientFrame {
        r#ref: 99,
        kind: Some(client_frame::Kind::Send(SendMessage {
            conversation_id: conversation,
            client_msg_id: "huge".into(),
            text: "y".repeat(MAX_FRAME + 1000),
        })),
    };
    alice_ws
        .transport_mut()
        .send_raw(tungstenite::Message::Binary(huge.encode_to_vec().into()))
        .await?;
    let (_, closed) = alice_ws.expect_closed().await?;
    assert_eq!(
        closed.ws_close_code,
        Some(1009),
        "oversized ws frame: {closed:?}"
    );

    let (mut alice_grpc, _) = server.grpc_synced(&alice, "alice-grpc", 0).await?;
    let Reply::Error(error) = alice_grpc
        .send_reply(conversation, "over-grpc", &over)
        .await?
    else {
        panic!("a text over the limit was accepted over gRPC");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("too_large", false),
        "{error:?}"
    );
    alice_grpc
        .send_message(conversation, "huge-grpc", &"y".repeat(MAX_FRAME + 1000))
        .await?;
    let (_, closed) = alice_grpc.expect_closed().await?;
    assert_eq!(
        closed.grpc_code,
        Some(Code::ResourceExhausted),
        "oversized gRPC frame: {closed:?}"
    );

    // The server still serves everyone else, and stored nothing oversized.
    let (mut bob_conn, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    let texts: Vec<String> = bob_sync
        .events
        .into_iter()
        .map(|e| message_of(e).map(|m| m.1.text))
        .collect::<Result<_>>()?;
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
        refs.push(
            alice_conn
                .send_message(conversation, &format!("p-{n}"), &format!("pipelined {n}"))
                .await?,
        );
    }
    let mut acked = Vec::new();
    for r in refs {
        let Reply::Sent(ack) = alice_conn.reply_to(r).await? else {
            panic!("pipelined send {r} refused");
        };
        acked.push(ack.message_id);
    }
    let last = alice_conn
        .send(conversation, "last", "the last words")
        .await?;
    acked.push(last.message_id);
    server.kill9().await?;
    drop(alice_conn);

    server.restart().await?;
    let history = server.history(&bob, conversation, 0, 0, 200).await?;
    let mut stored: Vec<i64> = history.messages.iter().map(|m| m.id).collect();
    stored.reverse();
    assert_eq!(
        stored, acked,
        "every acknowledged message is in history, in order"
    );
    let (_, bob_sync) = server.grpc_synced(&bob, "bob-1", 0).await?;
    let synced: Vec<(u64, i64)> = bob_sync
        .events
        .into_iter()
        .map(|e| message_of(e).map(|(s, m)| (s, m.id)))
        .collect::<Result<_>>()?;
    let expected: Vec<(u64, i64)> = (1..).zip(acked.iter().copied()).collect();
    assert_eq!(
        synced, expected,
        "the recipient's sequence has every message"
    );
    Ok(())
}

/// After a delivery, /metrics shows the connection gauge, the accepted counter and
/// the delivery latency histogram; /healthz is 200, gRPC health is SERVING, and
/// server reflection lists the edge services.
#[tokio::test]
async fn metrics_and_health() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
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
        let body = http::get(addr, "/metrics")
            .await
            .map(|r| r.body)
            .unwrap_or_default();
        let ours: Vec<&str> = body.lines().filter(|l| l.contains("confab_")).collect();
        panic!("{error:#}; confab_ lines of /metrics: {ours:#?}");
    }

    let healthz = http::get(addr, "/healthz").await?;
    assert_eq!(healthz.status, 200, "/healthz: {healthz:?}");
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await?);
    let request = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    let status = health.check(request).await?.into_inner().status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await?);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.message().await?.context("no reflection answer")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in [
        "confab.v1.Edge",
        "confab.v1.Accounts",
        "confab.v1.Conversations",
    ] {
        assert!(names.contains(&expected), "{expected} not in {names:?}");
    }
    Ok(())
}

/// SIGTERM closes live connections with a "reconnect" error frame and a WebSocket
/// close frame (1001, going away), and the process exits 0; what was
/// acknowledged before is there after a restart.
#[tokio::test]
async fn graceful_shutdown() -> Result<()> {
    let mut server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let ack = alice_conn
        .send(conversation, "m", "before shutdown")
        .await?;
    assert_eq!(bob_conn.next_message().await?.1.id, ack.message_id);

    let status = server.terminate().await?;
    assert!(status.success(), "exit status {status:?}");
    let (frames, closed) = bob_conn.expect_closed().await?;
    let last = frames.last().and_then(|frame| frame.kind.clone());
    let Some(server_frame::Kind::Error(error)) = last else {
        panic!("expected a final error frame, got {frames:?}");
    };
    assert_eq!((error.code, error.fatal), (14, true), "{error:?}");
    assert_eq!(closed.ws_close_code, Some(1001), "{closed:?}");
    let (_, closed) = alice_conn.expect_closed().await?;
    assert_eq!(closed.grpc_code, Some(Code::Unavailable), "{closed:?}");

    server.restart().await?;
    let (_, synced) = server.grpc_synced(&bob, "bob-2", 0).await?;
    let ids: Vec<i64> = synced
        .events
        .into_iter()
        .map(|event| message_of(event).map(|(_, m)| m.id))
        .collect::<Result<_>>()?;
    assert_eq!(ids, [ack.message_id]);
    Ok(())
}
