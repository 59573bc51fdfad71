//! group-svc: users, conversations and membership (DESIGN.md sections 1 and 11).
//!
//! - [`GroupService`] (this file): the service, cheap to clone; the binary opens it
//!   with [`GroupService::open_sqlite`] and serves it through the generated
//!   `GroupsServer`.
//! - `accounts`: registration, Argon2id password checks and user lookups.
//! - `conversations`: direct conversations and conversation lookups.
//! - `groups`: groups and channels: [`GroupLimits`], the metadata rules, creation
//!   and metadata updates.
//! - `membership`: adding, removing, leaving, joining, roles, member lookups; and
//!   the change (conversation, notice) every mutation returns.
//! - `store`: the records the storage returns, and its backends (`store/sqlite.rs`,
//!   with the schema in `migrations/`; `store/sqlite/change.rs`, the transaction of
//!   one membership or metadata change).
//! - `grpc`: the generated `Groups` trait on top: protobuf <-> domain, errors ->
//!   statuses, nothing else.
//! - `error`: [`GroupError`], the causes of failure, and their gRPC codes.

mod accounts;
mod conversations;
mod error;
mod groups;
mod grpc;
mod membership;
mod store;

use std::path::Path;
use std::sync::Arc;

use confab_common::ids::Snowflake;

use crate::accounts::Passwords;
use crate::store::SqliteStore;

pub use crate::error::GroupError;
pub use crate::groups::GroupLimits;

/// Connections to the SQLite file: WAL lets readers run beside the one writer.
const MAX_CONNECTIONS: u32 = 8;

/// Users, conversations and membership; implements the generated
/// `confab_proto::group::v1::groups_server::Groups` trait.
#[derive(Debug, Clone)]
pub struct GroupService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Where users, conversations and members live.
    store: SqliteStore,
    /// Makes the ids of new users and conversations.
    ids: Snowflake,
    /// Hashes and checks passwords off the async runtime.
    passwords: Passwords,
    /// How large groups and channels may grow.
    limits: GroupLimits,
}

impl GroupService {
    /// Opens (creating) the SQLite database at `path` and runs migrations.
    ///
    /// `node_id` is this process's leased Snowflake node id; `limits` bound the
    /// sizes of groups and channels.
    ///
    /// # Errors
    ///
    /// Fails when the database cannot be opened or migrated.
    ///
    /// # Panics
    ///
    /// Panics when `node_id` is 1024 or more.
    pub async fn open_sqlite(
        path: &Path,
        node_id: u16,
        limits: GroupLimits,
    ) -> Result<Self, GroupError> {
        let pool = confab_common::db::open_sqlite(path, MAX_CONNECTIONS).await?;
        Self::from_pool(pool, node_id, limits).await
    }

    /// Uses an existing pool (tests use `db::open_sqlite_memory()`), and runs
    /// migrations on it.
    ///
    /// # Errors
    ///
    /// Fails when the database cannot be migrated.
    ///
    /// # Panics
    ///
    /// Panics when `node_id` is 1024 or more.
    pub async fn from_pool(
        pool: sqlx::SqlitePool,
        node_id: u16,
        limits: GroupLimits,
    ) -> Result<Self, GroupError> {
        let passwords = Passwords::new(argon2::Params::default()).await?;
        Self::with_passwords(pool, node_id, limits, passwords).await
    }

    /// Returns the service with the given password hasher (tests use cheap ones).
    async fn with_passwords(
        pool: sqlx::SqlitePool,
        node_id: u16,
        limits: GroupLimits,
        passwords: Passwords,
    ) -> Result<Self, GroupError> {
        let store = SqliteStore::new(pool).await?;
        let inner = Inner {
            store,
            ids: Snowflake::new(node_id),
            passwords,
            limits,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }
}

#[cfg(test)]
mod test_support {
    use super::*;

    /// Returns a service on a fresh in-memory database, with cheap password hashing.
    pub(crate) async fn memory_service() -> GroupService {
        memory_service_with(GroupLimits::default()).await
    }

    /// Returns a service with `limits` on a fresh in-memory database, with cheap
    /// password hashing.
    pub(crate) async fn memory_service_with(limits: GroupLimits) -> GroupService {
        let pool = confab_common::db::open_sqlite_memory().await.unwrap();
        let passwords = Passwords::cheap_for_tests().await;
        GroupService::with_passwords(pool, 1, limits, passwords)
            .await
            .unwrap()
    }
}
