//! Presence, last seen and typing (DESIGN.md section 7): online while a device
//! heartbeats, last seen when the last one goes, visible by the privacy rules,
//! changes only to watchers; typing only to online members, never stored.

use std::time::{Duration, Instant};

use confab_proto::v1::{
    CreateChannelRequest, Event, LastSeenVisibility, Presence, ServerFrame, WatchPresence, event,
};

use super::*;

/// How often a foreground client heartbeats in the tests with a short window.
const BEAT: Duration = Duration::from_millis(500);

/// The presence window of the tests that wait for expiry.
const WINDOW_MS: u64 = 1_500;

/// The typing TTL of the typing test.
const TYPING_TTL_MS: u64 = 800;

/// How far a last seen may be from the moment the test expects (clock steps of
/// the server's batching, and scheduling).
const SLACK_MS: i64 = 1_000;

/// Milliseconds since the Unix epoch, like `last_seen_ms`.
fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// The presence a watcher gets for a user it may see nothing more of.
fn presence(user_id: i64, online: bool, last_seen_ms: i64) -> Presence {
    Presence {
        user_id,
        online,
        last_seen_ms,
    }
}

/// The presence carried by a frame, if it is a presence event.
fn presence_in(frame: &ServerFrame) -> Option<&Presence> {
    match &frame.kind {
        Some(server_frame::Kind::Event(Event {
            kind: Some(event::Kind::Presence(presence)),
            ..
        })) => Some(presence),
        _ => None,
    }
}

/// Returns `user_id`'s next presence event with `online`; events of the same
/// user with the other flag are skipped (a server may repeat the current state,
/// e.g. after a privacy change).
async fn next_change<T: Transport>(
    conn: &mut Conn<T>,
    user_id: i64,
    online: bool,
) -> Result<Presence> {
    loop {
        let presence = conn.next_presence().await?;
        assert_eq!(presence.user_id, user_id, "{presence:?}");
        if presence.online == online {
            return Ok(presence);
        }
    }
}

/// A user is online from their first device's connection until their last one
/// closes: closing one of two devices sends no offline, closing the last sends
/// offline at once with last seen = that device's last heartbeat.
#[tokio::test]
async fn online_until_the_last_device_closes() -> Result<()> {
    let (server, [alice, bob]) = Server::start_with_users(["alice", "bob"]).await?;
    server.open_direct(&bob, &alice).await?;
    // Over proto3 JSON, so that the mapping of presence events is checked too.
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Json, "bob", 0).await?;
    let snapshot = bob_conn.watch_presence(&[alice.id()]).await?;
    assert_eq!(snapshot, vec![presence(alice.id(), false, 0)], "never seen");

    let (phone, _) = server.grpc_synced(&alice, "phone", 0).await?;
    let online = bob_conn.next_presence().await?;
    assert_eq!(
        (online.user_id, online.online),
        (alice.id(), true),
        "{online:?}"
    );
    let (mut laptop, _) = server.grpc_synced(&alice, "laptop", 0).await?;
    // The call ends only once the server has retired the phone: the pong comes
    // after anything its close caused.
    phone.close().await?;
    bob_conn.ping(1).await?;
    for frame in bob_conn.take_queued() {
        if let Some(presence) = presence_in(&frame) {
            assert!(
                presence.online,
                "offline with the laptop still connected: {presence:?}"
            );
        }
    }

    let before_heartbeat = now_ms();
    laptop.heartbeat().await?;
    let after_heartbeat = now_ms();
    laptop.close().await?;
    let offline = bob_conn.next_presence().await?;
    assert_eq!(
        (offline.user_id, offline.online),
        (alice.id(), false),
        "{offline:?}"
    );
    assert!(
        (before_heartbeat - SLACK_MS..=after_heartbeat + SLACK_MS).contains(&offline.last_seen_ms),
        "last seen {} is not the last heartbeat ({before_heartbeat}..={after_heartbeat})",
        offline.last_seen_ms
    );
    bob_conn.expect_quiet(2).await?;
    let asked = server.get_presence(&bob, &[alice.id()]).await?;
    assert_eq!(asked, vec![offline], "GetPresence agrees with the event");
    Ok(())
}

