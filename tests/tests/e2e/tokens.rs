//! Attacks on tokens (issue 7): each test presents a token that must no longer
//! work (expired, of another issuer, of an unknown key, logged out, outlived by
//! its connection) and shows it refused on every path, with the same terse error
//! as any bad token, while good tokens keep working.

use std::time::{Duration, Instant};

use confab_proto::v1::{LogoutRequest, Reauthenticate};
use confab_tests::accounts::Authed;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::*;

const SECRET: &str = "e2e-token-secret-e2e-token-secret-0123";

/// Signs `claims` with HS256 under `secret`, with key id `kid`.
fn sign(claims: &Value, secret: &str, kid: Option<&str>) -> Result<String> {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_secret(secret.as_bytes())?;
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

/// The claims of a Confab access token of `user_id` expiring `exp_offset`
/// seconds from now.
fn access_claims(user_id: i64, exp_offset: i64) -> Result<Value> {
    let now = i64::try_from(now_secs())?;
    Ok(json!({
        "sub": user_id.to_string(),
        "iss": "confab",
        "typ": "access",
        "iat": now - 1,
        "exp": now + exp_offset,
    }))
}

/// An `Accounts` client that sends `token`.
async fn accounts_as(server: &Server, token: &str) -> Result<AccountsClient<Authed>> {
    Ok(AccountsClient::with_interceptor(
        server.channel().await?,
        Bearer(Some(token.to_owned())),
    ))
}

/// Asserts that `token` is refused on every path (unary call, gRPC stream,
/// WebSocket header and query, token in the WebSocket hello) with the same
/// status and message as a garbage token, and returns that message.
async fn assert_refused(server: &Server, token: &str, what: &str) -> Result<String> {
    let garbage = accounts_as(server, "not-a-jwt")
        .await?
        .me(MeRequest {})
        .await
        .expect_err("a garbage token was accepted");
    let status = accounts_as(server, token)
        .await?
        .me(MeRequest {})
        .await
        .expect_err(what);
    assert_eq!(
        status.code(),
        Code::Unauthenticated,
        "unary, {what}: {status:?}"
    );
    assert_eq!(
        status.message(),
        garbage.message(),
        "unary, {what}: the same terse error as any bad token"
    );

    let mut conn = Conn::new(GrpcTransport::open(server, Some(token)).await?);
    conn.send_hello("", "d", 0).await?;
    let (frames, closed) = conn.expect_closed().await?;
    assert!(frames.is_empty(), "stream, {what}: frames {frames:?}");
    assert_eq!(
        closed.grpc_code,
        Some(Code::Unauthenticated),
        "stream, {what}"
    );
    assert_eq!(closed.detail, garbage.message(), "stream, {what}");

    for auth in [WsAuth::Header(token), WsAuth::Query(token)] {
        assert_eq!(
            upgrade_status(server, auth).await?,
            401,
            "ws upgrade, {what}"
        );
    }
    let mut ws = Conn::new(WsTransport::connect(server, WsAuth::None, Encoding::Binary).await?);
    ws.send_hello(token, "d", 0).await?;
    let (frames, _) = ws.expect_closed().await?;
    let [frame] = frames.as_slice() else {
        panic!("ws hello, {what}: expected one error frame, got {frames:?}");
    };
    let Some(server_frame::Kind::Error(error)) = &frame.kind else {
        panic!("ws hello, {what}: expected an error frame, got {frame:?}");
    };
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (16, "unauthenticated", true),
        "ws hello, {what}"
    );
    assert_eq!(error.message, garbage.message(), "ws hello, {what}");
    Ok(status.message().to_owned())
}

