//! Snowflake node-id leases on NATS KV, for the distributed mode (DESIGN.md
//! section 3): two live processes never hold the same node id.
//!
//! Bucket [`NODE_IDS_BUCKET`]: one key per leased id (`"0"` to `"1023"`), its value
//! the holder's node name. The bucket's `max_age` is the lease's time to live: a
//! key that its holder stops renewing disappears, and its id is free again. A
//! process takes an id with `create` (which fails while the key exists) and renews
//! it with `update` against the revision it last wrote, so a renewal fails the
//! moment anybody else has written the key.
//!
//! Every process leases its own id at start ([`NodeLease::acquire`]), not through
//! session-svc over gRPC: it needs the id before any of its roles is reachable, and
//! only the holder itself can tell when its lease is lost.

use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use confab_common::ids::MAX_NODES;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::SessionError;

/// The KV bucket of node-id leases.
pub const NODE_IDS_BUCKET: &str = "confab_node_ids";

/// A Snowflake node id leased on NATS KV, renewed in the background until
/// released, dropped or lost.
///
/// Dropping it stops the renewal without deleting the key: the id becomes free
/// once the bucket's max age has passed. [`NodeLease::release`] frees it at once.
#[derive(Debug)]
pub struct NodeLease {
    /// The leased Snowflake node id, below [`MAX_NODES`].
    node_id: u16,
    /// Who holds it: the process's node name, stored as the key's value.
    holder: String,
    /// The lease bucket, to delete the key on release.
    store: kv::Store,
    /// The revision of the key this lease wrote last; shared with the renewer, so
    /// that `release` deletes the key only while it is still ours.
    revision: Arc<AtomicU64>,
    /// Turns true when the lease is lost: taken by someone else, or not renewed in
    /// time.
    lost: watch::Receiver<bool>,
    /// The renewal task; aborted on release and on drop.
    renewer: JoinHandle<()>,
}

impl NodeLease {
    /// Leases a free node id to `holder`, trying the ids from a random one on, and
    /// renews it every third of the bucket's max age. Creates the bucket with
    /// `max_age = ttl` if it does not exist; an existing bucket's max age wins
    /// (logged when it differs), since that is when keys really expire.
    ///
    /// # Errors
    ///
    /// [`SessionError::EmptyNode`] for an empty holder,
    /// [`SessionError::NodeIdsExhausted`] when every id is leased,
    /// [`SessionError::Nats`] when NATS fails, and
    /// [`SessionError::LeaseBucketWithoutMaxAge`].
    pub async fn acquire(
        js: jetstream::Context,
        holder: &str,
        ttl: Duration,
    ) -> Result<Self, SessionError> {
        Self::acquire_from(js, holder, ttl, random_node_id()).await
    }

    /// [`NodeLease::acquire`], trying the ids from `first` on (wrapping around).
    pub(crate) async fn acquire_from(
        js: jetstream::Context,
        holder: &str,
        ttl: Duration,
        first: u16,
    ) -> Result<Self, SessionError> {
        if holder.is_empty() {
            return Err(SessionError::EmptyNode);
        }
        let (store, ttl) = open_bucket(&js, ttl).await?;
        for offset in 0..MAX_NODES {
            let node_id = (first % MAX_NODES + offset) % MAX_NODES;
            // Taken before the write: the key cannot expire earlier than `ttl` after it.
            let written_at = Instant::now();
            let created = store
                .create(node_id.to_string(), holder.to_owned().into())
                .await;
            let revision = match created {
                Ok(revision) => revision,
                Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(error) => return Err(SessionError::nats("create node-id lease", &error)),
            };
            tracing::info!(node_id, holder, ttl_ms = ttl.as_millis(), "node id leased");
            let revision = Arc::new(AtomicU64::new(revision));
            let (lost_tx, lost) = watch::channel(false);
            let renewal = Renewal {
                store: store.clone(),
                node_id,
                holder: holder.to_owned(),
                ttl,
                revision: Arc::clone(&revision),
                lost: lost_tx,
            };
            let renewer = tokio::spawn(renewal.run(written_at));
            return Ok(Self {
                node_id,
                holder: holder.to_owned(),
                store,
                revision,
                lost,
                renewer,
            });
        }
        Err(SessionError::NodeIdsExhausted(MAX_NODES))
    }

