//! Transport hardening (issue 7): attacks below the chat protocol — clients that
//! hold connections without finishing a request, bad WebSocket frames,
//! compression offers — each refused by the real binary while real clients keep
//! working; secrets kept out of the log; refusals counted.

use std::time::Duration;

use confab_tests::WAIT;
use confab_tests::raw::{H2_PREFACE, RawClient, ws_upgrade_request};
use confab_tests::ws::upgrade_status_from;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use super::*;

/// The header-read timeout of these tests' servers, in seconds.
const HEADER_TIMEOUT_SECS: u64 = 2;
/// How much earlier than the timeout a close may come: the server's timer and
/// ours start a little apart.
const SLACK: Duration = Duration::from_millis(300);

fn header_timeout() -> Duration {
    Duration::from_secs(HEADER_TIMEOUT_SECS)
}

/// Starts a server whose header-read timeout is [`HEADER_TIMEOUT_SECS`].
async fn start() -> Result<Server> {
    Server::start_with(&[
        "--header-read-timeout-secs",
        &HEADER_TIMEOUT_SECS.to_string(),
    ])
    .await
}

/// Asserts that a connection the server closed after `kept` was cut by the
/// header deadline: not before it, and not much after.
fn assert_cut_at_deadline(what: &str, kept: Duration) {
    assert!(
        kept + SLACK >= header_timeout(),
        "{what}: closed after {kept:?}, before the deadline"
    );
    assert!(
        kept < header_timeout() * 3,
        "{what}: closed only after {kept:?}"
    );
}

/// Alice and Bob, a direct conversation, and a live connection of each opened
/// before any attack: Alice on gRPC (h2c), Bob on a WebSocket.
struct Bystanders {
    alice: Account,
    conversation: i64,
    alice_grpc: Conn<GrpcTransport>,
    bob_ws: Conn<WsTransport>,
    sent: usize,
}

impl Bystanders {
    async fn connect(server: &Server) -> Result<Self> {
        let alice = server.register("alice").await?;
        let bob = server.register("bob").await?;
        let conversation = server.open_direct(&alice, &bob).await?;
        let (alice_grpc, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
        let (bob_ws, _) = server.ws_synced(&bob, Encoding::Json, "bob-1", 0).await?;
        Ok(Self {
            alice,
            conversation,
            alice_grpc,
            bob_ws,
            sent: 0,
        })
    }

    /// Alice sends one message on her open stream and Bob's open WebSocket gets it.
    async fn chat(&mut self) -> Result<()> {
        self.sent += 1;
        let text = format!("still here {}", self.sent);
        let id = format!("m-{}", self.sent);
        let ack = self.alice_grpc.send(self.conversation, &id, &text).await?;
        let (_, message) = self.bob_ws.next_message().await?;
        assert_is(&message, &ack, &self.alice, &text);
        Ok(())
    }
}

/// A client that trickles its request headers one byte a second and one that
/// connects and sends nothing are both disconnected at the header-read timeout,
/// never having got a response; meanwhile, and after, a gRPC stream and a
/// WebSocket opened before them (so older than the deadline) keep chatting.
#[tokio::test]
async fn slowloris_client_is_disconnected() -> Result<()> {
    let server = start().await?;
    let mut bystanders = Bystanders::connect(&server).await?;
    let addr = server.addr();

    let headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slow\r\nX-Padding: {}\r\n\r\n",
        "a".repeat(64)
    );
    let mut trickler = RawClient::connect(addr).await?;
    let trickle = tokio::spawn(async move {
        trickler
            .trickle_until_closed(headers.as_bytes(), Duration::from_secs(1))
            .await
            .map(|(kept, sent)| (kept, sent, headers.len()))
    });
    let mut silent = RawClient::connect(addr).await?;
    let silence = tokio::spawn(async move { silent.closed_by_server().await });

    // The attackers hold their connections; everyone else chats.
    bystanders.chat().await?;

    let (kept, sent, total) = trickle.await??;
    assert_cut_at_deadline("trickling client", kept);
    assert!(
        sent < total,
        "the headers were never finished: {sent} of {total}"
    );
    let (kept, received) = silence.await??;
    assert_cut_at_deadline("silent client", kept);
    assert!(
        received.is_empty(),
        "no response to no request: {received:?}"
    );

    // Connections older than the deadline, that finished their requests, stay.
    bystanders.chat().await?;
    assert_eq!(http::get(addr, "/healthz").await?.status, 200);
    Ok(())
}

/// A WebSocket upgrade whose headers never end (the empty line never comes) is
/// closed at the header-read timeout without a 101, while a WebSocket and a
/// gRPC stream keep chatting.
#[tokio::test]
async fn half_open_upgrade_times_out() -> Result<()> {
    let server = start().await?;
    let mut bystanders = Bystanders::connect(&server).await?;

    let mut half_open = RawClient::connect(server.addr()).await?;
    half_open
        .send(ws_upgrade_request(server.addr(), "", false).as_bytes())
        .await?;
    let waiting = tokio::spawn(async move { half_open.closed_by_server().await });
    bystanders.chat().await?;

    let (kept, received) = waiting.await??;
    assert_cut_at_deadline("half-open upgrade", kept);
    let received = String::from_utf8_lossy(&received);
    assert!(
        !received.starts_with("HTTP/1.1 101"),
        "upgraded: {received}"
    );
    bystanders.chat().await?;
    Ok(())
}

