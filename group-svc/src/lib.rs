//! group-svc: users, conversations and membership (DESIGN.md sections 1 and 11).
//!
//! - [`GroupService`] (this file): the service, cheap to clone; the binary opens it
//!   with [`GroupService::open_sqlite`] and serves it through the generated
//!   `GroupsServer`.
//! - `accounts`: registration, Argon2id password checks and user lookups.
//! - `conversations`: direct conversations and membership queries.
//! - `store`: the records the storage returns, and its backends (`store/sqlite.rs`,
//!   with the schema in `migrations/`).
//! - `grpc`: the generated `Groups` trait on top: protobuf <-> domain, errors ->
//!   statuses, nothing else.
//! - `error`: [`GroupError`], the causes of failure, and their gRPC codes.

mod accounts;
mod conversations;
mod error;
mod grpc;
mod store;

use std::path::Path;
use std::sync::Arc;

use confab_common::ids::Snowflake;

use crate::accounts::Passwords;
use crate::store::SqliteStore;

pub use crate::error::GroupError;

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
}

impl GroupService {
    /// Opens (creating) the SQLite database at `path` and runs migrations.
    ///
    /// `node_id` is this process's leased Snowflake node id.
    ///
    /// # Errors
    ///
    /// Fails when the database cannot be opened or migrated.
    ///
    /// # Panics
    ///
    /// Panics when `node_id` is 1024 or more.
    pub async fn open_sqlite(path: &Path, node_id: u16) -> Result<Self, GroupError> {
        let pool = confab_common::db::open_sqlite(path, MAX_CONNECTIONS).await?;
        Self::from_pool(pool, node_id).await
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
    pub async fn from_pool(pool: sqlx::SqlitePool, node_id: u16) -> Result<Self, GroupError> {
        Self::with_passwords(
            pool,
            node_id,
            Passwords::new(argon2::Params::default()).await?,
        )
        .await
    }

    /// Returns the service with the given password hasher (tests use cheap ones).
    async fn with_passwords(
        pool: sqlx::SqlitePool,
        node_id: u16,
        passwords: Passwords,
    ) -> Result<Self, GroupError> {
        let store = SqliteStore::new(pool).await?;
        let inner = Inner {
            store,
            ids: Snowflake::new(node_id),
            passwords,
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
        let pool = confab_common::db::open_sqlite_memory().await.unwrap();
        GroupService::with_passwords(pool, 1, Passwords::cheap_for_tests().await)
            .await
            .unwrap()
    }
}
