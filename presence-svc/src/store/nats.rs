//! The NATS KV backend (the distributed mode): three buckets, a mirror of them
//! in memory fed by watches, and a writer task for the leases.
//!
//! - `confab_presence` (file storage, history 1, max age = the window): one key
//!   per online user (the decimal user id), the lease. Value
//!   `"<since_ms> <last_heartbeat_ms> <written_ms> <owner>"`, ASCII: when the
//!   user came online, their latest heartbeat at the write, when it was
//!   written, and which process instance wrote it. Written when the user comes
//!   online, renewed once per half window, deleted when they go offline; a key
//!   nobody renews (its process died) expires after the window.
//! - `confab_last_seen` (file storage, history 1, no max age): key user id,
//!   value the decimal ms of the last heartbeat before the user went offline.
//!   Never goes backwards (writes below the mirrored value are skipped).
//! - `confab_presence_privacy` (file storage, history 1, no max age): key user
//!   id, value the visibility code (`Visibility::code`).
//!
//! Reads never touch NATS: `load` answers from the mirror, which each watch
//! keeps current (and which this process's own writes update at once). A lease
//! in the mirror counts as online until a window after its write, whether or
//! not the server has removed it yet; the mirror ignores the leases written by
//! this instance (the tracker knows those users better) and folds a removed or
//! expired lease's last heartbeat into last seen, so that the users of a dead
//! process keep a last seen.
//!
//! Lease writes are queued without blocking (they are issued under the
//! service's state lock) and written by one task, in batches that keep only
//! the latest write per user: one user's writes reach the bucket in order. A
//! failed lease write is logged and left to the next renewal or to expiry.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Entry, Operation, Watch};
use async_nats::jetstream::stream::StorageType;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_stream::StreamExt as _;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{BoxFuture, OnlineLease, PresenceStore, StoreError, StoredPresence, Visibility};

/// The bucket of leases (online users).
pub(crate) const PRESENCE_BUCKET: &str = "confab_presence";
/// The bucket of last-seen times.
pub(crate) const LAST_SEEN_BUCKET: &str = "confab_last_seen";
/// The bucket of privacy choices.
pub(crate) const PRIVACY_BUCKET: &str = "confab_presence_privacy";

/// How long `open` waits for a bucket's current values before it carries on
/// with what it has (the values still arrive through the watch).
const LOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The pause before a watch that ended is opened again.
const REWATCH_DELAY: Duration = Duration::from_secs(1);
/// Most KV writes in flight at once (leases of one batch, last-seen rows).
const MAX_IN_FLIGHT: usize = 1_024;

/// Last-seen times, privacy choices and leases in NATS KV.
#[derive(Debug)]
pub(crate) struct NatsStore {
    last_seen_kv: kv::Store,
    privacy_kv: kv::Store,
    /// What the three buckets hold, kept current by the watches.
    mirror: Arc<Mutex<Mirror>>,
    /// The window: a lease lives that long after its write.
    window: Duration,
    /// This instance's name in the leases it writes.
    owner: Arc<str>,
    /// Lease writes for the writer task; taken (closed) by `close`.
    queue: Mutex<Option<mpsc::UnboundedSender<Queued>>>,
    /// The writer task, awaited by `close` once its queue is closed.
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Stops the watch tasks when the store is dropped.
    _watches: DropGuard,
}

/// A queued lease write: the new value, or `None` to delete the key. The value
/// is built when the change happens, so a queued write carries the state it
/// describes.
#[derive(Debug)]
struct LeaseWrite {
    user_id: i64,
    /// The lease's new value; `None` removes it.
    value: Option<String>,
    /// With a removal: the last seen to write into `confab_last_seen` first.
    last_seen_ms: Option<i64>,
}

/// What the lease writer is asked to do.
#[derive(Debug)]
enum Queued {
    Write(LeaseWrite),
    /// Signal once everything queued before is written.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// A lease written by another process instance.
#[derive(Debug, Clone, Copy)]
struct ForeignLease {
    last_heartbeat_ms: i64,
    /// Wall-clock ms after which the lease no longer counts (the server
    /// removes it about then).
    expires_ms: i64,
}

/// What the buckets hold, as far as the watches told.
#[derive(Debug, Default)]
struct Mirror {
    leases: HashMap<i64, ForeignLease>,
    last_seen: HashMap<i64, i64>,
    privacy: HashMap<i64, Visibility>,
}

/// Which bucket a watch follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bucket {
    Presence,
    LastSeen,
    Privacy,
}

