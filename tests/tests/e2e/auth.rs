//! Accounts and authentication: tokens, refresh, and refusing bad credentials.

use super::*;

/// Registering, logging in and refreshing give working tokens; a wrong password is refused.
#[tokio::test]
async fn register_login_refresh() -> Result<()> {
    let server = Server::start().await?;
    let registered = server.register("alice").await?;
    assert_eq!(registered.user.username, "alice");
    assert!(!registered.access_token.is_empty() && !registered.refresh_token.is_empty());

    let logged_in = server.login("alice", PASSWORD).await?;
    assert_eq!(
        logged_in.id(),
        registered.id(),
        "login returns the registered user"
    );

    let channel = server.channel().await?;
    let mut me = AccountsClient::with_interceptor(
        channel.clone(),
        Bearer(Some(logged_in.access_token.clone())),
    );
    let user = me.me(MeRequest {}).await?.into_inner();
    assert_eq!(
        (user.id, user.username.as_str()),
        (registered.id(), "alice")
    );

    let mut accounts = server.accounts().await?;
    let refresh = RefreshRequest {
        refresh_token: logged_in.refresh_token.clone(),
    };
    let refreshed = accounts.refresh(refresh).await?.into_inner();
    assert_eq!(
        refreshed.user.as_ref().map(|user| user.id),
        Some(registered.id())
    );
    let now_ms = i64::try_from(now_secs() * 1000)?;
    assert!(
        refreshed.access_expires_at_ms > now_ms,
        "a fresh token expires in the future"
    );
    let mut me =
        AccountsClient::with_interceptor(channel.clone(), Bearer(Some(refreshed.access_token)));
    assert_eq!(me.me(MeRequest {}).await?.into_inner().id, registered.id());

    let wrong = server
        .login("alice", "not the password")
        .await
        .expect_err("wrong password accepted");
    assert_eq!(
        status_code(&wrong),
        Some(Code::Unauthenticated),
        "wrong password: {wrong:#}"
    );
    let unknown = server
        .login("nobody", PASSWORD)
        .await
        .expect_err("unknown user accepted");
    assert_eq!(
        status_code(&unknown),
        Some(Code::Unauthenticated),
        "unknown user: {unknown:#}"
    );
    let again = server
        .register("alice")
        .await
        .expect_err("duplicate username accepted");
    assert!(
        status_code(&again).is_some(),
        "duplicate username: {again:#}"
    );
    Ok(())
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
    list.list(ListConversationsRequest::default())
        .await
        .context("a re-signed valid token must work")?;

    let expired = resign(&alice.access_token, SECRET, -3600)?;
    let foreign = resign(
        &alice.access_token,
        "some other secret entirely, 0123456789",
        600,
    )?;
    let bad_tokens: [(&str, Option<&str>); 5] = [
        ("none", None),
        ("garbage", Some("not-a-jwt")),
        ("foreign", Some(&foreign)),
        ("expired", Some(&expired)),
        ("refresh", Some(&alice.refresh_token)),
    ];
    for (what, token) in bad_tokens {
        let mut client = server.conversations_with(token).await?;
        let status = client
            .list(ListConversationsRequest::default())
            .await
            .expect_err(what);
        assert_eq!(
            status.code(),
            Code::Unauthenticated,
            "unary with {what} token: {status:?}"
        );

        let mut conn = Conn::new(GrpcTransport::open(&server, token).await?);
        conn.send_hello("", "d", 0).await?;
        let (frames, closed) = conn.expect_closed().await?;
        assert!(
            frames.is_empty(),
            "stream with {what} token got frames {frames:?}"
        );
        assert_eq!(
            closed.grpc_code,
            Some(Code::Unauthenticated),
            "stream with {what} token: {closed:?}"
        );

        let Some(token) = token else { continue };
        assert_eq!(
            upgrade_status(&server, WsAuth::Header(token)).await?,
            401,
            "ws header with {what} token"
        );
        assert_eq!(
            upgrade_status(&server, WsAuth::Query(token)).await?,
            401,
            "ws query with {what} token"
        );

        let mut ws =
            Conn::new(WsTransport::connect(&server, WsAuth::None, Encoding::Binary).await?);
        ws.send_hello(token, "d", 0).await?;
        let (frames, closed) = ws.expect_closed().await?;
        let [frame] = frames.as_slice() else {
            panic!("ws hello with {what} token: expected one error frame, got {frames:?}");
        };
        let Some(server_frame::Kind::Error(error)) = &frame.kind else {
            panic!("ws hello with {what} token: expected an error frame, got {frame:?}");
        };
        assert_eq!(
            (error.code, error.fatal),
            (16, true),
            "ws hello with {what} token: {error:?}"
        );
        assert_eq!(error.reason, "unauthenticated");
        assert!(closed.grpc_code.is_none(), "{closed:?}");
    }
    Ok(())
}

/// Tokens minted by a trusted external identity provider (shared secret, pinned
/// issuer) are accepted on unary calls and streams, their subject becoming a Confab
/// user on first use; the same token with another issuer is refused.
#[tokio::test]
async fn external_tokens_accepted() -> Result<()> {
    const APP_SECRET: &str = "the-app's-own-signing-secret-0123456789";
    let server = Server::start_with(&[
        "--external-jwt-secret",
        APP_SECRET,
        "--external-jwt-issuer",
        "my-app",
    ])
    .await?;
    let alice = server.register("alice").await?;
    let mint = |issuer: &str| -> Result<String> {
        let claims = json!({"sub": "carol", "iss": issuer, "exp": now_secs() + 600});
        let key = jsonwebtoken::EncodingKey::from_secret(APP_SECRET.as_bytes())?;
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        Ok(jsonwebtoken::encode(&header, &claims, &key)?)
    };
    let carol_token = mint("my-app")?;

    let mut carol = server.conversations_with(Some(&carol_token)).await?;
    let request = confab_proto::v1::OpenDirectRequest {
        user_id: 0,
        username: "alice".into(),
    };
    let conversation = carol.open_direct(request).await?.into_inner();
    assert!(conversation.member_ids.contains(&alice.id()));
    let carol_id = *conversation
        .member_ids
        .iter()
        .find(|&&id| id != alice.id())
        .context("carol is a member")?;

    let mut stream = Conn::new(GrpcTransport::open(&server, Some(&carol_token)).await?);
    let welcome = stream.hello("carol-phone", 0).await?;
    assert_eq!(
        welcome.user_id, carol_id,
        "the stream speaks for the same user"
    );
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice-phone", 0).await?;
    let ack = stream
        .send(conversation.id, "c1", "hello from carol")
        .await?;
    let (_, message) = alice_conn.next_message().await?;
    assert_eq!((message.id, message.sender_id), (ack.message_id, carol_id));

    let wrong_issuer = mint("someone-else")?;
    let mut refused = server.conversations_with(Some(&wrong_issuer)).await?;
    let status = refused
        .list(ListConversationsRequest::default())
        .await
        .expect_err("a token of another issuer was accepted");
    assert_eq!(status.code(), Code::Unauthenticated);
    Ok(())
}