    /// Returns the leased Snowflake node id.
    pub fn node_id(&self) -> u16 {
        self.node_id
    }

    /// Returns the holder's node name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Returns a receiver that turns true when the lease is lost; the process must
    /// then stop using the node id (in practice: stop).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Stops renewing and deletes the key, so the id is free at once. Deletes only
    /// if the key is still at the revision this lease wrote: a lease already lost
    /// never removes its successor's key. Failures are logged; the key then expires.
    pub async fn release(self) {
        self.renewer.abort();
        let revision = self.revision.load(Ordering::Acquire);
        let key = self.node_id.to_string();
        match self
            .store
            .delete_expect_revision(&key, Some(revision))
            .await
        {
            Ok(()) => tracing::info!(node_id = self.node_id, "node id released"),
            Err(error) => tracing::warn!(
                node_id = self.node_id,
                error = %error,
                "node id not released; it expires with its lease"
            ),
        }
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// The renewal loop of one lease.
struct Renewal {
    store: kv::Store,
    node_id: u16,
    holder: String,
    /// The bucket's max age: how long a key lives after its last write.
    ttl: Duration,
    /// The revision last written by this lease.
    revision: Arc<AtomicU64>,
    lost: watch::Sender<bool>,
}

impl Renewal {
    /// Renews every `ttl / 3` from `written_at`, the time just before the last
    /// successful write; retries failed renewals until the lease would expire.
    async fn run(self, mut written_at: Instant) {
        let interval = self.ttl / 3;
        let retry = (self.ttl / 12).max(Duration::from_millis(10));
        let key = self.node_id.to_string();
        let mut next = written_at + interval;
        loop {
            tokio::time::sleep_until(next).await;
            // The server drops the key no earlier than `ttl` after our last write.
            let expires = written_at + self.ttl;
            let sent = Instant::now();
            let revision = self.revision.load(Ordering::Acquire);
            let update = self
                .store
                .update(&key, self.holder.clone().into(), revision);
            match tokio::time::timeout_at(expires, update).await {
                Ok(Ok(revision)) => {
                    self.revision.store(revision, Ordering::Release);
                    written_at = sent;
                    next = sent + interval;
                }
                Ok(Err(error)) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::error!(
                        node_id = self.node_id,
                        holder = %self.holder,
                        "node id lease lost: the key was written by someone else"
                    );
                    self.lost.send_replace(true);
                    return;
                }
                Ok(Err(error)) => {
                    tracing::warn!(node_id = self.node_id, error = %error, "node id renewal failed; retrying");
                    next = (Instant::now() + retry).min(expires);
                }
                Err(_elapsed) => {
                    tracing::error!(
                        node_id = self.node_id,
                        holder = %self.holder,
                        "node id lease lost: not renewed before it expired"
                    );
                    self.lost.send_replace(true);
                    return;
                }
            }
            if Instant::now() >= written_at + self.ttl {
                tracing::error!(node_id = self.node_id, "node id lease lost: expired");
                self.lost.send_replace(true);
                return;
            }
        }
    }
}

/// Opens the lease bucket, creating it with `max_age = ttl` if it does not exist,
/// and returns it with its real max age.
///
/// # Errors
///
/// [`SessionError::Nats`], or [`SessionError::LeaseBucketWithoutMaxAge`].
pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    ttl: Duration,
) -> Result<(kv::Store, Duration), SessionError> {
    let config = kv::Config {
        bucket: NODE_IDS_BUCKET.to_owned(),
        description: "snowflake node-id leases: key = node id, value = holder".to_owned(),
        history: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    let store = open_or_create(js, config).await?;
    let status = store
        .status()
        .await
        .map_err(|e| SessionError::nats("read node-id bucket status", &e))?;
    let max_age = status.max_age();
    if max_age.is_zero() {
        return Err(SessionError::LeaseBucketWithoutMaxAge(NODE_IDS_BUCKET));
    }
    if max_age != ttl {
        tracing::warn!(
            wanted_ms = ttl.as_millis(),
            bucket_ms = max_age.as_millis(),
            "node-id bucket exists with another max age; using the bucket's"
        );
    }
    Ok((store, max_age))
}

/// Opens the bucket `config.bucket`, creating it from `config` if it does not
/// exist (another process may create it at the same moment: then it is opened).
///
/// # Errors
///
/// [`SessionError::Nats`].
pub(crate) async fn open_or_create(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<kv::Store, SessionError> {
    if let Ok(store) = js.get_key_value(config.bucket.as_str()).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(store) => Ok(store),
        Err(create_error) => match js.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(_) => Err(SessionError::nats("create bucket", &create_error)),
        },
    }
}