/// What a watch task needs to apply entries.
#[derive(Debug, Clone)]
struct Follower {
    bucket: Bucket,
    mirror: Arc<Mutex<Mirror>>,
    /// This instance's name in lease values: its own leases are skipped.
    owner: Arc<str>,
    window_ms: i64,
    /// Where the last heartbeat of a lease that expired (its process died
    /// without removing it) is kept as last seen: the bucket of last seen.
    last_seen_kv: kv::Store,
}

impl NatsStore {
    /// Creates (or updates) the buckets, loads their current values into the
    /// mirror, and starts the watches and the lease writer.
    ///
    /// # Errors
    ///
    /// Fails when a bucket cannot be created or watched.
    pub(crate) async fn open(
        js: &async_nats::jetstream::Context,
        window: Duration,
    ) -> Result<Self, StoreError> {
        let presence_kv = bucket(js, PRESENCE_BUCKET, window).await?;
        let last_seen_kv = bucket(js, LAST_SEEN_BUCKET, Duration::ZERO).await?;
        let privacy_kv = bucket(js, PRIVACY_BUCKET, Duration::ZERO).await?;
        let mirror = Arc::new(Mutex::new(Mirror::default()));
        let owner = instance_name();
        let cancel = CancellationToken::new();
        for (kv, bucket) in [
            (&presence_kv, Bucket::Presence),
            (&last_seen_kv, Bucket::LastSeen),
            (&privacy_kv, Bucket::Privacy),
        ] {
            let follower = Follower {
                bucket,
                mirror: Arc::clone(&mirror),
                owner: Arc::clone(&owner),
                window_ms: millis(window),
                last_seen_kv: last_seen_kv.clone(),
            };
            let watch = follower.load(kv).await?;
            tokio::spawn(follower.follow(kv.clone(), watch, cancel.clone()));
        }
        let (queue, pending) = mpsc::unbounded_channel();
        let writer = tokio::spawn(run_writer(presence_kv, last_seen_kv.clone(), pending));
        Ok(Self {
            last_seen_kv,
            privacy_kv,
            mirror,
            window,
            owner,
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(writer)),
            _watches: cancel.drop_guard(),
        })
    }

    fn enqueue(&self, writes: impl Iterator<Item = LeaseWrite>) {
        let queue = self.queue.lock();
        let Some(queue) = queue.as_ref() else {
            tracing::debug!("presence lease write after close, dropped");
            return;
        };
        for write in writes {
            // Fails only once the writer is gone (closing): nothing to do.
            let _ = queue.send(Queued::Write(write));
        }
    }
}