/// A device that stops heartbeating without closing (a phone that lost its
/// network, or an app sent to the background) makes its user offline after the
/// window, while a client heartbeating every 500 ms stays online. The connection
/// itself stays open (a background app still receives messages) and its next
/// heartbeat brings the user back online.
#[tokio::test]
async fn a_silent_connection_goes_offline_after_the_window() -> Result<()> {
    let server = Server::start_with(&["--presence-window-ms", &WINDOW_MS.to_string()]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    server.open_direct(&bob, &alice).await?;
    server.open_direct(&bob, &carol).await?;

    // Carol connects first: without her heartbeats she would expire before alice.
    let (carol_conn, _) = server.grpc_synced(&carol, "carol", 0).await?;
    let carol_beating = carol_conn.keep_alive(BEAT);
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let snapshot = bob_conn.watch_presence(&[alice.id(), carol.id()]).await?;
    let online: Vec<(i64, bool)> = snapshot.iter().map(|p| (p.user_id, p.online)).collect();
    assert_eq!(
        online,
        vec![(alice.id(), false), (carol.id(), true)],
        "{snapshot:?}"
    );
    let mut bob_beating = bob_conn.keep_alive(BEAT);

    let connected = Instant::now();
    let connected_ms = now_ms();
    let (mut silent, _) = server.grpc_synced(&alice, "silent", 0).await?;
    let online = bob_beating.next_presence().await?;
    assert_eq!(
        (online.user_id, online.online),
        (alice.id(), true),
        "{online:?}"
    );
    let offline = bob_beating.next_presence().await?;
    let waited = connected.elapsed();
    assert_eq!(
        (offline.user_id, offline.online),
        (alice.id(), false),
        "the silent device goes, not the heartbeating one: {offline:?}"
    );
    assert!(
        waited >= Duration::from_millis(WINDOW_MS - 100),
        "offline after {waited:?}, before the window of {WINDOW_MS} ms"
    );
    assert!(
        (connected_ms - SLACK_MS..=connected_ms + SLACK_MS).contains(&offline.last_seen_ms),
        "last seen {} is not the connection's opening ({connected_ms})",
        offline.last_seen_ms
    );
    silent
        .heartbeat()
        .await
        .context("the silent connection is kept")?;
    let back = bob_beating.next_presence().await?;
    assert_eq!(
        (back.user_id, back.online),
        (alice.id(), true),
        "a heartbeat brings alice back: {back:?}"
    );

    let carol_now = server.get_presence(&bob, &[carol.id()]).await?;
    assert_eq!(
        carol_now.iter().map(|p| p.online).collect::<Vec<_>>(),
        vec![true],
        "heartbeats keep carol online: {carol_now:?}"
    );
    let mut carol_conn = carol_beating.stop().await?;
    carol_conn
        .ping(1)
        .await
        .context("carol's connection is kept")?;
    let mut bob_conn = bob_beating.stop().await?;
    bob_conn.ping(2).await?;
    Ok(())
}

/// Last seen is durable: after a graceful restart (SIGTERM) a user who went
/// offline before has the same last seen, and one connected at the shutdown is
/// offline with a last seen of then.
#[tokio::test]
async fn last_seen_survives_a_restart() -> Result<()> {
    let mut server = Server::start().await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let dave = server.register("dave").await?;
    server.open_direct(&bob, &alice).await?;
    server.open_direct(&bob, &dave).await?;
    let (alice_conn, _) = server.grpc_synced(&alice, "phone", 0).await?;
    alice_conn.close().await?;
    let before = server.get_presence(&bob, &[alice.id()]).await?;
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(
        !before[0].online && before[0].last_seen_ms > 0,
        "{before:?}"
    );

    let dave_connected_ms = now_ms();
    let (_dave_conn, _) = server.grpc_synced(&dave, "phone", 0).await?;
    let status = server.terminate().await?;
    assert!(status.success(), "SIGTERM exit: {status}");
    let stopped_ms = now_ms();
    server.restart().await?;

    let after = server.get_presence(&bob, &[alice.id()]).await?;
    assert_eq!(after, before, "alice's last seen across the restart");
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let watched = bob_conn.watch_presence(&[alice.id()]).await?;
    assert_eq!(watched, before, "the watch snapshot agrees");

    let dave_now = server.get_presence(&bob, &[dave.id()]).await?;
    assert_eq!(dave_now.len(), 1, "{dave_now:?}");
    assert!(
        !dave_now[0].online,
        "nobody is online after a restart: {dave_now:?}"
    );
    assert!(
        (dave_connected_ms - SLACK_MS..=stopped_ms + SLACK_MS).contains(&dave_now[0].last_seen_ms),
        "dave was connected until the shutdown ({dave_connected_ms}..={stopped_ms}): {dave_now:?}"
    );
    Ok(())
}

/// Privacy: NOBODY hides last seen even from contacts (online stays visible to
/// them); CONTACTS (the default) tells a stranger nothing at all; EVERYONE
/// shows a stranger the last seen but never online. GetPrivacy returns the setting.
#[tokio::test]
async fn last_seen_follows_the_privacy_setting() -> Result<()> {
    let (server, [alice, bob, carol]) = Server::start_with_users(["alice", "bob", "carol"]).await?;
    server.open_direct(&bob, &alice).await?;
    let default = server.get_privacy(&alice).await?;
    assert!(
        matches!(
            default,
            LastSeenVisibility::Unspecified | LastSeenVisibility::Contacts
        ),
        "contacts by default: {default:?}"
    );
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let (mut carol_conn, _) = server.grpc_synced(&carol, "carol", 0).await?;

    // NOBODY: bob, a contact, sees alice online but never a last seen.
    let set = server
        .set_privacy(&alice, LastSeenVisibility::Nobody)
        .await?;
    assert_eq!(set, LastSeenVisibility::Nobody);
    assert_eq!(
        server.get_privacy(&alice).await?,
        LastSeenVisibility::Nobody
    );
    let snapshot = bob_conn.watch_presence(&[alice.id()]).await?;
    assert_eq!(snapshot, vec![presence(alice.id(), false, 0)]);
    let (alice_conn, _) = server.grpc_synced(&alice, "phone", 0).await?;
    let online = next_change(&mut bob_conn, alice.id(), true).await?;
    assert_eq!(online, presence(alice.id(), true, 0));
    alice_conn.close().await?;
    let offline = next_change(&mut bob_conn, alice.id(), false).await?;
    assert_eq!(offline, presence(alice.id(), false, 0));
    let asked = server.get_presence(&bob, &[alice.id()]).await?;
    assert_eq!(
        asked,
        vec![presence(alice.id(), false, 0)],
        "GetPresence hides it too"
    );

    // CONTACTS: carol shares no conversation with alice and learns nothing.
    let set = server
        .set_privacy(&alice, LastSeenVisibility::Contacts)
        .await?;
    assert_eq!(set, LastSeenVisibility::Contacts);
    assert_eq!(
        server.get_privacy(&alice).await?,
        LastSeenVisibility::Contacts
    );
    let snapshot = carol_conn.watch_presence(&[alice.id()]).await?;
    assert!(
        snapshot.is_empty(),
        "a stranger's watch snapshot: {snapshot:?}"
    );
    let asked = server.get_presence(&carol, &[alice.id()]).await?;
    assert!(asked.is_empty(), "a stranger's GetPresence: {asked:?}");
    let (alice_conn, _) = server.grpc_synced(&alice, "phone", 0).await?;
    next_change(&mut bob_conn, alice.id(), true).await?;
    carol_conn
        .expect_quiet(1)
        .await
        .context("alice came online")?;
    alice_conn.close().await?;
    let seen = next_change(&mut bob_conn, alice.id(), false).await?;
    assert!(
        seen.last_seen_ms > 0,
        "a contact sees the last seen: {seen:?}"
    );
    carol_conn
        .expect_quiet(2)
        .await
        .context("alice went offline")?;

    // EVERYONE: carol sees the last seen, never whether alice is online.
    let set = server
        .set_privacy(&alice, LastSeenVisibility::Everyone)
        .await?;
    assert_eq!(set, LastSeenVisibility::Everyone);
    assert_eq!(
        server.get_privacy(&alice).await?,
        LastSeenVisibility::Everyone
    );
    let expected = vec![presence(alice.id(), false, seen.last_seen_ms)];
    assert_eq!(server.get_presence(&carol, &[alice.id()]).await?, expected);
    assert_eq!(carol_conn.watch_presence(&[alice.id()]).await?, expected);
    let (alice_conn, _) = server.grpc_synced(&alice, "phone", 0).await?;
    next_change(&mut bob_conn, alice.id(), true).await?;
    carol_conn.ping(3).await?;
    for frame in carol_conn.take_queued() {
        if let Some(presence) = presence_in(&frame) {
            assert!(
                !presence.online,
                "a stranger learnt alice is online: {presence:?}"
            );
        }
    }
    let asked = server.get_presence(&carol, &[alice.id()]).await?;
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        !asked[0].online,
        "a stranger learnt alice is online: {asked:?}"
    );
    alice_conn.close().await?;
    let again = next_change(&mut bob_conn, alice.id(), false).await?;
    assert!(
        again.last_seen_ms >= seen.last_seen_ms,
        "{again:?} after {seen:?}"
    );
    // Whether a stranger gets live changes is open; whatever comes never says online.
    carol_conn.ping(4).await?;
    for frame in carol_conn.take_queued() {
        if let Some(presence) = presence_in(&frame) {
            assert!(
                !presence.online,
                "a stranger learnt alice was online: {presence:?}"
            );
        }
    }
    let asked = server.get_presence(&carol, &[alice.id()]).await?;
    assert_eq!(asked, vec![presence(alice.id(), false, again.last_seen_ms)]);
    Ok(())
}

