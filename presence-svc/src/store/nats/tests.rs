//! The NATS KV backend against a real `nats-server` (confab-common's testkit),
//! through the service: leases, last seen and privacy across instances, and the
//! expiry of a dead instance's users. Real clocks (the server's cannot be
//! paused), a 2 s window, and polling with deadlines.

use std::time::Duration;

use async_nats::jetstream::kv;
use confab_common::testkit::NatsServer;
use tokio::time::Instant;

use super::*;
use crate::PresenceService;
use crate::testing::{Fixture, GroupSvc, STRANGER, eventually, on_nats};

/// The window of these tests: leases are renewed every second.
const WINDOW: Duration = Duration::from_secs(2);

/// Returns `(online, last_seen_ms)` of `user_id` as `watcher_id` sees it, or
/// `None` when the watcher may see nothing.
async fn seen_by(service: &PresenceService, watcher_id: i64, user_id: i64) -> Option<(bool, i64)> {
    let result = service.query(watcher_id, &[user_id]).await.unwrap();
    result
        .presences
        .first()
        .map(|&(_, online, last_seen)| (online, last_seen))
}

/// Returns a handle on one of the buckets, through a client of its own.
async fn bucket_of(server: &NatsServer, name: &str) -> kv::Store {
    let client = async_nats::connect(server.url()).await.unwrap();
    async_nats::jetstream::new(client)
        .get_key_value(name)
        .await
        .unwrap()
}

