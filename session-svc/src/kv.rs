//! The distributed mode's device registry on NATS KV (DESIGN.md section 11).
//!
//! Bucket [`SESSIONS_BUCKET`] (history 1, file storage, no max age): one key per
//! live device, `<user_id>.<device id as lowercase hex>` (hex keeps any device id
//! within the characters a KV key allows), whose value is
//! `<connection_id>:<node>` in ASCII decimal and UTF-8. A register is a put; an
//! unregister deletes the key only if it still holds the caller's connection, at
//! the revision read (compare and delete).
//!
//! Lookups never ask NATS: they read a [`Mirror`] that two background watches keep
//! (the sessions bucket, and the node-id leases of [`crate::lease`]), and that the
//! handlers update before they answer. A device counts only while its node holds
//! a lease written within the lease bucket's max age: the devices of a crashed
//! gateway vanish from lookups once its lease expires, with no event needed (an
//! expiry by max age produces none).

mod mirror;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use parking_lot::RwLock;
// tonic re-exports tokio-stream; session-svc has no direct stream dependency.
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use crate::SessionError;
use crate::lease::{self, open_or_create};
use crate::registry::{LiveDevice, validate};

use self::mirror::{Connection, Mirror, Source};

/// The KV bucket of live devices.
pub const SESSIONS_BUCKET: &str = "confab_sessions";

/// How long `open` waits for the watches to replay the buckets before it serves
/// from an incomplete mirror (and says so in the log).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a watch that ended or failed waits before it starts again.
const WATCH_RESTART_DELAY: Duration = Duration::from_secs(1);

/// Live devices in NATS KV, read through a local mirror.
#[derive(Debug)]
pub(crate) struct NatsRegistry {
    /// The sessions bucket: the state every session-svc process shares.
    sessions: kv::Store,
    /// What lookups read; fed by the handlers and the watches.
    mirror: Arc<RwLock<Mirror>>,
    /// The watches of the sessions and the lease buckets; stopped with the registry.
    _watches: [AbortOnDrop; 2],
}

