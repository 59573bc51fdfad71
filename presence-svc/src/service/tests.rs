//! Behaviour of the service through the generated `Presences` trait, with the
//! real group-svc and a recording bus; paused clocks where timers matter.

use std::time::Duration;

use confab_proto::presence::v1::presences_server::Presences;
use confab_proto::presence::v1::{
    DisconnectRequest, GetPrivacyRequest, HeartbeatRequest, QueryRequest, QueryResponse,
    SetPrivacyRequest, TypingRequest,
};
use confab_proto::v1::{LastSeenVisibility, Presence};
use tonic::{Code, Request, Status};

use crate::PresenceService;
use crate::testing::{Fixture, GroupSvc, STRANGER, WINDOW, advance, in_memory, on_sqlite, settle};

async fn heartbeat(service: &PresenceService, user_id: i64, connection_id: u64) {
    try_heartbeat(service, user_id, connection_id)
        .await
        .unwrap();
}

async fn try_heartbeat(
    service: &PresenceService,
    user_id: i64,
    connection_id: u64,
) -> Result<(), Status> {
    let request = HeartbeatRequest {
        user_id,
        device_id: format!("device-{connection_id}"),
        connection_id,
        node: "node-a".into(),
    };
    Presences::heartbeat(service, Request::new(request)).await?;
    Ok(())
}

async fn disconnect(service: &PresenceService, user_id: i64, connection_id: u64) {
    let request = DisconnectRequest {
        user_id,
        device_id: format!("device-{connection_id}"),
        connection_id,
        node: "node-a".into(),
    };
    Presences::disconnect(service, Request::new(request))
        .await
        .unwrap();
}

async fn query(service: &PresenceService, watcher_id: i64, user_ids: &[i64]) -> QueryResponse {
    let request = QueryRequest {
        watcher_id,
        user_ids: user_ids.to_vec(),
    };
    Presences::query(service, Request::new(request))
        .await
        .unwrap()
        .into_inner()
}

/// Returns `(user_id, online, last_seen_ms)` of each presence in the answer.
async fn presences(
    service: &PresenceService,
    watcher_id: i64,
    ids: &[i64],
) -> Vec<(i64, bool, i64)> {
    let response = query(service, watcher_id, ids).await;
    response
        .presences
        .iter()
        .map(
            |&Presence {
                 user_id,
                 online,
                 last_seen_ms,
             }| (user_id, online, last_seen_ms),
        )
        .collect()
}

/// Returns the user's own last seen (their latest heartbeat while online).
async fn own_last_seen(service: &PresenceService, user_id: i64) -> i64 {
    presences(service, user_id, &[user_id]).await[0].2
}

async fn typing(
    service: &PresenceService,
    user_id: i64,
    conversation_id: i64,
    typing: bool,
) -> Result<(), Status> {
    let request = TypingRequest {
        user_id,
        conversation_id,
        typing,
    };
    Presences::typing(service, Request::new(request)).await?;
    Ok(())
}

async fn set_privacy(service: &PresenceService, user_id: i64, last_seen: LastSeenVisibility) {
    let request = SetPrivacyRequest {
        user_id,
        last_seen: last_seen.into(),
    };
    Presences::set_privacy(service, Request::new(request))
        .await
        .unwrap();
}

async fn get_privacy(service: &PresenceService, user_id: i64) -> LastSeenVisibility {
    let request = GetPrivacyRequest { user_id };
    Presences::get_privacy(service, Request::new(request))
        .await
        .unwrap()
        .into_inner()
        .last_seen()
}

/// A user with two devices goes online with the first and offline only when
/// the last disconnects, with last seen = the last heartbeat of any device.
#[tokio::test(start_paused = true)]
async fn online_until_last_device_leaves() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let u = groups.u;
    heartbeat(&service, u[2], 1).await;
    let first = own_last_seen(&service, u[2]).await;
    assert_eq!(bus.take_presence(), vec![(u[2], true, first)]);
    advance(Duration::from_secs(3)).await;
    heartbeat(&service, u[2], 2).await;
    heartbeat(&service, u[2], 1).await;
    assert_eq!(bus.take_presence(), vec![], "already online");
    assert_eq!(
        presences(&service, u[1], &[u[2]]).await,
        vec![(u[2], true, first + 3_000)]
    );
    disconnect(&service, u[2], 1).await;
    disconnect(&service, u[2], 1).await;
    assert_eq!(bus.take_presence(), vec![], "the laptop is still there");
    advance(Duration::from_secs(2)).await;
    disconnect(&service, u[2], 2).await;
    assert_eq!(bus.take_presence(), vec![(u[2], false, first + 3_000)]);
    assert_eq!(
        presences(&service, u[1], &[u[2]]).await,
        vec![(u[2], false, first + 3_000)]
    );
    assert_eq!(service.online_users(), 0);
}