/// Asserts that `token` works for a unary call and a live connection.
async fn assert_accepted(server: &Server, token: &str, what: &str) -> Result<i64> {
    let me = accounts_as(server, token)
        .await?
        .me(MeRequest {})
        .await
        .with_context(|| format!("unary, {what}"))?
        .into_inner();
    let mut conn = Conn::new(GrpcTransport::open(server, Some(token)).await?);
    let welcome = conn
        .hello(&format!("accepted-{what}"), 0)
        .await
        .with_context(|| format!("stream, {what}"))?;
    assert_eq!(welcome.user_id, me.id, "stream, {what}");
    Ok(me.id)
}

/// Asserts that the connection ends with a fatal error frame of `reason`.
async fn assert_closed_with<T: Transport>(conn: &mut Conn<T>, reason: &str) -> Result<()> {
    let (frames, closed) = conn.expect_closed().await?;
    let error = frames.iter().find_map(|frame| match &frame.kind {
        Some(server_frame::Kind::Error(error)) => Some(error),
        _ => None,
    });
    let Some(error) = error else {
        panic!("closed ({closed:?}) without an error frame; frames {frames:?}");
    };
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (16, reason, true),
        "{error:?}"
    );
    Ok(())
}

/// An access token whose `exp` is further in the past than the leeway (30 s
/// by default) is refused at connect and on unary calls with the same error as
/// a garbage token; one that expired within the leeway is still accepted.
#[tokio::test]
async fn expired_token_is_refused_beyond_the_leeway() -> Result<()> {
    let server = Server::start_with(&["--jwt-secret", SECRET]).await?;
    let alice = server.register("alice").await?;

    let expired = sign(&access_claims(alice.id(), -60)?, SECRET, None)?;
    assert_refused(&server, &expired, "expired 60 s ago").await?;

    let within_leeway = sign(&access_claims(alice.id(), -10)?, SECRET, None)?;
    let id = assert_accepted(&server, &within_leeway, "expired 10 s ago").await?;
    assert_eq!(id, alice.id());
    Ok(())
}

/// With an external identity provider pinned to an issuer, a token signed with
/// its key but naming another issuer is refused like any bad token; the same
/// claims with the configured issuer are accepted.
#[tokio::test]
async fn wrong_issuer_is_refused() -> Result<()> {
    const APP_SECRET: &str = "the-identity-provider's-secret-0123456789";
    let server = Server::start_with(&[
        "--external-jwt-secret",
        APP_SECRET,
        "--external-jwt-issuer",
        "my-idp",
    ])
    .await?;
    let claims = |issuer: &str| json!({"sub": "carol", "iss": issuer, "iat": now_secs(), "exp": now_secs() + 600});
    let wrong = sign(&claims("another-idp"), APP_SECRET, Some("idp-key-1"))?;
    assert_refused(&server, &wrong, "another issuer").await?;
    let unissued = sign(
        &json!({"sub": "carol", "exp": now_secs() + 600}),
        APP_SECRET,
        None,
    )?;
    assert_refused(&server, &unissued, "no issuer").await?;

    let right = sign(&claims("my-idp"), APP_SECRET, Some("idp-key-1"))?;
    assert_accepted(&server, &right, "the configured issuer").await?;
    Ok(())
}

/// Confab's tokens name their key (`kid`, a fingerprint of the secret); a token
/// signed with the right secret but naming a key the server does not have is
/// refused; the same claims under the server's key id, or without one (tokens
/// minted before key ids), are accepted.
#[tokio::test]
async fn unknown_key_id_is_refused() -> Result<()> {
    let server = Server::start_with(&["--jwt-secret", SECRET]).await?;
    let alice = server.register("alice").await?;
    let header = jsonwebtoken::decode_header(&alice.access_token)?;
    let kid = header.kid.context("confab's tokens carry a key id")?;
    assert!(
        !kid.is_empty() && !SECRET.contains(&kid),
        "the key id is a fingerprint, not the secret: {kid}"
    );
    let refresh_kid = jsonwebtoken::decode_header(&alice.refresh_token)?.kid;
    assert_eq!(refresh_kid.as_deref(), Some(kid.as_str()));

    let claims = access_claims(alice.id(), 600)?;
    let unknown = sign(&claims, SECRET, Some("retired-key"))?;
    assert_refused(&server, &unknown, "unknown key id").await?;
    // Key ids are compared exactly.
    let similar = sign(&claims, SECRET, Some(&format!("{kid} ")))?;
    assert_refused(&server, &similar, "a near miss of the key id").await?;

    assert_accepted(&server, &sign(&claims, SECRET, Some(&kid))?, "our key id").await?;
    assert_accepted(&server, &sign(&claims, SECRET, None)?, "no key id").await?;
    Ok(())
}