impl NatsRegistry {
    /// Opens (or creates) both buckets, starts the watches and waits until they
    /// have replayed what the buckets hold.
    ///
    /// # Errors
    ///
    /// [`SessionError::Nats`], or [`SessionError::LeaseBucketWithoutMaxAge`].
    pub(crate) async fn open(
        js: jetstream::Context,
        node_ttl: Duration,
    ) -> Result<Self, SessionError> {
        let config = kv::Config {
            bucket: SESSIONS_BUCKET.to_owned(),
            description: "live devices: key = user.hex(device), value = connection:node".to_owned(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let sessions = open_or_create(&js, config).await?;
        // The bucket's max age, not the one asked for, is when leases really end.
        let (leases, node_ttl) = lease::open_bucket(&js, node_ttl).await?;
        let mirror = Arc::new(RwLock::new(Mirror::new(node_ttl)));

        let (sessions_ready, mut sessions_replayed) = watch::channel(false);
        let (leases_ready, mut leases_replayed) = watch::channel(false);
        let sessions_mirror = Arc::clone(&mirror);
        let leases_mirror = Arc::clone(&mirror);
        let watches = [
            AbortOnDrop(tokio::spawn(watch_bucket(
                sessions.clone(),
                sessions_ready,
                move |entry| apply_session(&sessions_mirror, entry),
            ))),
            AbortOnDrop(tokio::spawn(watch_bucket(
                leases,
                leases_ready,
                move |entry| apply_lease(&leases_mirror, entry),
            ))),
        ];
        let replayed = async {
            let _ = sessions_replayed.wait_for(|done| *done).await;
            let _ = leases_replayed.wait_for(|done| *done).await;
        };
        if tokio::time::timeout(REPLAY_TIMEOUT, replayed)
            .await
            .is_err()
        {
            tracing::warn!("kv watches not replayed in time; lookups may miss devices for now");
        }
        Ok(Self {
            sessions,
            mirror,
            _watches: watches,
        })
    }

    /// Records that `device` is connected through `connection_id`, replacing any
    /// older connection of it.
    ///
    /// # Errors
    ///
    /// [`SessionError::EmptyDevice`], [`SessionError::EmptyNode`] or
    /// [`SessionError::Nats`].
    pub(crate) async fn register(
        &self,
        device: LiveDevice,
        connection_id: u64,
    ) -> Result<(), SessionError> {
        validate(&device.device_id, &device.node)?;
        let key = session_key(device.user_id, &device.device_id);
        let value = format!("{connection_id}:{}", device.node);
        let revision = self
            .sessions
            .put(&key, value.into())
            .await
            .map_err(|e| SessionError::nats("put session", &e))?;
        let connection = Connection {
            node: device.node,
            connection_id,
        };
        self.mirror.write().apply_device(
            device.user_id,
            &device.device_id,
            revision,
            Some(connection),
            Source::Local,
        );
        Ok(())
    }

    /// Removes the device if `(node, connection_id)` is its current connection;
    /// returns whether it did. The delete is conditional on the revision read, so a
    /// newer connection registered in between survives.
    ///
    /// # Errors
    ///
    /// [`SessionError::EmptyDevice`], [`SessionError::EmptyNode`] or
    /// [`SessionError::Nats`].
    pub(crate) async fn unregister(
        &self,
        device: &LiveDevice,
        connection_id: u64,
    ) -> Result<bool, SessionError> {
        validate(&device.device_id, &device.node)?;
        let key = session_key(device.user_id, &device.device_id);
        let entry = self
            .sessions
            .entry(key.as_str())
            .await
            .map_err(|e| SessionError::nats("read session", &e))?;
        let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) else {
            return Ok(false);
        };
        let is_current = decode_value(&entry.value)
            .is_some_and(|c| c.connection_id == connection_id && c.node == device.node);
        if !is_current {
            return Ok(false);
        }
        let deleted = self
            .sessions
            .delete_expect_revision(&key, Some(entry.revision))
            .await;
        match deleted {
            Ok(()) => {}
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => return Ok(false),
            Err(e) => return Err(SessionError::nats("delete session", &e)),
        }
        self.mirror.write().apply_device(
            device.user_id,
            &device.device_id,
            entry.revision,
            None,
            Source::Local,
        );
        Ok(true)
    }

    /// Returns the live devices of `user_ids` on nodes with a live lease, from the
    /// mirror: user by user in the order asked, devices ordered by id.
    pub(crate) fn lookup(&self, user_ids: &[i64]) -> Vec<LiveDevice> {
        self.mirror.read().lookup(user_ids, Instant::now())
    }
}

/// Aborts a background task when dropped.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feeds every entry of `store` (the latest of each key first, then every change)
/// to `apply`, for ever; starts again after a failure. `replayed` turns true once
/// the latest entries have all been applied.
async fn watch_bucket(
    store: kv::Store,
    replayed: watch::Sender<bool>,
    mut apply: impl FnMut(&kv::Entry) + Send + 'static,
) {
    loop {
        match store.watch_with_history(">").await {
            Ok(mut entries) => {
                // An empty bucket replays nothing, so nothing would say it is done.
                if store.status().await.is_ok_and(|s| s.values() == 0) {
                    replayed.send_replace(true);
                }
                while let Some(entry) = entries.next().await {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(error) => {
                            tracing::warn!(bucket = %store.name, error = %error, "kv watch failed");
                            break;
                        }
                    };
                    apply(&entry);
                    if entry.delta == 0 {
                        replayed.send_replace(true);
                    }
                }
            }
            Err(error) => {
                tracing::warn!(bucket = %store.name, error = %error, "kv watch not started");
            }
        }
        tracing::info!(bucket = %store.name, "kv watch restarting");
        tokio::time::sleep(WATCH_RESTART_DELAY).await;
    }
}