impl PresenceStore for NatsStore {
    fn load<'a>(
        &'a self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, StoredPresence>, StoreError>> {
        let now_ms = confab_common::now_ms();
        let mirror = self.mirror.lock();
        let found = user_ids
            .iter()
            .filter_map(|&id| mirror.stored(id, now_ms).map(|stored| (id, stored)))
            .collect();
        Box::pin(std::future::ready(Ok(found)))
    }

    fn write_last_seen<'a>(
        &'a self,
        rows: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            // Never backwards: skip what the bucket already holds or beats.
            let due: Vec<(i64, i64)> = {
                let mirror = self.mirror.lock();
                rows.iter()
                    .copied()
                    .filter(|(id, ms)| mirror.last_seen.get(id).is_none_or(|held| held < ms))
                    .collect()
            };
            let mut failure = None;
            for chunk in due.chunks(MAX_IN_FLIGHT) {
                let mut puts = JoinSet::new();
                for &(user_id, last_seen_ms) in chunk {
                    let kv = self.last_seen_kv.clone();
                    puts.spawn(async move {
                        let value = last_seen_ms.to_string();
                        let put = kv.put(user_id.to_string(), value.into()).await;
                        (user_id, last_seen_ms, put)
                    });
                }
                while let Some(joined) = puts.join_next().await {
                    match joined {
                        Ok((user_id, last_seen_ms, Ok(_))) => {
                            let mut mirror = self.mirror.lock();
                            let held = mirror.last_seen.entry(user_id).or_default();
                            *held = (*held).max(last_seen_ms);
                        }
                        Ok((_, _, Err(error))) => {
                            failure = Some(StoreError::kv("put last seen", error));
                        }
                        Err(error) => failure = Some(StoreError::kv("put last seen", error)),
                    }
                }
            }
            failure.map_or(Ok(()), Err)
        })
    }

    fn set_visibility(
        &self,
        user_id: i64,
        visibility: Visibility,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let value = visibility.code().to_string();
            self.privacy_kv
                .put(user_id.to_string(), value.into())
                .await
                .map_err(|error| StoreError::kv("put privacy", error))?;
            self.mirror.lock().privacy.insert(user_id, visibility);
            Ok(())
        })
    }

    fn lease_period(&self) -> Option<Duration> {
        Some(self.window / 2)
    }

    fn put_online(&self, leases: &[OnlineLease]) {
        let written_ms = confab_common::now_ms();
        self.enqueue(leases.iter().map(|lease| LeaseWrite {
            user_id: lease.user_id,
            value: Some(encode_lease(lease, written_ms, &self.owner)),
            last_seen_ms: None,
        }));
    }

    fn put_offline(&self, gone: &[(i64, i64)]) {
        self.enqueue(gone.iter().map(|&(user_id, last_seen_ms)| LeaseWrite {
            user_id,
            value: None,
            last_seen_ms: Some(last_seen_ms),
        }));
    }

    fn flush(&self) -> BoxFuture<'_, ()> {
        let (done, written) = tokio::sync::oneshot::channel();
        if let Some(queue) = self.queue.lock().as_ref() {
            let _ = queue.send(Queued::Flush(done));
        }
        Box::pin(async move {
            // An error means the writer is gone: nothing more will be written.
            let _ = written.await;
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        // Dropping the sender ends the writer once it has written the queue.
        drop(self.queue.lock().take());
        let writer = self.writer.lock().take();
        Box::pin(async move {
            if let Some(writer) = writer {
                let _ = writer.await;
            }
        })
    }
}

/// Creates or updates the bucket `name`: file storage, history 1, entries
/// removed `max_age` after their write (`ZERO`: never).
async fn bucket(
    js: &async_nats::jetstream::Context,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, StoreError> {
    let config = kv::Config {
        bucket: name.to_owned(),
        history: 1,
        max_age,
        storage: StorageType::File,
        ..kv::Config::default()
    };
    js.create_or_update_key_value(config)
        .await
        .map_err(|error| StoreError::kv("create bucket", error))
}

/// Returns a name for this instance of the store, unique among the processes
/// sharing the buckets (and the instances within one process, as in tests).
fn instance_name() -> Arc<str> {
    static INSTANCES: AtomicU64 = AtomicU64::new(0);
    let instance = INSTANCES.fetch_add(1, Ordering::Relaxed);
    let started_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{:x}-{started_ns:x}-{instance}", std::process::id()).into()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 2)
}

/// Returns a lease's value: `"<since_ms> <last_heartbeat_ms> <written_ms> <owner>"`.
fn encode_lease(lease: &OnlineLease, written_ms: i64, owner: &str) -> String {
    format!(
        "{} {} {written_ms} {owner}",
        lease.since_ms, lease.last_heartbeat_ms
    )
}

/// A decoded lease value.
#[derive(Debug, PartialEq, Eq)]
struct LeaseValue<'a> {
    last_heartbeat_ms: i64,
    written_ms: i64,
    owner: &'a str,
}

/// Returns the fields of a lease value, `None` when it is malformed.
fn decode_lease(value: &[u8]) -> Option<LeaseValue<'_>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut fields = text.split(' ');
    let _since_ms: i64 = fields.next()?.parse().ok()?;
    let last_heartbeat_ms = fields.next()?.parse().ok()?;
    let written_ms = fields.next()?.parse().ok()?;
    let owner = fields.next()?;
    Some(LeaseValue {
        last_heartbeat_ms,
        written_ms,
        owner,
    })
}

/// Returns the decimal number in `value`, `None` when it is malformed.
fn decode_number(value: &[u8]) -> Option<i64> {
    std::str::from_utf8(value).ok()?.parse().ok()
}

impl Mirror {
    /// Returns what is known of `user_id` at `now_ms`, `None` for nothing.
    fn stored(&self, user_id: i64, now_ms: i64) -> Option<StoredPresence> {
        let lease = self.leases.get(&user_id);
        let last_seen = self.last_seen.get(&user_id);
        let visibility = self.privacy.get(&user_id);
        if lease.is_none() && last_seen.is_none() && visibility.is_none() {
            return None;
        }
        let lease_ms = lease.map_or(0, |lease| lease.last_heartbeat_ms);
        Some(StoredPresence {
            last_seen_ms: last_seen.copied().unwrap_or(0).max(lease_ms),
            visibility: visibility.copied().unwrap_or_default(),
            online: lease.is_some_and(|lease| lease.expires_ms > now_ms),
        })
    }

