//! Abuse limits (issue 7): each test tries one attack against a server started
//! with small limits and shows it refused, with nothing stored and everyone
//! else unaffected.

use std::time::{Duration, Instant};

use confab_proto::v1::{AddMembersRequest, Hello};
use confab_tests::WAIT;
use confab_tests::ws::upgrade_status_from;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// Asserts that `error` is a RESOURCE_EXHAUSTED status with a retry hint.
fn assert_retry_hint(error: &anyhow::Error) {
    assert_eq!(
        status_code(error),
        Some(Code::ResourceExhausted),
        "{error:#}"
    );
    assert!(format!("{error:#}").contains("retry in"), "{error:#}");
}

/// A flood of sends from one user gets non-fatal `rate_limited` errors with a
/// retry hint (on every device and the unary call alike), stores only the
/// accepted messages, and leaves another user's sends alone.
#[tokio::test]
async fn message_flood_is_rate_limited() -> Result<()> {
    const BURST: usize = 5;
    let server = Server::start_with(&["--send-burst", "5", "--send-per-second", "1"]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    let flooded = server.open_direct(&alice, &bob).await?;
    let other = server.open_direct(&carol, &bob).await?;
    let (mut alice_ws, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-1", 0)
        .await?;
    let (mut alice_grpc, _) = server.grpc_synced(&alice, "alice-2", 0).await?;
    let (mut carol_ws, _) = server
        .ws_synced(&carol, Encoding::Binary, "carol-1", 0)
        .await?;

    let mut refs = Vec::new();
    for i in 0..BURST * 3 {
        refs.push((
            i,
            alice_ws
                .send_message(flooded, &format!("flood-{i}"), "spam")
                .await?,
        ));
    }
    // Another user sends in the same moment, over both paths.
    carol_ws.send(other, "carol-ws", "hello bob").await?;
    let unary = SendMessage {
        conversation_id: other,
        client_msg_id: "carol-unary".into(),
        text: "hello again".into(),
    };
    server.conversations(&carol).await?.send(unary).await?;

    let mut accepted = Vec::new();
    let mut refused = 0;
    for (i, r#ref) in refs {
        match alice_ws.reply_to(r#ref).await? {
            Reply::Sent(_) => accepted.push(format!("flood-{i}")),
            Reply::Error(error) => {
                assert_eq!(
                    (error.code, error.reason.as_str(), error.fatal),
                    (8, "rate_limited", false),
                    "{error:?}"
                );
                assert!(error.message.contains("retry in"), "{error:?}");
                refused += 1;
            }
            Reply::Done => anyhow::bail!("a send answered with done"),
        }
    }
    assert!(accepted.len() >= BURST, "the burst passes: {accepted:?}");
    assert!(refused >= BURST, "the flood is refused: {refused} refused");

    // The budget is the user's, not the device's or the transport's.
    let Reply::Error(error) = alice_grpc.send_reply(flooded, "other-device", "x").await? else {
        panic!("another device of the flooding user was not limited");
    };
    assert_eq!(error.reason, "rate_limited", "{error:?}");
    let unary = SendMessage {
        conversation_id: flooded,
        client_msg_id: "unary".into(),
        text: "x".into(),
    };
    let error = server
        .conversations(&alice)
        .await?
        .send(unary)
        .await
        .map_err(anyhow::Error::from)
        .expect_err("the unary send of the flooding user was not limited");
    assert_retry_hint(&error);

    alice_ws
        .ping(1)
        .await
        .context("the flooding connection stays open")?;
    let history = server.history(&bob, flooded, 0, 0, 100).await?;
    let mut stored: Vec<String> = history
        .messages
        .into_iter()
        .map(|m| m.client_msg_id)
        .collect();
    stored.sort();
    accepted.sort();
    assert_eq!(stored, accepted, "only the accepted messages are stored");
    Ok(())
}

/// A user opening more live connections than allowed is refused before
/// registering (WebSocket 429 or a fatal error frame, gRPC RESOURCE_EXHAUSTED);
/// their open connections and other users are unaffected.
#[tokio::test]
async fn connection_flood_per_user_is_refused() -> Result<()> {
    let server = Server::start_with(&["--max-connections-per-user", "2"]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let (mut first, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-1", 0)
        .await?;
    let (mut second, _) = server.grpc_synced(&alice, "alice-2", 0).await?;

    let status = upgrade_status(&server, WsAuth::Header(&alice.access_token)).await?;
    assert_eq!(
        status, 429,
        "a third WebSocket with the token at the upgrade"
    );

    let mut grpc = server.grpc(&alice).await?;
    grpc.send_hello(&alice.access_token, "alice-3", 0)
        .await
        .ok();
    let (_, closed) = grpc.expect_closed().await?;
    assert_eq!(
        closed.grpc_code,
        Some(Code::ResourceExhausted),
        "{closed:?}"
    );

    let transport = WsTransport::connect(&server, WsAuth::None, Encoding::Binary).await?;
    let mut late = Conn::new(transport);
    late.send_hello(&alice.access_token, "alice-4", 0).await?;
    let (frames, _) = late.expect_closed().await?;
    let refused = frames.iter().any(|frame| {
        matches!(&frame.kind, Some(server_frame::Kind::Error(e))
            if e.fatal && e.code == 8 && e.reason == "too_many_connections")
    });
    assert!(
        refused,
        "a third connection authenticated by its hello: {frames:?}"
    );

    first.ping(1).await?;
    second.ping(2).await?;
    let (mut bob_ws, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;
    bob_ws
        .ping(3)
        .await
        .context("another user still connects")?;
    Ok(())
}

/// One address opening more live connections than allowed is refused (WebSocket
/// 429, gRPC RESOURCE_EXHAUSTED); unary calls still work and a slot comes back
/// when a connection closes.
#[tokio::test]
async fn connection_flood_per_address_is_refused() -> Result<()> {
    let server = Server::start_with(&["--max-connections-per-ip", "2"]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    let (alice_ws, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-1", 0)
        .await?;
    let (mut bob_grpc, _) = server.grpc_synced(&bob, "bob-1", 0).await?;

    let status = upgrade_status(&server, WsAuth::Header(&carol.access_token)).await?;
    assert_eq!(status, 429, "a third WebSocket from the address");
    let mut grpc = server.grpc(&carol).await?;
    grpc.send_hello(&carol.access_token, "carol-1", 0)
        .await
        .ok();
    let (_, closed) = grpc.expect_closed().await?;
    assert_eq!(
        closed.grpc_code,
        Some(Code::ResourceExhausted),
        "{closed:?}"
    );

    server
        .me(&carol.access_token)
        .await
        .context("unary calls are not counted")?;
    bob_grpc.ping(1).await?;
    drop(alice_ws);
    eventually("a closed connection gives its slot back", || async {
        Ok(upgrade_status(&server, WsAuth::Header(&carol.access_token)).await? == 101)
    })
    .await?;
    Ok(())
}

/// Password guessing is throttled per account and per address: after the
/// allowed failures within a minute even the right password gets
/// RESOURCE_EXHAUSTED with a retry hint; successful logins never count.
#[tokio::test]
async fn password_guessing_is_throttled() -> Result<()> {
    let server = Server::start_with(&["--login-failures-per-minute", "3"]).await?;
    server.register("alice").await?;
    server.register("bob").await?;
    for _ in 0..5 {
        server
            .login("alice", PASSWORD)
            .await
            .context("successes do not count")?;
    }
    for guess in 0..3 {
        let error = server
            .login("alice", &format!("wrong-{guess}"))
            .await
            .expect_err("a wrong password was accepted");
        assert_eq!(
            status_code(&error),
            Some(Code::Unauthenticated),
            "{error:#}"
        );
    }
    let error = server
        .login("alice", PASSWORD)
        .await
        .expect_err("the right password passed while throttled");
    assert_retry_hint(&error);
    let error = server
        .login("ALICE", "wrong-again")
        .await
        .expect_err("a case variant of the name was not throttled");
    assert_retry_hint(&error);
    // All tests connect from 127.0.0.1: the address is throttled too.
    let error = server
        .login("bob", PASSWORD)
        .await
        .expect_err("the guessing address was not throttled");
    assert_retry_hint(&error);
    Ok(())
}

/// Creating conversations and inviting users beyond the per-minute rates gets
/// RESOURCE_EXHAUSTED with a retry hint; other users keep their own budgets.
#[tokio::test]
async fn creation_and_invitation_floods_are_limited() -> Result<()> {
    let server = Server::start_with(&[
        "--creations-per-minute",
        "2",
        "--invitations-per-minute",
        "3",
    ])
    .await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let mut invitees = Vec::new();
    for name in ["carol", "dave", "erin", "frank"] {
        invitees.push(server.register(name).await?.id());
    }

    server.create_group(&alice, "one", &[]).await?;
    server.create_group(&alice, "two", &[]).await?;
    let error = server
        .create_group(&alice, "three", &[])
        .await
        .expect_err("a third group within the minute");
    assert_retry_hint(&error);
    let group = server.create_group(&bob, "bob's", &[]).await?;

    let mut bob_client = server.conversations(&bob).await?;
    let invite = |user_ids: &[i64]| AddMembersRequest {
        conversation_id: group.id,
        user_ids: user_ids.to_vec(),
    };
    bob_client.add_members(invite(&invitees[..2])).await?;
    let error = bob_client
        .add_members(invite(&invitees[2..]))
        .await
        .map_err(anyhow::Error::from)
        .expect_err("invitations beyond the rate");
    assert_retry_hint(&error);
    let error = bob_client
        .add_members(invite(&invitees))
        .await
        .map_err(anyhow::Error::from)
        .expect_err("more invitations at once than a minute allows");
    assert_eq!(
        status_code(&error),
        Some(Code::ResourceExhausted),
        "{error:#}"
    );
    Ok(())
}

/// A browser page of a foreign origin cannot open a WebSocket (403 before the
/// upgrade); an allowed origin and native clients (no Origin) can.
#[tokio::test]
async fn foreign_origin_websocket_is_refused() -> Result<()> {
    let server = Server::start_with(&[
        "--allowed-origins",
        "https://chat.example,https://app.example",
    ])
    .await?;
    let alice = server.register("alice").await?;
    let auth = WsAuth::Header(&alice.access_token);
    let evil = upgrade_status_from(&server, auth, Some("https://evil.example")).await?;
    assert_eq!(evil, 403, "a foreign origin");
    let null = upgrade_status_from(&server, auth, Some("null")).await?;
    assert_eq!(null, 403, "an opaque origin");
    let allowed = upgrade_status_from(&server, auth, Some("https://app.example")).await?;
    assert_eq!(allowed, 101, "an allowed origin");
    let native = upgrade_status_from(&server, auth, None).await?;
    assert_eq!(native, 101, "a native client without an Origin");
    Ok(())
}

/// A WebSocket client that never answers the server's pings is closed with 1001
/// "idle timeout" after the idle timeout, while a client that answers them (as
/// tungstenite does) stays connected.
#[tokio::test]
async fn silent_websocket_is_closed_after_idle_timeout() -> Result<()> {
    const IDLE: Duration = Duration::from_secs(2);
    let server = Server::start_with(&["--ws-idle-timeout-secs", "2"]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let (mut live, _) = server.ws_synced(&bob, Encoding::Binary, "bob-1", 0).await?;

    let started = Instant::now();
    let silent = silent_client(&server, &alice.access_token);
    // The live client reads (and so answers pings) for twice the timeout.
    let lively = tokio::time::timeout(IDLE * 2, live.expect_closed());
    let (frames, lively) = tokio::join!(silent, lively);
    let frames = frames?;
    let elapsed = started.elapsed();
    assert!(
        lively.is_err(),
        "the answering client was closed: {lively:?}"
    );
    live.ping(1)
        .await
        .context("the answering client stays connected")?;

    assert!(
        frames.iter().any(|(opcode, _)| *opcode == 0x9),
        "the server pinged first: {frames:?}"
    );
    let Some((_, close)) = frames.iter().find(|(opcode, _)| *opcode == 0x8) else {
        panic!("no close frame: {frames:?}");
    };
    let code = close.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    assert_eq!(code, Some(1001), "{close:?}");
    assert!(
        String::from_utf8_lossy(close).contains("idle timeout"),
        "{close:?}"
    );
    assert!(
        elapsed >= IDLE - Duration::from_millis(200),
        "closed after {elapsed:?}"
    );
    Ok(())
}

/// Opens a WebSocket by hand, says hello, then only reads raw bytes (so it never
/// answers a ping) until the server closes the TCP stream; returns the frames as
/// (opcode, payload).
async fn silent_client(server: &Server, token: &str) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut tcp = tokio::net::TcpStream::connect(server.addr()).await?;
    let request = format!(
        "GET /v1/ws?access_token={token} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        server.addr()
    );
    tcp.write_all(request.as_bytes()).await?;
    let hello = ClientFrame {
        r#ref: 1,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "silent".into(),
            cursor: 0,
        })),
    }
    .encode_to_vec();
    let len = u8::try_from(hello.len()).context("hello too long for a short frame")?;
    anyhow::ensure!(len < 126, "hello too long for a short frame");
    // FIN + binary; masked (a zero mask leaves the payload as it is).
    let mut frame = vec![0x82, 0x80 | len, 0, 0, 0, 0];
    frame.extend_from_slice(&hello);
    tcp.write_all(&frame).await?;

    let mut bytes = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut bytes))
        .await
        .context("the silent client was never closed")??;
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no upgrade response")?;
    anyhow::ensure!(bytes.starts_with(b"HTTP/1.1 101"), "upgrade refused");
    parse_frames(&bytes[head_end + 4..])
}

/// Splits unmasked server frames.
fn parse_frames(mut bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>> {
    let mut frames = Vec::new();
    while let [first, second, rest @ ..] = bytes {
        let opcode = first & 0x0f;
        let (len, rest) = match second & 0x7f {
            126 => {
                let len = rest.get(..2).context("short length")?;
                (
                    usize::from(u16::from_be_bytes([len[0], len[1]])),
                    &rest[2..],
                )
            }
            127 => {
                let len: [u8; 8] = rest.get(..8).context("short length")?.try_into()?;
                (usize::try_from(u64::from_be_bytes(len))?, &rest[8..])
            }
            short => (usize::from(short), rest),
        };
        let payload = rest.get(..len).context("short payload")?;
        frames.push((opcode, payload.to_vec()));
        bytes = &rest[len..];
    }
    Ok(frames)
}

/// A test-only Ed25519 key pair (made with openssl for these tests).
const ED_PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIEdK+xiVTqpSgsde9jLhnUsxr/RBYKQI7gFczsPPQy8A\n-----END PRIVATE KEY-----\n";
const ED_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA6HXBeaw3aL+WMOFzdm5xQleLrYSuAdIZJxEbMYDkitE=\n-----END PUBLIC KEY-----\n";

/// Tokens that try to dodge the signature check are refused before any work:
/// `alg: none` with a real payload, an HS256 token signed with the configured
/// Ed25519 public key as its secret (key confusion), and an external token for
/// another audience; a properly signed external token passes, so the refusals
/// are not an accident of configuration.
#[tokio::test]
async fn forged_tokens_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key_file = dir.path().join("idp.pub.pem");
    std::fs::write(&key_file, ED_PUBLIC)?;
    let key_path = key_file.to_string_lossy().into_owned();
    let server = Server::start_with(&[
        "--external-jwt-public-key",
        &key_path,
        "--external-jwt-audience",
        "confab-app",
    ])
    .await?;
    let alice = server.register("alice").await?;

    // alg none: the header swapped, the payload kept, the signature dropped.
    let payload = alice
        .access_token
        .split('.')
        .nth(1)
        .context("a jwt has a payload")?;
    let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"; // {"alg":"none","typ":"JWT"}
    let unsigned = format!("{none_header}.{payload}.");

    let exp = now_secs() + 600;
    let claims = |aud: &str| json!({"sub": "mallory", "aud": aud, "exp": exp});
    let confused = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims("confab-app"),
        &jsonwebtoken::EncodingKey::from_secret(ED_PUBLIC.as_bytes())?,
    )?;
    let ed_key = jsonwebtoken::EncodingKey::from_ed_pem(ED_PRIVATE.as_bytes())?;
    let ed_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
    let other_audience = jsonwebtoken::encode(&ed_header, &claims("another-app"), &ed_key)?;
    let genuine = jsonwebtoken::encode(&ed_header, &claims("confab-app"), &ed_key)?;

    for (what, token) in [
        ("alg none", &unsigned),
        ("key confusion", &confused),
        ("wrong audience", &other_audience),
    ] {
        let mut client = server.conversations_with(Some(token)).await?;
        let status = client
            .list(ListConversationsRequest::default())
            .await
            .expect_err(what);
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unauthenticated, "invalid or expired token"),
            "{what}: {status:?}"
        );
    }
    let mut client = server.conversations_with(Some(&genuine)).await?;
    client
        .list(ListConversationsRequest::default())
        .await
        .context("a genuine external token is accepted")?;
    Ok(())
}
