//! presence-svc: heartbeats, online / last seen, privacy, typing (DESIGN.md
//! section 7).
//!
//! - [`PresenceService`] (this file): the service, cheap to clone; serve it
//!   through the generated `PresencesServer`. Owns the sweeper task.
//! - `service`: the operations (heartbeat, disconnect, query, typing, privacy,
//!   sweep) and the rules of who sees what.
//! - `tracker`: live connections per user and the bookkeeping that batches
//!   last-seen writes (pure, no I/O).
//! - `typing`: running typing indicators and per-user rate limits (pure).
//! - `members`: conversation member lists from group-svc, cached briefly.
//! - `store`: durable last seen and privacy behind a small trait; `store/sqlite`
//!   (embedded mode), `store/nats` (distributed mode: NATS KV, with a lease per
//!   online user).
//! - `grpc`: the generated `Presences` trait on top: protobuf <-> domain,
//!   errors -> statuses, nothing else.
//! - `error`: [`PresenceError`], the causes of refusal, and their gRPC codes.
//! - [`PresenceConfig`]: the window, the typing ttl and rate, the database file.
//!
//! Presence lives in memory (DESIGN.md section 11): one process of this service
//! serves the embedded mode ([`PresenceService::open`]). Only last-seen times
//! and privacy choices are stored, and heartbeats never write. In the
//! distributed mode ([`PresenceService::open_nats`]) the store is NATS KV and
//! also holds a lease per online user, renewed at most once per half window
//! and expiring after a window: the users of a process that dies without a
//! word go offline on their own.

mod config;
mod error;
mod grpc;
mod members;
mod service;
mod store;
mod tracker;
mod typing;

#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use confab_common::bus::LiveBus;
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::members::MemberCache;
use crate::store::PresenceStore;
use crate::store::nats::NatsStore;
use crate::store::sqlite::SqliteStore;
use crate::tracker::Tracker;
use crate::typing::Typing;

pub use crate::config::PresenceConfig;
pub use crate::error::PresenceError;
pub use crate::store::StoreError;

/// Presence and typing; implements the generated
/// `confab_proto::presence::v1::presences_server::Presences` trait. Clones share
/// state.
#[derive(Debug, Clone)]
pub struct PresenceService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Connections, typings and rate limits under one lock, so that the
    /// events one change causes are published in the order of the changes
    /// (publishing happens under it: `LiveBus::publish` never blocks).
    state: Mutex<State>,
    /// Last-seen times and privacy choices (and leases, for a shared store).
    store: Arc<dyn PresenceStore>,
    /// `store.lease_period()`, read once: `Some` for a store shared between
    /// processes, which keeps a lease per online user.
    lease_period: Option<Duration>,
    /// Who shares a conversation with whom (`SharedWith`).
    groups: GroupsClient<GrpcChannel>,
    /// Member lists for typing.
    members: MemberCache,
    /// Where presence and typing events go.
    bus: Arc<dyn LiveBus>,
    /// Wall-clock time from the monotonic clock.
    clock: WallClock,
    /// Serialises `SetPrivacy` calls, so that the store and the tracker end
    /// with the same choice when two race.
    privacy_writes: tokio::sync::Mutex<()>,
    /// Set by [`PresenceService::shutdown`]: heartbeats are refused from then on.
    closed: AtomicBool,
    /// Stops the sweeper.
    cancel: CancellationToken,
    /// The sweeper task, awaited by shutdown before its final flush.
    sweeper: Mutex<Option<JoinHandle<()>>>,
    /// Rows written to the store so far (`confab_presence_store_writes_total`).
    store_writes: AtomicU64,
}

/// What the state lock guards.
#[derive(Debug)]
struct State {
    tracker: Tracker,
    typing: Typing,
    /// Bumped by every `SetPrivacy`: a heartbeat that loaded a user's row
    /// before a change of privacy loads it again rather than track a stale one.
    privacy_epoch: u64,
}

/// Converts monotonic instants to wall-clock milliseconds from one anchor, so
/// that last-seen times never go backwards when the system clock is stepped,
/// and follow a paused tokio clock in tests.
#[derive(Debug, Clone, Copy)]
struct WallClock {
    anchor: Instant,
    anchor_ms: i64,
}

impl WallClock {
    fn now() -> Self {
        Self {
            anchor: Instant::now(),
            anchor_ms: confab_common::now_ms(),
        }
    }

    /// Returns the wall-clock time of `at`, in ms since the Unix epoch.
    fn ms(&self, at: Instant) -> i64 {
        let since = at.saturating_duration_since(self.anchor).as_millis();
        self.anchor_ms + i64::try_from(since).unwrap_or(i64::MAX / 2)
    }
}