    /// Removes `user_id`'s lease, keeping its last heartbeat as last seen.
    fn end_lease(&mut self, user_id: i64) {
        if let Some(lease) = self.leases.remove(&user_id) {
            let held = self.last_seen.entry(user_id).or_default();
            *held = (*held).max(lease.last_heartbeat_ms);
        }
    }

    /// Ends the leases that expired by `now_ms` (their process stopped
    /// renewing them), so that the map does not grow without end; returns
    /// their users with the last heartbeat, which is now their last seen.
    fn prune(&mut self, now_ms: i64) -> Vec<(i64, i64)> {
        let expired: Vec<(i64, i64)> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires_ms <= now_ms)
            .map(|(&id, lease)| (id, lease.last_heartbeat_ms))
            .collect();
        for &(user_id, _) in &expired {
            self.end_lease(user_id);
        }
        expired
    }
}

impl Follower {
    /// Writes the last heartbeat of leases whose process died as their users'
    /// last seen (every presence process may: the values agree). A failure is
    /// logged; the mirror keeps the value meanwhile.
    async fn keep_last_seen(&self, ended: &[(i64, i64)]) {
        for &(user_id, last_seen_ms) in ended.iter().filter(|(_, ms)| *ms > 0) {
            let put = self
                .last_seen_kv
                .put(user_id.to_string(), last_seen_ms.to_string().into())
                .await;
            if let Err(error) = put {
                tracing::warn!(user_id, error = %error, "last seen of an expired lease not kept");
            }
        }
    }

    /// Opens the watch and applies the bucket's current values, waiting until
    /// they are all in (at most [`LOAD_TIMEOUT`]); returns the watch, which
    /// goes on with the changes.
    async fn load(&self, kv: &kv::Store) -> Result<Watch, StoreError> {
        let held = kv
            .stream
            .get_info()
            .await
            .map_err(|error| StoreError::kv("read bucket info", error))?
            .state
            .messages;
        // Last value of every key, then every change.
        let mut watch = kv
            .watch_with_history(">")
            .await
            .map_err(|error| StoreError::kv("watch", error))?;
        if held == 0 {
            return Ok(watch);
        }
        let deadline = tokio::time::Instant::now() + LOAD_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, watch.next()).await;
            let Ok(next) = next else {
                // The values counted may have expired before delivery.
                tracing::warn!(bucket = ?self.bucket, "presence bucket load timed out, carrying on");
                return Ok(watch);
            };
            match next {
                Some(Ok(entry)) => {
                    self.apply(&entry);
                    if entry.delta == 0 {
                        return Ok(watch);
                    }
                }
                Some(Err(error)) => return Err(StoreError::kv("watch", error)),
                None => return Err(StoreError::kv("watch", "watch ended while loading")),
            }
        }
    }

    /// Applies the changes of `watch` until cancelled, opening it again when it
    /// ends; prunes expired leases once per window.
    async fn follow(self, kv: kv::Store, mut watch: Watch, cancel: CancellationToken) {
        let period = Duration::from_millis(u64::try_from(self.window_ms).unwrap_or(1).max(1));
        let mut prune = tokio::time::interval(period);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                _ = prune.tick() => {
                    if self.bucket == Bucket::Presence {
                        let ended = self.mirror.lock().prune(confab_common::now_ms());
                        self.keep_last_seen(&ended).await;
                    }
                    continue;
                }
                next = watch.next() => next,
            };
            match next {
                Some(Ok(entry)) => self.apply(&entry),
                Some(Err(error)) => {
                    tracing::warn!(bucket = ?self.bucket, error = %error, "presence watch error");
                }
                None => match self.rewatch(&kv, &cancel).await {
                    Some(renewed) => watch = renewed,
                    None => return,
                },
            }
        }
    }

    /// Opens the watch again, retrying until it opens; `None` when cancelled.
    async fn rewatch(&self, kv: &kv::Store, cancel: &CancellationToken) -> Option<Watch> {
        tracing::warn!(bucket = ?self.bucket, "presence watch ended, opening it again");
        loop {
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(REWATCH_DELAY) => {}
            }
            // With history: keys changed in between are delivered again.
            match kv.watch_with_history(">").await {
                Ok(watch) => return Some(watch),
                Err(error) => {
                    tracing::warn!(bucket = ?self.bucket, error = %error, "presence watch failed");
                }
            }
        }
    }

    /// Applies one entry of the followed bucket to the mirror.
    fn apply(&self, entry: &Entry) {
        let Ok(user_id) = entry.key.parse::<i64>() else {
            return;
        };
        let removed = matches!(entry.operation, Operation::Delete | Operation::Purge);
        let mut mirror = self.mirror.lock();
        match (self.bucket, removed) {
            (Bucket::Presence, true) => mirror.end_lease(user_id),
            (Bucket::Presence, false) => {
                let Some(lease) = decode_lease(&entry.value) else {
                    return;
                };
                if *lease.owner == *self.owner {
                    return;
                }
                // From the earlier of its stamp and now: a writer whose clock
                // runs ahead cannot make a lease outlive the server's copy.
                let written_ms = lease.written_ms.min(confab_common::now_ms());
                let foreign = ForeignLease {
                    last_heartbeat_ms: lease.last_heartbeat_ms,
                    expires_ms: written_ms.saturating_add(self.window_ms),
                };
                mirror.leases.insert(user_id, foreign);
            }
            (Bucket::LastSeen, true) => {
                mirror.last_seen.remove(&user_id);
            }
            (Bucket::LastSeen, false) => {
                if let Some(ms) = decode_number(&entry.value) {
                    let held = mirror.last_seen.entry(user_id).or_default();
                    *held = (*held).max(ms);
                }
            }
            (Bucket::Privacy, true) => {
                mirror.privacy.remove(&user_id);
            }
            (Bucket::Privacy, false) => {
                if let Some(code) = decode_number(&entry.value) {
                    mirror.privacy.insert(user_id, Visibility::from_code(code));
                }
            }
        }
    }
}