/// A connection that stops heartbeating without a Disconnect is dropped by the
/// sweeper once its last heartbeat is a window old; one that keeps
/// heartbeating stays.
#[tokio::test(start_paused = true)]
async fn silent_connection_expires() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let u = groups.u;
    heartbeat(&service, u[2], 1).await;
    heartbeat(&service, u[3], 2).await;
    let seen = own_last_seen(&service, u[2]).await;
    bus.take_presence();
    for step in [5_000, 5_000, 4_900] {
        advance(Duration::from_millis(step)).await;
        heartbeat(&service, u[3], 2).await;
        assert_eq!(bus.take_presence(), vec![], "within the window");
    }
    // One sweep period (1.2 s) past the window at most.
    advance(Duration::from_millis(1_300)).await;
    assert_eq!(bus.take_presence(), vec![(u[2], false, seen)]);
    assert_eq!(
        presences(&service, u[1], &[u[2]]).await,
        vec![(u[2], false, seen)]
    );
    assert_eq!(service.online_users(), 1, "user 3 heartbeats");
}

/// Last seen is durable: written when the user goes offline (flushed at
/// shutdown at the latest, which also marks the online offline) and read back
/// after a reopen; heartbeats are refused after shutdown.
#[tokio::test]
async fn last_seen_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let groups = GroupSvc::open().await;
    let u = groups.u;
    let Fixture { service, bus, .. } = on_sqlite(dir.path(), &groups).await;
    heartbeat(&service, u[2], 1).await;
    heartbeat(&service, u[3], 2).await;
    disconnect(&service, u[2], 1).await;
    let two = own_last_seen(&service, u[2]).await;
    let three = own_last_seen(&service, u[3]).await;
    set_privacy(&service, u[4], LastSeenVisibility::Nobody).await;
    bus.take_presence();
    service.shutdown().await;
    assert_eq!(bus.take_presence(), vec![(u[3], false, three)]);
    let refused = try_heartbeat(&service, u[2], 1).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert_eq!(service.store_writes(), 2);
    drop(service);

    let Fixture { service, .. } = on_sqlite(dir.path(), &groups).await;
    assert_eq!(
        presences(&service, u[1], &[u[2], u[3]]).await,
        vec![(u[2], false, two), (u[3], false, three)]
    );
    assert_eq!(
        get_privacy(&service, u[4]).await,
        LastSeenVisibility::Nobody
    );
    // A user coming back keeps their stored privacy.
    heartbeat(&service, u[4], 9).await;
    disconnect(&service, u[4], 9).await;
    assert_eq!(
        presences(&service, u[1], &[u[4]]).await,
        vec![(u[4], false, 0)]
    );
    service.shutdown().await;
}

