//! Durable last-seen times and privacy choices, behind a small trait. One file
//! per backend: [`sqlite`] for the embedded mode; [`nats`] for the distributed
//! mode, which also keeps a lease per online user, so that other processes see
//! them and a dead process's users expire; `memory` for the unit tests whose
//! clock is paused (a SQLite call waits on a worker thread, during which a
//! paused tokio clock would jump ahead to the next timer).
//!
//! The process's own connections always live in the tracker; a store without
//! leases ([`PresenceStore::lease_period`] is `None`) is the single process's
//! durable memory, one with leases is shared with other processes.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod nats;
pub(crate) mod sqlite;

/// A boxed future, so that the store trait can be used as a trait object.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An SQL statement failed.
    #[error("sql statement failed")]
    Sql(#[from] sqlx::Error),
    /// A NATS KV bucket could not be created, read or written.
    #[error("nats kv {operation} failed")]
    Kv {
        /// What was attempted, e.g. `put last seen`.
        operation: &'static str,
        source: async_nats::Error,
    },
}

impl StoreError {
    /// Returns a [`StoreError::Kv`] for `operation`.
    pub(crate) fn kv(operation: &'static str, source: impl Into<async_nats::Error>) -> Self {
        Self::Kv {
            operation,
            source: source.into(),
        }
    }
}

/// Who may see a user's last-seen time (`confab.v1.LastSeenVisibility` without
/// its UNSPECIFIED, which means [`Visibility::Contacts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Visibility {
    /// Anyone who asks, strangers included (they still never see online).
    Everyone,
    /// People who share a direct conversation or a group with the user.
    #[default]
    Contacts,
    /// Nobody: last seen reads 0 for everyone but the user.
    Nobody,
}

impl Visibility {
    /// Returns the code stored in `presence.last_seen_visibility`.
    pub(crate) fn code(self) -> i64 {
        match self {
            Self::Everyone => 1,
            Self::Contacts => 2,
            Self::Nobody => 3,
        }
    }

    /// Returns the visibility of a stored code; an unknown code (written by a
    /// newer version) reads as the default.
    pub(crate) fn from_code(code: i64) -> Self {
        match code {
            1 => Self::Everyone,
            3 => Self::Nobody,
            _ => Self::Contacts,
        }
    }
}

/// A user's row; users without one read as [`StoredPresence::default`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StoredPresence {
    /// Wall-clock ms of the last heartbeat before the user went away; 0 = never.
    /// For a user [`online`](Self::online) elsewhere, their latest heartbeat
    /// known to the store.
    pub(crate) last_seen_ms: i64,
    pub(crate) visibility: Visibility,
    /// The user holds a live lease written by another process (or an earlier
    /// run of this one); always false in a store without leases.
    pub(crate) online: bool,
}

/// An online user's lease: what a store with leases keeps while they are online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OnlineLease {
    pub(crate) user_id: i64,
    /// Wall-clock ms of the heartbeat that brought the user online.
    pub(crate) since_ms: i64,
    /// Wall-clock ms of their latest heartbeat at the time of the write: their
    /// last seen if this process dies before a clean offline.
    pub(crate) last_heartbeat_ms: i64,
}

/// Where last-seen times and privacy choices are kept.
pub(crate) trait PresenceStore: Send + Sync + std::fmt::Debug + 'static {
    /// Returns the rows of those of `user_ids` that have one.
    fn load<'a>(
        &'a self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, StoredPresence>, StoreError>>;

    /// Writes `(user_id, last_seen_ms)` rows, all in one transaction; a stored
    /// time never goes backwards.
    fn write_last_seen<'a>(
        &'a self,
        rows: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Stores `user_id`'s privacy choice.
    fn set_visibility(
        &self,
        user_id: i64,
        visibility: Visibility,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Returns how often an online user's lease is renewed, or `None` for a
    /// store without leases (the default). With leases, the store is shared:
    /// a user may be online through another process, and last seen is written
    /// only once a user went offline (while online, the lease carries it).
    fn lease_period(&self) -> Option<Duration> {
        None
    }

    /// Queues the leases of users online now (coming online, or renewed).
    /// Never blocks, and never fails (a failed write is logged; the next
    /// renewal repairs it): it is called under the state lock, so that one
    /// user's lease writes reach the store in the order of the changes.
    fn put_online(&self, _leases: &[OnlineLease]) {}

    /// Queues the removal of the leases of users who went offline, each with
    /// its last seen (`(user id, ms)`), written before the lease goes so that
    /// a crash right after cannot lose it; like [`put_online`](Self::put_online).
    /// A lease that is never removed expires.
    fn put_offline(&self, _gone: &[(i64, i64)]) {}

    /// Resolves once the lease writes queued so far are written (or failed):
    /// a disconnect answers after the user's last seen is in the store.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Finishes the queued lease writes and stops background work (shutdown).
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}