/// A heartbeat puts the user online, for this instance and, through the
/// lease in `confab_presence`, for another one on the same NATS.
#[tokio::test]
async fn online_after_heartbeat_for_every_instance() {
    let server = NatsServer::start().await;
    let groups = GroupSvc::open().await;
    let u = groups.u;
    let Fixture { service: a, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    let Fixture { service: b, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    a.heartbeat(u[2], "node-a", 1).await.unwrap();
    let (online, last_seen) = seen_by(&a, u[1], u[2]).await.unwrap();
    assert!(online);
    assert!(last_seen > 0, "the heartbeat's time while online");

    let other = eventually("b sees 2 online", || async {
        seen_by(&b, u[1], u[2]).await.filter(|seen| seen.0)
    })
    .await;
    assert_eq!(other, (true, last_seen));
    let leases = bucket_of(&server, PRESENCE_BUCKET).await;
    let value = leases.get(u[2].to_string()).await.unwrap();
    let value = value.expect("a lease for user 2");
    let lease = decode_lease(&value).expect("a well-formed lease");
    assert_eq!(lease.last_heartbeat_ms, last_seen);
    a.shutdown().await;
    b.shutdown().await;
}

/// A disconnect of the last connection removes the lease and writes last
/// seen: both instances then show the user offline with that last seen.
#[tokio::test]
async fn offline_with_last_seen_after_disconnect() {
    let server = NatsServer::start().await;
    let groups = GroupSvc::open().await;
    let u = groups.u;
    let Fixture {
        service: a, bus, ..
    } = on_nats(&server.url(), WINDOW, &groups).await;
    let Fixture { service: b, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    a.heartbeat(u[2], "node-a", 1).await.unwrap();
    eventually("b sees 2 online", || async {
        seen_by(&b, u[1], u[2]).await.filter(|seen| seen.0)
    })
    .await;
    a.heartbeat(u[2], "node-a", 1).await.unwrap();
    let last = seen_by(&a, u[2], u[2]).await.unwrap().1;
    a.disconnect(u[2], "node-a", 1).await;
    assert_eq!(seen_by(&a, u[1], u[2]).await, Some((false, last)));
    assert_eq!(bus.take_presence().last(), Some(&(u[2], false, last)));

    eventually("b sees 2 offline with the last heartbeat", || async {
        (seen_by(&b, u[1], u[2]).await == Some((false, last))).then_some(())
    })
    .await;
    let leases = bucket_of(&server, PRESENCE_BUCKET).await;
    let last_seen = bucket_of(&server, LAST_SEEN_BUCKET).await;
    let key = u[2].to_string();
    eventually("the lease removed and last seen written", || async {
        let lease = leases.get(&key).await.unwrap();
        let stored = last_seen.get(&key).await.unwrap();
        let stored = stored.and_then(|value| decode_number(&value));
        (lease.is_none() && stored == Some(last)).then_some(())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// Heartbeats never write: under a heartbeat every 20 ms, the lease is
/// written when the user comes online and renewed at most once per half
/// window (the key's revision counts every write of the bucket, which holds
/// only this user), and it never lapses.
#[tokio::test]
async fn lease_writes_coalesced() {
    let server = NatsServer::start().await;
    let groups = GroupSvc::open().await;
    let user = groups.u[2];
    let Fixture { service, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    let leases = bucket_of(&server, PRESENCE_BUCKET).await;
    let started = Instant::now();
    let mut heartbeats = 0;
    while started.elapsed() < 3 * WINDOW / 2 + WINDOW {
        service.heartbeat(user, "node-a", 1).await.unwrap();
        heartbeats += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    // Let the writer finish what it was given, then count.
    service.shutdown().await;
    let history = leases.entry(user.to_string()).await.unwrap();
    let history = history.expect("a lease entry");
    // Online, the renewals, and the removal at shutdown.
    let period = WINDOW / 2;
    let renewals = u64::try_from(elapsed.as_millis() / period.as_millis()).unwrap();
    let writes = history.revision;
    assert!(
        writes <= 1 + renewals + 1,
        "{writes} writes in {elapsed:?} ({heartbeats} heartbeats)"
    );
    assert!(writes >= 3, "renewed while online: {writes} writes");
    assert!(matches!(history.operation, kv::Operation::Delete));
}

/// An instance that dies without a word (dropped, never shut down) leaves its
/// leases behind: another instance shows its users online until the window
/// after the last renewal, then offline, with the lease's last heartbeat as
/// last seen; the server removes the key on its own.
#[tokio::test]
async fn dead_instance_users_expire() {
    let server = NatsServer::start().await;
    let groups = GroupSvc::open().await;
    let u = groups.u;
    let key = u[2].to_string();
    let Fixture { service: a, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    a.heartbeat(u[2], "node-a", 1).await.unwrap();
    let last = seen_by(&a, u[2], u[2]).await.unwrap().1;
    let leases = bucket_of(&server, PRESENCE_BUCKET).await;
    eventually("the lease written", || async {
        leases.get(&key).await.unwrap()
    })
    .await;

    // Opened while the lease lives: loaded from the bucket, not the watch.
    let Fixture { service: b, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    assert_eq!(seen_by(&b, u[1], u[2]).await, Some((true, last)));
    drop(a);
    let dropped = Instant::now();
    eventually("b sees 2 offline", || async {
        (seen_by(&b, u[1], u[2]).await == Some((false, last))).then_some(())
    })
    .await;
    // The last renewal may be up to half a window old at the drop.
    assert!(
        dropped.elapsed() >= WINDOW / 2 - Duration::from_millis(100),
        "offline after {:?}, before the lease expired",
        dropped.elapsed()
    );
    eventually("the server expired the lease", || async {
        leases.get(&key).await.unwrap().is_none().then_some(())
    })
    .await;
    b.shutdown().await;
}

/// Last seen and privacy choices live in the buckets: a new instance (a
/// restarted process) answers as the old one did.
#[tokio::test]
async fn last_seen_and_privacy_survive_a_new_instance() {
    let server = NatsServer::start().await;
    let groups = GroupSvc::open().await;
    let u = groups.u;
    let Fixture { service: a, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    a.set_privacy(u[2], Visibility::Nobody).await.unwrap();
    a.set_privacy(u[3], Visibility::Everyone).await.unwrap();
    a.heartbeat(u[3], "node-a", 1).await.unwrap();
    a.heartbeat(u[2], "node-a", 2).await.unwrap();
    a.disconnect(u[3], "node-a", 1).await;
    let three = seen_by(&a, u[3], u[3]).await.unwrap().1;
    let two = seen_by(&a, u[2], u[2]).await.unwrap().1;
    // 2 is still online at shutdown, which marks them offline.
    a.shutdown().await;
    drop(a);

    let Fixture { service: b, .. } = on_nats(&server.url(), WINDOW, &groups).await;
    assert_eq!(b.privacy(u[2]).await.unwrap(), Visibility::Nobody);
    assert_eq!(b.privacy(u[3]).await.unwrap(), Visibility::Everyone);
    assert_eq!(b.privacy(u[4]).await.unwrap(), Visibility::Contacts);
    assert_eq!(seen_by(&b, u[3], u[3]).await, Some((false, three)));
    assert_eq!(seen_by(&b, u[STRANGER], u[3]).await, Some((false, three)));
    assert_eq!(seen_by(&b, u[2], u[2]).await, Some((false, two)));
    assert_eq!(seen_by(&b, u[1], u[2]).await, Some((false, 0)), "NOBODY");
    b.shutdown().await;
}

/// A lease value round-trips; malformed values are ignored.
#[test]
fn lease_value_round_trip() {
    let lease = OnlineLease {
        user_id: 7,
        since_ms: 1_000,
        last_heartbeat_ms: 2_000,
    };
    let value = encode_lease(&lease, 2_500, "owner-1");
    assert_eq!(value, "1000 2000 2500 owner-1");
    let decoded = LeaseValue {
        last_heartbeat_ms: 2_000,
        written_ms: 2_500,
        owner: "owner-1",
    };
    assert_eq!(decode_lease(value.as_bytes()), Some(decoded));
    assert_eq!(decode_lease(b"1000 x 2500 owner"), None);
    assert_eq!(decode_lease(b"1000 2000"), None);
}

/// A foreign lease counts as online until it expires; once pruned, its last
/// heartbeat remains as last seen.
#[test]
fn mirror_lease_expiry() {
    let mut mirror = Mirror::default();
    let lease = ForeignLease {
        last_heartbeat_ms: 900,
        expires_ms: 2_000,
    };
    mirror.leases.insert(5, lease);
    mirror.last_seen.insert(5, 100);
    let stored = mirror.stored(5, 1_999).unwrap();
    assert!(stored.online);
    assert_eq!(stored.last_seen_ms, 900);
    assert!(!mirror.stored(5, 2_000).unwrap().online);
    mirror.prune(2_000);
    assert!(mirror.leases.is_empty());
    assert_eq!(mirror.last_seen[&5], 900);
    assert_eq!(mirror.stored(6, 0), None);
}