/// Writes queued leases until the queue is closed and empty: each batch holds
/// the latest write of each user queued so far, written concurrently; the next
/// batch starts once it is done, so one user's writes stay in order.
async fn run_writer(
    kv: kv::Store,
    last_seen_kv: kv::Store,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    while let Some(first) = queue.recv().await {
        // The latest write of each user in the batch wins; a flush ends the
        // batch and is answered once it is written.
        let mut batch: HashMap<i64, LeaseWrite> = HashMap::new();
        let mut flushed = Vec::new();
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Queued::Write(write) => {
                    batch.insert(write.user_id, write);
                }
                Queued::Flush(done) => {
                    flushed.push(done);
                    break;
                }
            }
            if batch.len() >= MAX_IN_FLIGHT {
                break;
            }
            next = queue.try_recv().ok();
        }
        let mut writes = JoinSet::new();
        for (user_id, write) in batch {
            let kv = kv.clone();
            let last_seen_kv = last_seen_kv.clone();
            writes.spawn(async move {
                let key = user_id.to_string();
                let written = match (write.value, write.last_seen_ms) {
                    (Some(value), _) => kv
                        .put(key, value.into())
                        .await
                        .map(drop)
                        .map_err(|error| StoreError::kv("put lease", error)),
                    (None, last_seen_ms) => {
                        let kept = match last_seen_ms.filter(|ms| *ms > 0) {
                            Some(ms) => last_seen_kv
                                .put(key.clone(), ms.to_string().into())
                                .await
                                .map(drop)
                                .map_err(|error| StoreError::kv("put last seen", error)),
                            None => Ok(()),
                        };
                        match kept {
                            Ok(()) => kv
                                .delete(key)
                                .await
                                .map_err(|error| StoreError::kv("delete lease", error)),
                            // The lease stays until it expires; its value
                            // still carries the last heartbeat.
                            Err(error) => Err(error),
                        }
                    }
                };
                (user_id, written)
            });
        }
        while let Some(joined) = writes.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {
                    metrics::counter!("confab_presence_lease_writes_total").increment(1);
                }
                // Left to the next renewal, or to expiry for a removal.
                Ok((user_id, Err(error))) => {
                    tracing::warn!(user_id, error = %error, source = ?std::error::Error::source(&error), "presence lease write failed");
                }
                Err(error) => tracing::warn!(error = %error, "presence lease write task failed"),
            }
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests;