/// Returns a random node id: where to start looking, so that processes starting
/// together do not all race for id 0.
fn random_node_id() -> u16 {
    // std's RandomState is seeded from the OS; hashing the clock adds variation
    // between calls on one thread. Not cryptographic, and need not be.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let hash = RandomState::new().hash_one(now);
    u16::try_from(hash % u64::from(MAX_NODES)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use confab_common::testkit::NatsServer;

    use super::*;
    use crate::testing::{eventually, jetstream};

    const TTL: Duration = Duration::from_secs(1);

    /// Two leases starting their search at the same id get different ids; a
    /// released id is free again at once.
    #[tokio::test]
    async fn two_leases_never_share_an_id() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let a = NodeLease::acquire_from(js.clone(), "gw-a", TTL, 5)
            .await
            .unwrap();
        let b = NodeLease::acquire_from(js.clone(), "gw-b", TTL, 5)
            .await
            .unwrap();
        assert_eq!((a.node_id(), b.node_id()), (5, 6));
        assert_eq!((a.holder(), b.holder()), ("gw-a", "gw-b"));
        let random = NodeLease::acquire(js.clone(), "gw-c", TTL).await.unwrap();
        assert!(random.node_id() < MAX_NODES);
        assert!(![5, 6].contains(&random.node_id()));

        a.release().await;
        let again = NodeLease::acquire_from(js.clone(), "gw-d", TTL, 5)
            .await
            .unwrap();
        assert_eq!(again.node_id(), 5);
        assert!(!*b.lost().borrow(), "renewals keep the other lease");
    }

    /// A lease keeps its id beyond its ttl while renewed; once its holder stops
    /// renewing (dropped without release), the key expires and the id can be
    /// leased again.
    #[tokio::test]
    async fn unrenewed_lease_expires() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let store = open_bucket(&js, TTL).await.unwrap().0;
        let lease = NodeLease::acquire_from(js.clone(), "gw-a", TTL, 7)
            .await
            .unwrap();
        let lost = lease.lost();
        // Outlive three ttls: only renewals keep the key.
        let renewed_until = Instant::now() + 3 * TTL;
        eventually("three ttls", || async { Instant::now() >= renewed_until }).await;
        assert_eq!(store.get("7").await.unwrap().as_deref(), Some(&b"gw-a"[..]));
        assert!(!*lost.borrow());

        drop(lease);
        eventually("the key to expire", || async {
            store.get("7").await.unwrap().is_none()
        })
        .await;
        let next = NodeLease::acquire_from(js, "gw-b", TTL, 7).await.unwrap();
        assert_eq!(next.node_id(), 7);
    }

    /// `lost()` turns true when someone else takes the key (deleted, then created
    /// by another holder); releasing the lost lease leaves the new holder's key.
    #[tokio::test]
    async fn lost_when_taken_by_another_holder() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let store = open_bucket(&js, TTL).await.unwrap().0;
        let lease = NodeLease::acquire_from(js, "gw-a", TTL, 9).await.unwrap();
        let mut lost = lease.lost();

        store.delete("9").await.unwrap();
        store.create("9", "intruder".into()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), lost.wait_for(|lost| *lost))
            .await
            .expect("lost within one renewal interval")
            .unwrap();

        lease.release().await;
        assert_eq!(
            store.get("9").await.unwrap().as_deref(),
            Some(&b"intruder"[..])
        );
    }

    /// An empty holder is refused.
    #[tokio::test]
    async fn empty_holder_is_refused() {
        let server = NatsServer::start().await;
        let js = jetstream(&server).await;
        let error = NodeLease::acquire(js, "", TTL).await.unwrap_err();
        assert_eq!(error, SessionError::EmptyNode);
    }
}