/// Privacy: contacts see online and (unless NOBODY) last seen; strangers see
/// last seen only under EVERYONE, never online, and otherwise nothing at all;
/// the user always sees their own.
#[tokio::test(start_paused = true)]
async fn privacy_rules() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let u = groups.u;
    let stranger = u[STRANGER];
    assert_eq!(
        get_privacy(&service, u[2]).await,
        LastSeenVisibility::Contacts
    );
    for n in [2, 3, STRANGER] {
        heartbeat(&service, u[n], n as u64).await;
        disconnect(&service, u[n], n as u64).await;
    }
    let seen = own_last_seen(&service, u[2]).await;
    bus.take_presence();

    // CONTACTS (the default): 2 shares the direct conversation with 1, the
    // stranger shares nothing.
    assert_eq!(
        presences(&service, u[1], &[u[2], stranger]).await,
        vec![(u[2], false, seen)]
    );
    assert_eq!(
        presences(&service, stranger, &[u[1], u[2], u[3]]).await,
        vec![]
    );
    assert!(
        query(&service, stranger, &[u[1], u[2], u[3]])
            .await
            .watchable_ids
            .is_empty()
    );

    // EVERYONE: a stranger sees last seen, but not that the user is online.
    set_privacy(&service, u[2], LastSeenVisibility::Everyone).await;
    assert_eq!(
        presences(&service, stranger, &[u[2]]).await,
        vec![(u[2], false, seen)]
    );
    advance(Duration::from_secs(1)).await;
    heartbeat(&service, u[2], 2).await;
    let now = own_last_seen(&service, u[2]).await;
    assert_eq!(
        presences(&service, stranger, &[u[2]]).await,
        vec![(u[2], false, now)]
    );
    assert_eq!(
        presences(&service, u[1], &[u[2]]).await,
        vec![(u[2], true, now)]
    );

    // NOBODY: contacts still see online, never last seen, also in events.
    set_privacy(&service, u[2], LastSeenVisibility::Nobody).await;
    disconnect(&service, u[2], 2).await;
    assert_eq!(
        bus.take_presence(),
        vec![(u[2], true, now), (u[2], false, 0)]
    );
    assert_eq!(
        presences(&service, u[1], &[u[2]]).await,
        vec![(u[2], false, 0)]
    );
    assert_eq!(presences(&service, stranger, &[u[2]]).await, vec![]);
    assert_eq!(
        presences(&service, u[2], &[u[2]]).await,
        vec![(u[2], false, now)]
    );

    // UNSPECIFIED means CONTACTS; an unknown value is refused.
    set_privacy(&service, u[2], LastSeenVisibility::Unspecified).await;
    assert_eq!(
        get_privacy(&service, u[2]).await,
        LastSeenVisibility::Contacts
    );
    let bad = SetPrivacyRequest {
        user_id: u[2],
        last_seen: 42,
    };
    let status = Presences::set_privacy(&service, Request::new(bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

/// Watchable ids are the users sharing a direct conversation or a group with
/// the watcher (not a channel, not the watcher), from one SharedWith call;
/// more than 256 ids are refused.
#[tokio::test(start_paused = true)]
async fn watchable_ids() {
    let Fixture {
        service, groups, ..
    } = in_memory().await;
    let u = groups.u;
    heartbeat(&service, u[3], 1).await;
    let three = own_last_seen(&service, u[3]).await;
    let asked = [u[1], u[2], u[3], u[4], u[5], u[STRANGER], u[3]];
    let response = query(&service, u[1], &asked).await;
    assert_eq!(response.watchable_ids, vec![u[2], u[3], u[4]]);
    let listed: Vec<(i64, bool, i64)> = response
        .presences
        .iter()
        .map(|p| (p.user_id, p.online, p.last_seen_ms))
        .collect();
    assert_eq!(
        listed,
        vec![
            (u[1], false, 0),
            (u[2], false, 0),
            (u[3], true, three),
            (u[4], false, 0)
        ]
    );
    assert_eq!(groups.calls("SharedWith"), 1);
    let too_many = QueryRequest {
        watcher_id: u[1],
        user_ids: (1..=257).collect(),
    };
    let status = Presences::query(&service, Request::new(too_many))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    query(&service, u[1], &(1..=256).collect::<Vec<_>>()).await;
}

/// 1,000 heartbeats of 100 users in one window write at most one row per user;
/// the next window refreshes each online user once more.
#[tokio::test(start_paused = true)]
async fn heartbeats_coalesce_into_batched_writes() {
    let Fixture { service, .. } = in_memory().await;
    let step = WINDOW / 10;
    for round in 0..10 {
        for user in 100..200 {
            heartbeat(&service, user, user as u64).await;
        }
        if round < 9 {
            advance(step).await;
        }
    }
    settle().await;
    let first_window = service.store_writes();
    println!("{first_window} writes for 1,000 heartbeats of 100 users");
    assert!((1..=100).contains(&first_window), "{first_window} writes");
    for _ in 0..10 {
        for user in 100..200 {
            heartbeat(&service, user, user as u64).await;
        }
        advance(step).await;
    }
    let two_windows = service.store_writes();
    assert!(two_windows <= 200, "{two_windows} writes");
}

/// Typing goes to the other members of the conversation only; a stop without
/// a start publishes nothing.
#[tokio::test(start_paused = true)]
async fn typing_reaches_other_members() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let GroupSvc {
        u, direct, group, ..
    } = groups.clone();
    typing(&service, u[1], group, true).await.unwrap();
    assert_eq!(
        bus.take_typing(),
        vec![(u[3], group, u[1], true), (u[4], group, u[1], true)]
    );
    typing(&service, u[1], group, false).await.unwrap();
    assert_eq!(
        bus.take_typing(),
        vec![(u[3], group, u[1], false), (u[4], group, u[1], false)]
    );
    typing(&service, u[1], group, false).await.unwrap();
    typing(&service, u[2], direct, false).await.unwrap();
    assert_eq!(bus.take_typing(), vec![]);
    typing(&service, u[2], direct, true).await.unwrap();
    assert_eq!(bus.take_typing(), vec![(u[1], direct, u[2], true)]);
    // The member lists come from the cache for 30 s.
    assert_eq!(groups.calls("GetConversation"), 2);
    advance(Duration::from_secs(31)).await;
    typing(&service, u[1], group, true).await.unwrap();
    assert_eq!(groups.calls("GetConversation"), 3);
}

/// Beyond `typing_per_minute` a user gets RESOURCE_EXHAUSTED with a retry
/// hint, others are unaffected, and a token comes back after a second.
#[tokio::test(start_paused = true)]
async fn typing_rate_limited() {
    let Fixture {
        service, groups, ..
    } = in_memory().await;
    let (u, group) = (groups.u, groups.group);
    for i in 0..60 {
        typing(&service, u[1], group, i % 2 == 0).await.unwrap();
    }
    let status = typing(&service, u[1], group, true).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (
            Code::ResourceExhausted,
            "typing rate limit exceeded, retry in 1000 ms"
        )
    );
    typing(&service, u[3], group, true).await.unwrap();
    advance(Duration::from_secs(1)).await;
    typing(&service, u[1], group, true).await.unwrap();
}

