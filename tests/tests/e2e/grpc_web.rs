//! Browsers over gRPC-web (issue 7's last transport): `Edge.Subscribe` plus
//! `Edge.Submit` through tonic-web's client on plain HTTP/1.1, the text mode
//! and CORS by hand as a browser's `fetch` puts them on the wire, and the
//! attacks on it: calls into another user's subscription, foreign origins,
//! bodies over the frame limit.

use anyhow::bail;
use confab_proto::v1::{AuthResponse, Hello, RegisterRequest, SubmitRequest};
use confab_tests::grpc_web::{
    GrpcWebTransport, WebEdge, raw_web_call, web_body, web_body_declaring, web_edge,
};

use super::*;

/// The content type of binary gRPC-web.
const WEB: &str = "application/grpc-web+proto";
/// The content type of base64 gRPC-web, the default of browser libraries.
const WEB_TEXT: &str = "application/grpc-web-text";

/// Submits `frame` for `device_id` and fails unless the call is refused with
/// `code`.
async fn expect_refused(
    edge: &mut WebEdge,
    device_id: &str,
    frame: Option<ClientFrame>,
    code: Code,
) -> Result<()> {
    let request = SubmitRequest {
        device_id: device_id.to_owned(),
        frame,
    };
    match edge.submit(request).await {
        Ok(answer) => bail!("a submit for {device_id} was answered: {answer:?}"),
        Err(status) if status.code() == code => Ok(()),
        Err(status) => bail!("a submit for {device_id}: expected {code:?}, got {status:?}"),
    }
}

/// A browser (gRPC-web on HTTP/1.1) and a WebSocket app chat: sends and their
/// acks through `Submit`, events on the subscription, a retry answered with
/// the original id, receipts, ping, presence watch.
#[tokio::test]
async fn browser_on_grpc_web_chats_with_a_websocket_user() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut browser, synced) = server.grpc_web_synced(&alice, "browser", 0).await?;
    assert_eq!(synced.welcome.user_id, alice.id());
    assert_eq!(synced.welcome.device_id, "browser");
    let (mut bob_ws, _) = server.ws_synced(&bob, Encoding::Binary, "phone", 0).await?;

    let ack = browser
        .send(conversation, "web-1", "hello from a browser")
        .await?;
    assert!(!ack.duplicate);
    let (_, message) = bob_ws.next_message().await?;
    assert_eq!(message.text, "hello from a browser");
    assert_eq!(
        (message.id, message.sender_id),
        (ack.message_id, alice.id())
    );
    // The retry of a browser that lost the answer gets the original.
    let retry = browser
        .send(conversation, "web-1", "hello from a browser")
        .await?;
    assert!(retry.duplicate);
    assert_eq!(retry.message_id, ack.message_id);
    // Her own message reaches her subscription too.
    let (_, own) = browser.next_message().await?;
    assert_eq!(own.id, ack.message_id);

    let answer = bob_ws
        .send(conversation, "ws-1", "hello from an app")
        .await?;
    let (_, message) = browser.next_message().await?;
    assert_eq!(
        (message.id, message.text.as_str()),
        (answer.message_id, "hello from an app")
    );
    browser.delivered(conversation, message.id).await?;
    browser.mark_read(conversation, message.id).await?;
    // Bob's phone has his own message first.
    let (_, own) = bob_ws.next_message().await?;
    assert_eq!(own.id, answer.message_id);
    let (_, receipt) = bob_ws.next_receipt().await?;
    assert_eq!(receipt.user_id, alice.id());
    browser.ping(42).await?;
    let snapshot = browser.watch_presence_expecting(&[bob.id()], 1).await?;
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    assert!(snapshot[0].online, "{snapshot:?}");

    let history = server.history(&bob, conversation, 0, 0, 10).await?;
    assert_eq!(history.messages.len(), 2, "{history:?}");
    Ok(())
}