/// h2c clients that stop inside the preface, or after it without their
/// SETTINGS, are closed at the header-read timeout; a raw h2c connection that
/// did send its preface and SETTINGS stays open past that deadline (it still
/// answers a PING once the others are gone), and a real gRPC client keeps
/// working.
#[tokio::test]
async fn h2c_client_without_preface_is_disconnected() -> Result<()> {
    let server = start().await?;
    let addr = server.addr();

    let mut settled = RawClient::connect(addr).await?;
    settled.send(H2_PREFACE).await?;
    settled.send(&h2_frame(0x4, 0, 0, &[])).await?;

    let mut partial = RawClient::connect(addr).await?;
    partial.send(&H2_PREFACE[..16]).await?;
    let partial = tokio::spawn(async move { partial.closed_by_server().await });
    let mut bare = RawClient::connect(addr).await?;
    bare.send(H2_PREFACE).await?;
    let bare = tokio::spawn(async move { bare.closed_by_server().await });

    let mut bystanders = Bystanders::connect(&server).await?;
    bystanders.chat().await?;

    let (kept, _) = partial.await??;
    assert_cut_at_deadline("partial preface", kept);
    let (kept, _) = bare.await??;
    assert_cut_at_deadline("preface without settings", kept);

    // Opened before both, so older than the deadline: still served.
    settled.send(&h2_frame(0x6, 0, 0, b"confab!!")).await?;
    h2_ping_ack(&mut settled, b"confab!!").await?;
    bystanders.chat().await?;
    Ok(())
}

/// Encodes one HTTP/2 frame.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads frames from `client` until the PING acknowledgement carrying `opaque`.
async fn h2_ping_ack(client: &mut RawClient, opaque: &[u8; 8]) -> Result<()> {
    tokio::time::timeout(WAIT, async {
        loop {
            let (kind, flags, payload) = client.read_h2_frame().await?;
            if kind == 0x6 && flags & 0x1 == 1 && payload == opaque {
                return Ok(());
            }
            ensure!(kind != 0x7, "the server sent GOAWAY: {payload:?}");
        }
    })
    .await
    .context("no PING acknowledgement")?
}

/// A text frame that is not UTF-8 closes the WebSocket with 1007 (invalid
/// payload data, RFC 6455 section 7.4.1), not with a normal close; the user's
/// other connection is untouched.
#[tokio::test]
async fn invalid_utf8_text_frame_closes_with_1007() -> Result<()> {
    let server = Server::start().await?;
    let mut bystanders = Bystanders::connect(&server).await?;
    let (mut ws, _) = server
        .ws_synced(&bystanders.alice, Encoding::Json, "alice-2", 0)
        .await?;

    let invalid = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    ws.transport_mut()
        .send_raw(tungstenite::Message::Frame(invalid))
        .await?;
    let (_, closed) = ws.expect_closed().await?;
    assert_eq!(closed.ws_close_code, Some(1007), "{closed:?}");

    bystanders.chat().await?;
    Ok(())
}

/// An upgrade offering `permessage-deflate` is accepted without it: the 101
/// carries no `Sec-WebSocket-Extensions`, so no frame is ever compressed.
#[tokio::test]
async fn websocket_compression_is_not_offered() -> Result<()> {
    let server = Server::start().await?;
    let mut client = RawClient::connect(server.addr()).await?;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    client
        .send(ws_upgrade_request(server.addr(), offer, true).as_bytes())
        .await?;
    let head = client.read_head().await?;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let extensions = head
        .lines()
        .filter(|line| {
            line.to_ascii_lowercase()
                .starts_with("sec-websocket-extensions")
        })
        .collect::<Vec<_>>();
    assert!(
        extensions.is_empty(),
        "extensions negotiated: {extensions:?}"
    );
    Ok(())
}