/// Presence changes go only to connections that watch the user: a member of a
/// shared group who does not watch gets none, and a watch list replaced by
/// another no longer gets the first user's changes; more than 256 users are
/// refused.
#[tokio::test]
async fn presence_changes_reach_watchers_only() -> Result<()> {
    let (server, [alice, bob, dave, erin]) =
        Server::start_with_users(["alice", "bob", "dave", "erin"]).await?;
    server.open_direct(&bob, &alice).await?;
    server.open_direct(&bob, &erin).await?;
    server.create_group(&alice, "team", &[dave.id()]).await?;
    let (mut dave_conn, _) = server.grpc_synced(&dave, "dave", 0).await?;
    let (mut bob_conn, _) = server.grpc_synced(&bob, "bob", 0).await?;
    let snapshot = bob_conn.watch_presence(&[alice.id()]).await?;
    assert_eq!(snapshot, vec![presence(alice.id(), false, 0)]);

    let (alice_conn, _) = server.grpc_synced(&alice, "phone", 0).await?;
    let online = bob_conn.next_presence().await?;
    assert_eq!(
        (online.user_id, online.online),
        (alice.id(), true),
        "{online:?}"
    );
    dave_conn
        .expect_quiet(1)
        .await
        .context("dave shares a group but does not watch")?;

    let snapshot = bob_conn.watch_presence(&[erin.id()]).await?;
    assert_eq!(snapshot, vec![presence(erin.id(), false, 0)]);
    alice_conn.close().await?;
    bob_conn
        .expect_quiet(2)
        .await
        .context("alice is no longer watched")?;
    dave_conn.expect_quiet(3).await?;
    let (_erin_conn, _) = server.grpc_synced(&erin, "phone", 0).await?;
    let online = bob_conn.next_presence().await?;
    assert_eq!(
        (online.user_id, online.online),
        (erin.id(), true),
        "{online:?}"
    );

    let too_many = WatchPresence {
        user_ids: (1..=257).collect(),
    };
    let reply = bob_conn
        .request(client_frame::Kind::WatchPresence(too_many))
        .await?;
    let Reply::Error(error) = reply else {
        panic!("257 users watched: {reply:?}");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("bad_request", false),
        "{error:?}"
    );
    bob_conn.ping(4).await.context("still usable")?;
    Ok(())
}