/// `Accounts.Logout` revokes the calling session (its access and refresh
/// tokens) and closes that session's live connections, over both transports,
/// within seconds, with a fatal `logged_out` error frame; the user's other
/// sessions stay connected and can refresh. With `all_devices` every token
/// minted before the logout is revoked and every connection closed, while a
/// login after it works.
#[tokio::test]
async fn logout_closes_the_users_live_connections() -> Result<()> {
    let server = Server::start().await?;
    let registered = server.register("alice").await?;
    let phone = server.login("alice", PASSWORD).await?;
    let laptop = server.login("alice", PASSWORD).await?;
    let bob = server.register("bob").await?;
    let direct = server.open_direct(&registered, &bob).await?;

    let (mut phone_grpc, _) = server.grpc_synced(&phone, "phone-app", 0).await?;
    let (mut phone_ws, _) = server
        .ws_synced(&phone, Encoding::Json, "phone-web", 0)
        .await?;
    let (mut laptop_conn, _) = server.grpc_synced(&laptop, "laptop", 0).await?;
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;

    let started = Instant::now();
    accounts_as(&server, &phone.access_token)
        .await?
        .logout(LogoutRequest { all_devices: false })
        .await?;
    assert_closed_with(&mut phone_grpc, "logged_out").await?;
    assert_closed_with(&mut phone_ws, "logged_out").await?;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "closed within seconds: {:?}",
        started.elapsed()
    );
    laptop_conn
        .ping(1)
        .await
        .context("another session stays connected")?;
    bob_conn
        .ping(1)
        .await
        .context("another user stays connected")?;

    assert_refused(&server, &phone.access_token, "logged-out access token").await?;
    let mut accounts = server.accounts().await?;
    let refused = accounts
        .refresh(RefreshRequest {
            refresh_token: phone.refresh_token.clone(),
        })
        .await
        .expect_err("the logged-out session's refresh token still works");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refreshed = accounts
        .refresh(RefreshRequest {
            refresh_token: laptop.refresh_token.clone(),
        })
        .await
        .context("another session refreshes")?
        .into_inner();

    // Everything: the laptop's connection, its session before and after the
    // refresh, the registration's session.
    let started = Instant::now();
    accounts_as(&server, &refreshed.access_token)
        .await?
        .logout(LogoutRequest { all_devices: true })
        .await?;
    assert_closed_with(&mut laptop_conn, "logged_out").await?;
    assert!(started.elapsed() < Duration::from_secs(3));
    bob_conn
        .ping(2)
        .await
        .context("another user stays connected")?;
    for (what, token) in [
        ("laptop", &laptop.access_token),
        ("laptop refreshed", &refreshed.access_token),
        ("registration", &registered.access_token),
    ] {
        assert_refused(&server, token, what).await?;
    }
    for refresh_token in [&refreshed.refresh_token, &registered.refresh_token] {
        let request = RefreshRequest {
            refresh_token: refresh_token.clone(),
        };
        let status = accounts
            .refresh(request)
            .await
            .expect_err("refresh after logout");
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }

    // A new login is a new start.
    let again = server.login("alice", PASSWORD).await?;
    assert_accepted(&server, &again.access_token, "login after logout").await?;
    let (mut alice_conn, _) = server.grpc_synced(&again, "phone-app", 0).await?;
    let ack = bob_conn
        .send(direct, "after-logout", "still there?")
        .await?;
    let (_, message) = alice_conn.next_message().await?;
    assert_eq!(message.id, ack.message_id);
    Ok(())
}