impl PresenceService {
    /// Opens the store at `config.db_path` (creating it if needed) and starts
    /// the sweeper.
    ///
    /// # Errors
    ///
    /// [`PresenceError::InvalidConfig`] for a zero window, ttl or rate;
    /// [`PresenceError::Store`] when the database cannot be opened.
    pub async fn open(
        config: PresenceConfig,
        groups: GroupsClient<GrpcChannel>,
        bus: Arc<dyn LiveBus>,
    ) -> Result<Self, PresenceError> {
        if let Some(problem) = config.problem() {
            return Err(PresenceError::InvalidConfig(problem));
        }
        let store = SqliteStore::open(&config.db_path).await?;
        Ok(Self::with_store(config, groups, bus, Arc::new(store)))
    }

    /// Opens the distributed mode's store on NATS KV (creating or updating the
    /// buckets `confab_presence`, `confab_last_seen` and
    /// `confab_presence_privacy`), loads what they hold, and starts the
    /// sweeper. `config.db_path` is unused.
    ///
    /// Connections and heartbeats are tracked in memory as in [`open`](Self::open);
    /// an online user's key in `confab_presence` is written when they come
    /// online and renewed at most once per half window, removed when they go
    /// offline, and expires a window after its last write if this process dies.
    /// `Query` also answers from the buckets, so another or a restarted process
    /// answers alike.
    ///
    /// # Errors
    ///
    /// [`PresenceError::InvalidConfig`] for a zero window, ttl or rate;
    /// [`PresenceError::Store`] when a bucket cannot be created or read.
    pub async fn open_nats(
        config: PresenceConfig,
        js: async_nats::jetstream::Context,
        groups: GroupsClient<GrpcChannel>,
        bus: Arc<dyn LiveBus>,
    ) -> Result<Self, PresenceError> {
        if let Some(problem) = config.problem() {
            return Err(PresenceError::InvalidConfig(problem));
        }
        let store = NatsStore::open(&js, config.window).await?;
        Ok(Self::with_store(config, groups, bus, Arc::new(store)))
    }

    /// Returns a service on `store` and starts its sweeper; `config` is valid.
    fn with_store(
        config: PresenceConfig,
        groups: GroupsClient<GrpcChannel>,
        bus: Arc<dyn LiveBus>,
        store: Arc<dyn PresenceStore>,
    ) -> Self {
        let lease_period = store.lease_period();
        let state = State {
            tracker: Tracker::new(config.window, lease_period.is_none()),
            typing: Typing::new(config.typing_ttl, config.typing_per_minute),
            privacy_epoch: 0,
        };
        let inner = Arc::new(Inner {
            state: Mutex::new(state),
            store,
            lease_period,
            members: MemberCache::new(groups.clone()),
            groups,
            bus,
            clock: WallClock::now(),
            privacy_writes: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            sweeper: Mutex::new(None),
            store_writes: AtomicU64::new(0),
        });
        let sweeper = tokio::spawn(run_sweeper(
            Arc::downgrade(&inner),
            config.sweep_period(),
            inner.cancel.clone(),
        ));
        *inner.sweeper.lock() = Some(sweeper);
        Self { inner }
    }

    /// Marks everyone offline (last seen = their last heartbeat), flushes
    /// last-seen times (and lease removals), stops the sweeper. Heartbeats are
    /// refused afterwards.
    pub async fn shutdown(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        self.inner.cancel.cancel();
        let sweeper = self.inner.sweeper.lock().take();
        if let Some(sweeper) = sweeper {
            // A sweep in progress finishes its write first.
            let _ = sweeper.await;
        }
        self.flush_all().await;
        self.inner.store.close().await;
    }

    /// Returns how many last-seen rows were written to the store so far (the
    /// value of `confab_presence_store_writes_total` for this service).
    pub fn store_writes(&self) -> u64 {
        self.inner.store_writes.load(Ordering::Relaxed)
    }

    /// Returns how many users are online now.
    pub fn online_users(&self) -> usize {
        self.inner.state.lock().tracker.online_users()
    }
}

/// Sweeps every `period` until cancelled or the service is dropped (it holds
/// the service weakly, so that dropping every clone ends it).
async fn run_sweeper(inner: Weak<Inner>, period: Duration, cancel: CancellationToken) {
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    // After a stall, sweep once and carry on: a burst of sweeps would find
    // nothing more to do.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        PresenceService { inner }.sweep(Instant::now()).await;
    }
}
