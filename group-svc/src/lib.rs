//! group-svc: users, conversations and membership (DESIGN.md sections 1 and 11).
//!
//! - [`GroupService`] (this file): the service, cheap to clone; the binary opens it
//!   with [`GroupService::open_sqlite`] (embedded mode) or
//!   [`GroupService::open_postgres`] (distributed mode) and serves it through the
//!   generated `GroupsServer`.
//! - `accounts`: registration, Argon2id password checks and user lookups.
//! - `conversations`: direct conversations and conversation lookups.
//! - `groups`: groups and channels: [`GroupLimits`], the metadata rules, creation
//!   and metadata updates.
//! - `membership`: adding, removing, leaving, joining, roles, member lookups; and
//!   the change (conversation, notice) every mutation returns.
//! - `store`: the records the storage returns, and the store over its two backends:
//!   SQLite (`store/sqlite.rs`, schema in `migrations/`) for the embedded mode,
//!   PostgreSQL (`store/postgres.rs`, schema in `migrations-postgres/`, applied by
//!   [`migrate_postgres`]) for the distributed mode; `store/change.rs`, the
//!   transaction of one membership or metadata change.
//! - `grpc`: the generated `Groups` trait on top: protobuf <-> domain, errors ->
//!   statuses, nothing else.
//! - `error`: [`GroupError`], the causes of failure, and their gRPC codes.
//! - `test_support` (tests only): services on a fresh database of either backend,
//!   and `backend_tests!`, which runs one test on both.

mod accounts;
mod conversations;
mod error;
mod groups;
mod grpc;
mod membership;
mod store;
#[cfg(test)]
mod test_support;

use std::path::Path;
use std::sync::Arc;

use confab_common::ids::Snowflake;

use crate::accounts::{NewUsers, Passwords};
use crate::store::Store;

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
    store: Store,
    /// Makes the ids of new users and conversations.
    ids: Snowflake,
    /// Hashes and checks passwords off the async runtime.
    passwords: Passwords,
    /// Users `EnsureUser` creates, inserted together.
    new_users: NewUsers,
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
        let store = Store::sqlite(pool).await?;
        let passwords = Passwords::new(argon2::Params::default()).await?;
        Ok(Self::with_parts(store, node_id, limits, passwords))
    }

    /// Uses a PostgreSQL pool, for the distributed mode. Does not migrate: run
    /// [`migrate_postgres`] on the database first (once per deployment).
    ///
    /// `node_id` is this process's leased Snowflake node id; `limits` bound the
    /// sizes of groups and channels.
    ///
    /// # Errors
    ///
    /// Fails when the password hasher cannot be set up.
    ///
    /// # Panics
    ///
    /// Panics when `node_id` is 1024 or more.
    pub async fn open_postgres(
        pool: sqlx::PgPool,
        node_id: u16,
        limits: GroupLimits,
    ) -> Result<Self, GroupError> {
        let passwords = Passwords::new(argon2::Params::default()).await?;
        Ok(Self::with_parts(
            Store::postgres(pool),
            node_id,
            limits,
            passwords,
        ))
    }

    /// Returns the service on `store`, with the given password hasher (tests use
    /// cheap ones).
    fn with_parts(store: Store, node_id: u16, limits: GroupLimits, passwords: Passwords) -> Self {
        let inner = Inner {
            store,
            ids: Snowflake::new(node_id),
            passwords,
            new_users: NewUsers::default(),
            limits,
        };
        Self {
            inner: Arc::new(inner),
        }
    }
}

/// Brings the PostgreSQL schema of group-svc up to date: creates the tables on an
/// empty database, applies what is missing on an older one, does nothing on a
/// current one. Applied versions are recorded in the table `_group_svc_migrations`.
///
/// Run it before [`GroupService::open_postgres`]; concurrent runs are safe (sqlx
/// takes an advisory lock while it migrates).
///
/// # Errors
///
/// Fails when the database cannot be reached, a migration fails, or the database
/// holds a version this binary does not know or a changed one.
pub async fn migrate_postgres(pool: &sqlx::PgPool) -> Result<(), GroupError> {
    store::migrate_postgres(pool).await
}

#[cfg(test)]
mod tests {
    use confab_common::testkit::PgDatabase;

    use super::*;

    /// `open_postgres` serves a database that `migrate_postgres` prepared, and sees
    /// what an earlier service wrote there.
    #[tokio::test]
    async fn open_postgres_after_migrate() {
        let database = PgDatabase::create().await;
        let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
        migrate_postgres(&pool).await.unwrap();
        let first = GroupService::open_postgres(pool.clone(), 1, GroupLimits::default())
            .await
            .unwrap();
        let created = first.ensure_user("Alice").await;
        let second = GroupService::open_postgres(pool.clone(), 2, GroupLimits::default())
            .await
            .unwrap();
        let found = second.get_user(0, "alice").await;
        pool.close().await;
        database.drop_database().await;

        let created = created.unwrap();
        assert_eq!(created.username, "alice");
        assert_eq!(found.unwrap(), created);
    }
}