/// A live connection is closed with a fatal `token_expired` error frame when
/// its access token expires (here a 2 s token and no leeway), unless it sent
/// `Reauthenticate` with a fresh token of the same user first: that one stays.
/// A token of another user or a bad one is refused without closing anything.
#[tokio::test]
async fn connection_outliving_its_token_is_closed() -> Result<()> {
    let server = Server::start_with(&[
        "--jwt-secret",
        SECRET,
        "--access-ttl-secs",
        "2",
        "--token-leeway-secs",
        "0",
    ])
    .await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let started = Instant::now();
    let (mut stays, _) = server
        .ws_synced(&alice, Encoding::Binary, "stays", 0)
        .await?;
    let (mut expires, _) = server.grpc_synced(&alice, "expires", 0).await?;

    let reauthenticate = |token: &str| {
        client_frame::Kind::Reauthenticate(Reauthenticate {
            token: token.to_owned(),
        })
    };
    let refused = [
        ("another user's", bob.access_token.clone()),
        ("garbage", "not-a-jwt".to_owned()),
        ("a refresh", alice.refresh_token.clone()),
    ];
    for (what, token) in refused {
        let Reply::Error(error) = stays.request(reauthenticate(&token)).await? else {
            panic!("reauthentication with {what} token accepted");
        };
        assert_eq!(
            (error.code, error.reason.as_str(), error.fatal),
            (16, "unauthenticated", false),
            "{what}: {error:?}"
        );
    }
    let fresh = sign(&access_claims(alice.id(), 600)?, SECRET, None)?;
    let reply = stays.request(reauthenticate(&fresh)).await?;
    assert!(matches!(reply, Reply::Done), "{reply:?}");

    assert_closed_with(&mut expires, "token_expired").await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at the token's expiry: {:?}",
        started.elapsed()
    );
    // Both opened with tokens of the same moment: this one outlived its own.
    stays
        .ping(7)
        .await
        .context("the reauthenticated connection stays")?;
    Ok(())
}

/// In the distributed mode (two gateways, NATS, PostgreSQL), a logout through
/// one gateway closes the session's connections held by the other within
/// seconds (the revocation travels on the live bus), leaves the user's other
/// session connected there, and that gateway refuses the logged-out token.
#[tokio::test]
async fn logout_reaches_connections_on_other_gateways() -> Result<()> {
    let _big = BIG_TESTS.lock().await;
    let cluster = confab_tests::Cluster::start().await?;
    let outcome = async {
        let (gw0, gw1) = (cluster.gateway(0), cluster.gateway(1));
        let alice = gw0.register("alice").await?;
        let other = gw0.login("alice", PASSWORD).await?;
        let (mut remote, _) = gw1.grpc_synced(&alice, "alice-app", 0).await?;
        let (mut remote_ws, _) = gw1
            .ws_synced(&alice, Encoding::Binary, "alice-web", 0)
            .await?;
        let (mut kept, _) = gw1.grpc_synced(&other, "alice-tablet", 0).await?;

        let started = Instant::now();
        accounts_as(gw0, &alice.access_token)
            .await?
            .logout(LogoutRequest { all_devices: false })
            .await?;
        assert_closed_with(&mut remote, "logged_out").await?;
        assert_closed_with(&mut remote_ws, "logged_out").await?;
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "closed within seconds: {:?}",
            started.elapsed()
        );
        kept.ping(1)
            .await
            .context("the other session stays connected")?;
        assert_refused(gw1, &alice.access_token, "logged out on the other gateway").await?;
        Ok(())
    }
    .await;
    cluster.with_logs(outcome)
}
