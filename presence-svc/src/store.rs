//! Durable last-seen times and privacy choices, behind a small trait. One file
//! per backend: [`sqlite`] for the embedded mode; `memory` for the unit tests
//! whose clock is paused (a SQLite call waits on a worker thread, during which a
//! paused tokio clock would jump ahead to the next timer).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod sqlite;

/// A boxed future, so that the store trait can be used as a trait object.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An SQL statement failed.
    #[error("sql statement failed")]
    Sql(#[from] sqlx::Error),
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
    pub(crate) last_seen_ms: i64,
    pub(crate) visibility: Visibility,
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
}