/// With every log level on (`RUST_LOG=trace`), a session of register, failed
/// and good logins, refresh, connections with the token in the header, the
/// query string and the hello, and a message, leaves none of its secrets in the
/// server's log: passwords (good and wrong), access and refresh tokens, the JWT
/// secret, the message text (nor its hex, as a frame dump would show it).
#[tokio::test]
async fn logs_never_contain_secrets() -> Result<()> {
    const SECRET: &str = "jwt-secret-that-must-stay-home-4c1d";
    const WRONG_PASSWORD: &str = "wrong-horse-guess-9b2e";
    const BODY: &str = "the eagle lands at midnight 5e7a";
    let server =
        Server::start_with_env(&["--jwt-secret", SECRET], &[("RUST_LOG", "trace")]).await?;

    let registered = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let refused = server.login("alice", WRONG_PASSWORD).await;
    assert_eq!(
        refused.as_ref().err().and_then(status_code),
        Some(Code::Unauthenticated),
        "{refused:?}"
    );
    let alice = server.login("alice", PASSWORD).await?;
    let refreshed = server
        .accounts()
        .await?
        .refresh(RefreshRequest {
            refresh_token: alice.refresh_token.clone(),
        })
        .await?
        .into_inner();
    let conversation = server.open_direct(&alice, &bob).await?;

    let (mut alice_grpc, _) = server.grpc_synced(&alice, "alice-1", 0).await?;
    let query =
        WsTransport::connect(&server, WsAuth::Query(&bob.access_token), Encoding::Json).await?;
    let mut bob_query = Conn::new(query);
    bob_query.sync("bob-1", 0).await?;
    let hello = WsTransport::connect(&server, WsAuth::None, Encoding::Binary).await?;
    let mut bob_hello = Conn::new(hello);
    bob_hello.send_hello(&bob.access_token, "bob-2", 0).await?;
    bob_hello.expect_welcome().await?;
    bob_hello.read_catch_up().await?;
    let ack = alice_grpc.send(conversation, "secret-1", BODY).await?;
    for bob in [&mut bob_query, &mut bob_hello] {
        let (_, message) = bob.next_message().await?;
        assert_is(&message, &ack, &alice, BODY);
    }

    let log = server.log();
    ensure!(
        log.contains("TRACE"),
        "the server did not log at trace level"
    );
    let hex: String = BODY.bytes().map(|b| format!("{b:02x}")).collect();
    let secrets = [
        ("password", PASSWORD.to_owned()),
        ("wrong password", WRONG_PASSWORD.to_owned()),
        ("jwt secret", SECRET.to_owned()),
        ("message body", BODY.to_owned()),
        ("message body in hex", hex),
    ]
    .into_iter()
    .chain([&registered, &alice, &bob].into_iter().flat_map(|account| {
        [
            ("access token", account.access_token.clone()),
            ("refresh token", account.refresh_token.clone()),
        ]
    }))
    .chain([
        ("refreshed access token", refreshed.access_token),
        ("refreshed refresh token", refreshed.refresh_token),
    ]);
    for (what, secret) in secrets {
        // A JWT's signature alone identifies it; check it too, in case the
        // token was cut into pieces.
        let signature = secret.rsplit('.').next().unwrap_or_default().to_owned();
        for needle in [secret.as_str(), signature.as_str()] {
            if let Some(line) = log.lines().find(|line| line.contains(needle)) {
                let line = line.replace(needle, "<HERE>");
                anyhow::bail!("the log holds the {what}: {line}");
            }
        }
    }
    Ok(())
}

/// Refusals by different limits show in `confab_refusals_total` under their
/// own reason: a WebSocket from a foreign origin (`origin`), a connection that
/// sends nothing (`header_timeout`), and a WebSocket frame over the size limit
/// (`frame_size`).
#[tokio::test]
async fn refusals_are_counted_in_metrics() -> Result<()> {
    let server = Server::start_with(&[
        "--header-read-timeout-secs",
        "1",
        "--allowed-origins",
        "https://chat.example",
        "--max-text-bytes",
        "1024",
        "--max-frame-bytes",
        "4096",
    ])
    .await?;
    let alice = server.register("alice").await?;

    let status = upgrade_status_from(&server, WsAuth::None, Some("https://evil.example")).await?;
    assert_eq!(status, 403);
    let mut silent = RawClient::connect(server.addr()).await?;
    silent.closed_by_server().await?;
    let (mut ws, _) = server
        .ws_synced(&alice, Encoding::Binary, "alice-1", 0)
        .await?;
    ws.transport_mut()
        .send_raw(tungstenite::Message::Binary(vec![0_u8; 8192].into()))
        .await?;
    let (_, closed) = ws.expect_closed().await?;
    assert_eq!(closed.ws_close_code, Some(1009), "{closed:?}");

    eventually("each refusal counted under its reason", || async {
        let body = http::get(server.addr(), "/metrics").await?.body;
        Ok(["origin", "header_timeout", "frame_size"]
            .iter()
            .all(|reason| refusals(&body, reason) >= 1.0))
    })
    .await?;
    let body = http::get(server.addr(), "/metrics").await?.body;
    assert_eq!(refusals(&body, "origin"), 1.0, "one origin refusal");
    assert_eq!(
        refusals(&body, "send_rate"),
        0.0,
        "no refusal of a limit not hit"
    );
    Ok(())
}

/// Returns `confab_refusals_total{reason="<reason>"}` in `exposition` (0 when absent).
fn refusals(exposition: &str, reason: &str) -> f64 {
    let prefix = format!("confab_refusals_total{{reason=\"{reason}\"}} ");
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}