/// A started typing ends by itself after the ttl unless renewed, and when the
/// typist goes offline.
#[tokio::test(start_paused = true)]
async fn typing_expires() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let GroupSvc {
        u, direct, group, ..
    } = groups;
    typing(&service, u[2], direct, true).await.unwrap();
    advance(Duration::from_secs(4)).await;
    typing(&service, u[2], direct, true).await.unwrap();
    bus.take_typing();
    advance(Duration::from_secs(5)).await;
    assert_eq!(bus.take_typing(), vec![], "renewed at 4 s");
    // The ttl (6 s) after the renewal, plus one sweep period at most.
    advance(Duration::from_millis(2_200)).await;
    assert_eq!(bus.take_typing(), vec![(u[1], direct, u[2], false)]);

    heartbeat(&service, u[1], 1).await;
    typing(&service, u[1], group, true).await.unwrap();
    bus.take_typing();
    disconnect(&service, u[1], 1).await;
    assert_eq!(
        bus.take_typing(),
        vec![(u[3], group, u[1], false), (u[4], group, u[1], false)]
    );
}

/// Typing in a channel is INVALID_ARGUMENT; in a conversation the user is not
/// in, or one that does not exist, the same NOT_FOUND.
#[tokio::test(start_paused = true)]
async fn typing_refused_outside_conversations() {
    let Fixture {
        service,
        bus,
        groups,
    } = in_memory().await;
    let GroupSvc {
        u, group, channel, ..
    } = groups;
    let refused = typing(&service, u[1], channel, true).await.unwrap_err();
    assert_eq!(
        (refused.code(), refused.message()),
        (Code::InvalidArgument, "no typing in channels")
    );
    let outsider = typing(&service, u[STRANGER], group, true)
        .await
        .unwrap_err();
    let unknown = typing(&service, u[1], 999, true).await.unwrap_err();
    for status in [outsider, unknown] {
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such conversation")
        );
    }
    assert_eq!(bus.take_typing(), vec![]);
}