/// Applies a change of the sessions bucket to the mirror.
fn apply_session(mirror: &RwLock<Mirror>, entry: &kv::Entry) {
    let Some((user_id, device_id)) = decode_key(&entry.key) else {
        tracing::debug!(key = %entry.key, "foreign key in the sessions bucket ignored");
        return;
    };
    let connection = match entry.operation {
        kv::Operation::Put => {
            let Some(connection) = decode_value(&entry.value) else {
                tracing::warn!(key = %entry.key, "malformed session value ignored");
                return;
            };
            Some(connection)
        }
        kv::Operation::Delete | kv::Operation::Purge => None,
    };
    mirror.write().apply_device(
        user_id,
        &device_id,
        entry.revision,
        connection,
        Source::Watch,
    );
}

/// Applies a change of the lease bucket to the mirror, timed by its arrival: the
/// clocks of this process and the server need not agree.
fn apply_lease(mirror: &RwLock<Mirror>, entry: &kv::Entry) {
    match entry.operation {
        kv::Operation::Put => {
            let Ok(holder) = std::str::from_utf8(&entry.value) else {
                tracing::warn!(key = %entry.key, "malformed lease holder ignored");
                return;
            };
            mirror
                .write()
                .lease_written(&entry.key, holder, Instant::now());
        }
        kv::Operation::Delete | kv::Operation::Purge => mirror.write().lease_removed(&entry.key),
    }
}

/// Returns the sessions key of a device: `<user_id>.<hex of the device id>`.
fn session_key(user_id: i64, device_id: &str) -> String {
    let mut key = format!("{user_id}.");
    for byte in device_id.bytes() {
        let _ = write!(key, "{byte:02x}");
    }
    key
}

/// Returns the user and device a sessions key names, or `None` for a key this
/// module did not write.
fn decode_key(key: &str) -> Option<(i64, String)> {
    let (user_id, hex) = key.split_once('.')?;
    let user_id = user_id.parse().ok()?;
    if hex.is_empty() || hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    Some((user_id, String::from_utf8(bytes).ok()?))
}