/// A browser tab that closes ends its subscription at once (no later frame
/// needed to notice): presence goes offline, `Submit` is refused, and a new
/// subscription resumes from the cursor with what was missed.
#[tokio::test]
async fn browser_subscription_ends_with_the_tab_and_resumes_from_its_cursor() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut bob_ws, _) = server.ws_synced(&bob, Encoding::Json, "phone", 0).await?;
    let snapshot = bob_ws.watch_presence(&[alice.id()]).await?;
    assert!(!snapshot[0].online, "{snapshot:?}");

    let (mut browser, synced) = server.grpc_web_synced(&alice, "browser", 0).await?;
    browser.heartbeat().await?;
    let online = bob_ws.next_presence().await?;
    assert_eq!((online.user_id, online.online), (alice.id(), true));
    bob_ws.send(conversation, "b1", "first").await?;
    let (cursor, _) = browser.next_message().await?;
    assert!(cursor > synced.seq);

    drop(browser);
    let offline = bob_ws.next_presence().await?;
    assert_eq!((offline.user_id, offline.online), (alice.id(), false));
    let mut edge = web_edge(&server, Some(&alice.access_token))?;
    let ping = ClientFrame {
        r#ref: 1,
        kind: Some(client_frame::Kind::Ping(confab_proto::v1::Ping {
            nonce: 1,
        })),
    };
    expect_refused(&mut edge, "browser", Some(ping), Code::FailedPrecondition).await?;

    let missed = bob_ws
        .send(conversation, "b2", "while the tab was closed")
        .await?;
    let (_, synced) = server.grpc_web_synced(&alice, "browser", cursor).await?;
    let texts: Vec<i64> = synced
        .events
        .into_iter()
        .map(|event| message_of(event).map(|(_, message)| message.id))
        .collect::<Result<_>>()?;
    assert_eq!(texts, vec![missed.message_id], "only what was missed");
    Ok(())
}

/// `Submit` reaches only the caller's own subscription on this gateway:
/// another user's device, a device with no subscription and a second hello are
/// refused; without a token nothing opens.
#[tokio::test]
async fn submit_reaches_only_the_callers_own_subscription() -> Result<()> {
    let (server, [alice, mallory]) = Server::start_with_users(["alice", "mallory"]).await?;
    let conversation = server.open_direct(&alice, &mallory).await?;
    let (mut browser, _) = server.grpc_web_synced(&alice, "browser", 0).await?;

    let send = |text: &str| ClientFrame {
        r#ref: 9,
        kind: Some(client_frame::Kind::Send(SendMessage {
            conversation_id: conversation,
            client_msg_id: "forged".into(),
            text: text.into(),
        })),
    };
    let mut as_mallory = web_edge(&server, Some(&mallory.access_token))?;
    for device_id in ["browser", "nowhere"] {
        expect_refused(
            &mut as_mallory,
            device_id,
            Some(send("as alice?")),
            Code::FailedPrecondition,
        )
        .await?;
    }
    let mut as_alice = web_edge(&server, Some(&alice.access_token))?;
    let hello = ClientFrame {
        r#ref: 1,
        kind: Some(client_frame::Kind::Hello(Hello {
            token: String::new(),
            device_id: "browser".into(),
            cursor: 0,
        })),
    };
    expect_refused(&mut as_alice, "browser", Some(hello), Code::InvalidArgument).await?;
    expect_refused(&mut as_alice, "browser", None, Code::InvalidArgument).await?;

    let mut anonymous = web_edge(&server, None)?;
    expect_refused(
        &mut anonymous,
        "browser",
        Some(send("anonymous")),
        Code::Unauthenticated,
    )
    .await?;
    let mut tokenless = Conn::new(GrpcWebTransport::new(&server, None)?);
    tokenless.send_hello("", "tab", 0).await?;
    let (_, closed) = tokenless.expect_closed().await?;
    assert_eq!(closed.grpc_code, Some(Code::Unauthenticated), "{closed:?}");

    // Nothing of mallory's got in; alice's tab still works.
    let history = server.history(&alice, conversation, 0, 0, 10).await?;
    assert!(history.messages.is_empty(), "{history:?}");
    browser.ping(7).await?;
    browser.send(conversation, "real", "still here").await?;
    Ok(())
}