/// Typing goes only to the other online members, stops when stopped or after
/// the TTL, is never synced, is refused to strangers and in channels, and is
/// rate limited without closing the connection.
#[tokio::test]
async fn typing_reaches_online_members_only() -> Result<()> {
    let server = Server::start_with(&["--typing-ttl-ms", &TYPING_TTL_MS.to_string()]).await?;
    let alice = server.register("alice").await?;
    let bob = server.register("bob").await?;
    let carol = server.register("carol").await?;
    let dave = server.register("dave").await?;
    let group = server
        .create_group(&alice, "trio", &[bob.id(), carol.id()])
        .await?
        .id;
    let (mut alice_conn, _) = server.grpc_synced(&alice, "alice", 0).await?;
    // Over proto3 JSON, so that the mapping of typing events is checked too.
    let (mut bob_conn, _) = server.ws_synced(&bob, Encoding::Json, "bob", 0).await?;

    alice_conn.typing(group, true).await?;
    let typing = bob_conn.next_typing().await?;
    assert_eq!(
        (typing.conversation_id, typing.user_id, typing.typing),
        (group, alice.id(), true),
        "{typing:?}"
    );
    alice_conn
        .expect_quiet(1)
        .await
        .context("the typer's device gets nothing")?;
    // Carol comes online while alice types: nothing of it is synced to her.
    let (mut carol_conn, carol_synced) = server.grpc_synced(&carol, "carol", 0).await?;
    let synced_typing: Vec<&Event> = carol_synced
        .events
        .iter()
        .filter(|event| matches!(event.kind, Some(event::Kind::Typing(_))))
        .collect();
    assert!(synced_typing.is_empty(), "typing synced: {synced_typing:?}");
    carol_conn
        .expect_quiet(2)
        .await
        .context("typing from before carol connected")?;
    alice_conn.typing(group, false).await?;
    let stopped = bob_conn.next_typing().await?;
    assert_eq!(
        (stopped.user_id, stopped.typing),
        (alice.id(), false),
        "{stopped:?}"
    );

    // A "typing" never stopped expires by itself.
    alice_conn.typing(group, true).await?;
    assert!(bob_conn.next_typing().await?.typing);
    let started = Instant::now();
    let expired = bob_conn.next_typing().await?;
    let waited = started.elapsed();
    assert_eq!(
        (expired.user_id, expired.typing),
        (alice.id(), false),
        "{expired:?}"
    );
    assert!(
        waited >= Duration::from_millis(TYPING_TTL_MS / 2),
        "expired after {waited:?}, the TTL is {TYPING_TTL_MS} ms"
    );

    let (mut dave_conn, _) = server.grpc_synced(&dave, "dave", 0).await?;
    let Reply::Error(error) = dave_conn.typing_reply(group, true).await? else {
        panic!("a stranger typed into the group");
    };
    assert_eq!(
        (error.code, error.reason.as_str(), error.fatal),
        (Code::NotFound as i32, "not_found", false),
        "{error:?}"
    );
    let request = CreateChannelRequest {
        name: "news".into(),
        ..CreateChannelRequest::default()
    };
    let mut alice_client = server.conversations(&alice).await?;
    let channel = alice_client.create_channel(request).await?.into_inner().id;
    let Reply::Error(error) = alice_conn.typing_reply(channel, true).await? else {
        panic!("typing accepted in a channel");
    };
    assert_eq!(
        (error.reason.as_str(), error.fatal),
        ("bad_request", false),
        "{error:?}"
    );
    bob_conn.ping(3).await?;
    let leaked: Vec<ServerFrame> = bob_conn
        .take_queued()
        .into_iter()
        .filter(|frame| {
            matches!(
                &frame.kind,
                Some(server_frame::Kind::Event(Event {
                    kind: Some(event::Kind::Typing(_)),
                    ..
                }))
            )
        })
        .collect();
    assert!(leaked.is_empty(), "refused typing reached bob: {leaked:?}");

    // A burst beyond the rate limit (60 a minute by default).
    let mut refs = Vec::new();
    for i in 0..100 {
        let typing = confab_proto::v1::Typing {
            conversation_id: group,
            typing: i % 2 == 0,
        };
        refs.push(
            alice_conn
                .send_kind(client_frame::Kind::Typing(typing))
                .await?,
        );
    }
    let mut limited = 0;
    for r#ref in refs {
        match alice_conn.reply_to(r#ref).await? {
            Reply::Done => {}
            Reply::Error(error) => {
                assert_eq!(
                    (error.code, error.reason.as_str(), error.fatal),
                    (Code::ResourceExhausted as i32, "rate_limited", false),
                    "{error:?}"
                );
                limited += 1;
            }
            Reply::Sent(ack) => panic!("typing answered with an ack: {ack:?}"),
        }
    }
    assert!(limited > 0, "100 typing frames at once, none limited");
    alice_conn
        .send(group, "after-burst", "still here")
        .await
        .context("the connection stays usable")?;
    alice_conn.ping(4).await?;
    Ok(())
}