/// Decodes a sessions value, `<connection_id>:<node>`.
fn decode_value(value: &[u8]) -> Option<Connection> {
    let value = std::str::from_utf8(value).ok()?;
    let (connection_id, node) = value.split_once(':')?;
    if node.is_empty() {
        return None;
    }
    Some(Connection {
        node: node.to_owned(),
        connection_id: connection_id.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use confab_common::testkit::NatsServer;
    use confab_proto::session::v1::AcquireNodeIdRequest;
    use confab_proto::session::v1::sessions_server::Sessions as _;

    use super::*;
    use crate::testing::{eventually, jetstream};
    use crate::{NodeLease, SessionService};

    const TTL: Duration = Duration::from_secs(1);

    fn device(user_id: i64, device_id: &str, node: &str) -> LiveDevice {
        LiveDevice {
            user_id,
            device_id: device_id.into(),
            node: node.into(),
        }
    }

    /// Two services on one NATS: each sees its own registration at once and the
    /// other's through the watch; an unregister through either removes it.
    #[tokio::test]
    async fn instances_share_devices() {
        let server = NatsServer::start().await;
        let _lease = NodeLease::acquire(jetstream(&server).await, "gw-a", TTL)
            .await
            .unwrap();
        let a = SessionService::with_nats(jetstream(&server).await, TTL)
            .await
            .unwrap();
        let b = SessionService::with_nats(jetstream(&server).await, TTL)
            .await
            .unwrap();

        let phone = device(7, "phone.1/ü", "gw-a");
        a.register(phone.clone(), 1).await.unwrap();
        assert_eq!(
            a.lookup(&[7]),
            vec![phone.clone()],
            "own write seen at once"
        );
        eventually("b to see a's device", || async {
            b.lookup(&[7]) == vec![phone.clone()]
        })
        .await;

        assert!(b.unregister(&phone, 1).await.unwrap());
        assert!(b.lookup(&[7]).is_empty(), "own removal seen at once");
        eventually("a to see the removal", || async {
            a.lookup(&[7]).is_empty()
        })
        .await;
    }

    /// A late unregister of an older connection (another node, or the same node
    /// with an older connection id) leaves the newer connection registered.
    #[tokio::test]
    async fn late_unregister_keeps_newer_connection() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let _a_lease = NodeLease::acquire(js.clone(), "gw-a", TTL).await.unwrap();
        let _b_lease = NodeLease::acquire(js.clone(), "gw-b", TTL).await.unwrap();
        let a = SessionService::with_nats(js.clone(), TTL).await.unwrap();
        let b = SessionService::with_nats(jetstream(&server).await, TTL)
            .await
            .unwrap();

        let old = device(7, "phone", "gw-a");
        let new = device(7, "phone", "gw-b");
        a.register(old.clone(), 1).await.unwrap();
        b.register(new.clone(), 2).await.unwrap();
        assert!(!a.unregister(&old, 1).await.unwrap(), "old connection");
        assert!(!a.unregister(&device(7, "phone", "gw-b"), 1).await.unwrap());
        eventually("a to see the newer connection", || async {
            a.lookup(&[7]) == vec![new.clone()]
        })
        .await;
        let stored = a_sessions(&a).get(session_key(7, "phone")).await.unwrap();
        assert_eq!(stored.as_deref(), Some(&b"2:gw-b"[..]));

        assert!(a.unregister(&new, 2).await.unwrap());
        eventually("b to see the removal", || async {
            b.lookup(&[7]).is_empty()
        })
        .await;
    }

    /// Devices of a node whose lease expired (holder stopped renewing) vanish from
    /// lookups; devices of a node that never held a lease are never shown; other
    /// nodes' devices stay.
    #[tokio::test]
    async fn devices_of_expired_nodes_disappear() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let doomed = NodeLease::acquire(js.clone(), "gw-x", TTL).await.unwrap();
        let _alive = NodeLease::acquire(js.clone(), "gw-y", TTL).await.unwrap();
        let service = SessionService::with_nats(js, TTL).await.unwrap();

        service
            .register(device(1, "phone", "gw-x"), 1)
            .await
            .unwrap();
        service.register(device(1, "web", "gw-y"), 2).await.unwrap();
        service
            .register(device(1, "tablet", "gw-unleased"), 3)
            .await
            .unwrap();
        let both = vec![device(1, "phone", "gw-x"), device(1, "web", "gw-y")];
        assert_eq!(service.lookup(&[1]), both);

        drop(doomed);
        eventually("gw-x's device to vanish", || async {
            service.lookup(&[1]) == vec![device(1, "web", "gw-y")]
        })
        .await;
    }

    /// With the NATS backend, AcquireNodeId over gRPC is UNIMPLEMENTED: processes
    /// lease their ids with NodeLease.
    #[tokio::test]
    async fn acquire_node_id_is_not_served() {
        let server = NatsServer::start().await;
        let service = SessionService::with_nats(jetstream(&server).await, TTL)
            .await
            .unwrap();
        let request = tonic::Request::new(AcquireNodeIdRequest {
            holder: "gw-a".into(),
        });
        let status = service.acquire_node_id(request).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }

    /// Keys and values decode to what was encoded; foreign or malformed ones are
    /// refused rather than misread.
    #[test]
    fn keys_and_values_round_trip() {
        for (user_id, device_id) in [(7, "phone"), (-3, "a.b/*>ü"), (i64::MAX, " ")] {
            let key = session_key(user_id, device_id);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
            );
            assert_eq!(decode_key(&key), Some((user_id, device_id.to_owned())));
        }
        for foreign in ["7", "x.61", "7.6", "7.+f", "7.", "7.zz", "7.ff"] {
            assert_eq!(decode_key(foreign), None, "{foreign}");
        }
        let connection = decode_value(b"42:gw:1").unwrap();
        assert_eq!(
            (connection.connection_id, connection.node.as_str()),
            (42, "gw:1")
        );
        for bad in [&b"42"[..], b"x:gw", b"42:", b"\xff:gw"] {
            assert!(decode_value(bad).is_none());
        }
    }

    fn a_sessions(service: &SessionService) -> &kv::Store {
        match &*service.backend {
            crate::Backend::Nats(registry) => &registry.sessions,
            crate::Backend::Memory { .. } => panic!("not the nats backend"),
        }
    }
}