/// What a browser library puts on the wire: the base64 text mode over
/// HTTP/1.1, with its CORS preflight first, answered for an allowed origin.
#[tokio::test]
async fn grpc_web_text_mode_and_cors_preflight_from_an_allowed_origin() -> Result<()> {
    let origin = "https://chat.example";
    let server = Server::start_with(&["--allowed-origins", origin]).await?;
    let path = "/confab.v1.Accounts/Register";
    let preflight = raw_web_call(
        server.addr(),
        "OPTIONS",
        path,
        &[
            ("Origin", origin),
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type,x-grpc-web,x-user-agent,authorization",
            ),
        ],
        b"",
    )
    .await?;
    assert_eq!(preflight.status, 200, "{preflight:?}");
    assert_eq!(
        preflight.header("access-control-allow-origin"),
        Some(origin)
    );
    let allowed_headers = preflight
        .header("access-control-allow-headers")
        .unwrap_or_default()
        .to_ascii_lowercase();
    for header in ["content-type", "x-grpc-web", "authorization"] {
        assert!(allowed_headers.contains(header), "{preflight:?}");
    }

    let request = RegisterRequest {
        username: "webby".into(),
        password: PASSWORD.into(),
    };
    for (content_type, text) in [(WEB_TEXT, true), (WEB, false)] {
        let mut request = request.clone();
        request.username = format!("webby{}", u8::from(text));
        let answer = raw_web_call(
            server.addr(),
            "POST",
            path,
            &[
                ("Origin", origin),
                ("Content-Type", content_type),
                ("X-Grpc-Web", "1"),
            ],
            &web_body(&request.encode_to_vec(), text),
        )
        .await?;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.grpc_status(), Some(0), "{answer:?}");
        assert_eq!(answer.header("access-control-allow-origin"), Some(origin));
        let expose = answer
            .header("access-control-expose-headers")
            .unwrap_or_default();
        assert!(expose.contains("grpc-status"), "{answer:?}");
        let [message] = answer.messages.as_slice() else {
            bail!("one message expected: {answer:?}");
        };
        let auth = AuthResponse::decode(message.as_slice())?;
        let user = auth.user.context("no user")?;
        assert_eq!(user.username, request.username);
        // The tokens work on the other transports.
        server.me(&auth.access_token).await?;
    }
    Ok(())
}

/// A page of another site cannot call the API from a user's browser: its
/// preflight and its calls are refused with 403 before any work, and counted.
#[tokio::test]
async fn grpc_web_from_a_foreign_origin_is_refused() -> Result<()> {
    let server = Server::start_with(&["--allowed-origins", "https://chat.example"]).await?;
    let path = "/confab.v1.Accounts/Register";
    let evil = "https://evil.example";
    let preflight = raw_web_call(
        server.addr(),
        "OPTIONS",
        path,
        &[("Origin", evil), ("Access-Control-Request-Method", "POST")],
        b"",
    )
    .await?;
    assert_eq!(preflight.status, 403, "{preflight:?}");
    assert_eq!(preflight.header("access-control-allow-origin"), None);
    let request = RegisterRequest {
        username: "victim".into(),
        password: PASSWORD.into(),
    };
    let call = raw_web_call(
        server.addr(),
        "POST",
        path,
        &[("Origin", evil), ("Content-Type", WEB_TEXT)],
        &web_body(&request.encode_to_vec(), true),
    )
    .await?;
    assert_eq!(call.status, 403, "{call:?}");
    let login = server.login("victim", PASSWORD).await;
    assert!(login.is_err(), "the foreign page registered a user");
    let refusals = http::get(server.addr(), "/metrics").await?.body;
    assert!(
        refusals.contains("confab_refusals_total{reason=\"origin\"} 2"),
        "{refusals}"
    );
    Ok(())
}

/// gRPC-web body size: a call whose message is over `--max-frame-bytes`, in
/// either mode, is refused with OUT_OF_RANGE on its length prefix, before
/// the message is read; nothing is stored and the browser's subscription goes
/// on.
#[tokio::test]
async fn grpc_web_body_over_the_frame_limit_is_refused() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    let conversation = server.open_direct(&alice, &bob).await?;
    let (mut browser, _) = server.grpc_web_synced(&alice, "browser", 0).await?;
    let limit = 64 * 1024;

    let huge = "x".repeat(limit + 1);
    match browser.send_reply(conversation, "huge", &huge).await? {
        Reply::Error(error) => {
            // tonic's code for a message over the decode limit of a unary call.
            assert_eq!(error.code, Code::OutOfRange as i32, "{error:?}");
            assert!(!error.fatal, "{error:?}");
        }
        other => bail!("an oversized submit got {other:?}"),
    }
    // Declared far beyond the limit, with little behind it: refused on the
    // prefix, in the text and the binary mode.
    let submit = SubmitRequest {
        device_id: "browser".into(),
        frame: None,
    };
    for (content_type, text) in [(WEB_TEXT, true), (WEB, false)] {
        let bearer = format!("Bearer {}", alice.access_token);
        let answer = raw_web_call(
            server.addr(),
            "POST",
            "/confab.v1.Edge/Submit",
            &[("Content-Type", content_type), ("Authorization", &bearer)],
            &web_body_declaring(&submit.encode_to_vec(), 1 << 30, text),
        )
        .await?;
        assert_eq!(
            answer.grpc_status(),
            Some(Code::OutOfRange as i32),
            "{content_type}: {answer:?}"
        );
    }

    let history = server.history(&alice, conversation, 0, 0, 10).await?;
    assert!(history.messages.is_empty(), "{history:?}");
    browser.send(conversation, "small", "fits").await?;
    Ok(())
}
