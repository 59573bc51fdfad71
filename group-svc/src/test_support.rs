//! Services for tests, on a fresh database of either backend, and
//! [`backend_tests!`], which runs one test on both.
//!
//! A test written once as `async fn name(db: TestDb)` runs as `name::sqlite` on an
//! in-memory SQLite database and as `name::postgres` on a PostgreSQL database of its
//! own (`confab_common::testkit::PgDatabase`, on the server that
//! `CONFAB_TEST_POSTGRES_URL` names, by default 127.0.0.1:5432), dropped after the
//! test, also when it fails.

use std::future::Future;

use confab_common::testkit::PgDatabase;
use sqlx::postgres::PgPoolOptions;

use crate::accounts::Passwords;
use crate::store::Store;
use crate::{GroupLimits, GroupService, migrate_postgres};

/// Connections per test database on PostgreSQL: enough for the concurrency tests,
/// few enough for many tests at once under the server's connection limit.
const PG_CONNECTIONS_PER_TEST: u32 = 5;

/// The database of one test, empty and migrated.
#[derive(Debug, Clone)]
pub(crate) struct TestDb {
    /// The store on it; services made by [`TestDb::service_with`] share it.
    store: Store,
}

impl TestDb {
    /// Returns a service on this database, with the default limits and cheap
    /// password hashing.
    pub(crate) async fn service(&self) -> GroupService {
        self.service_with(GroupLimits::default()).await
    }

    /// Returns a service with `limits` on this database, with cheap password hashing.
    pub(crate) async fn service_with(&self, limits: GroupLimits) -> GroupService {
        let passwords = Passwords::cheap_for_tests().await;
        GroupService::with_parts(self.store.clone(), 1, limits, passwords)
    }
}

/// Runs `test` on a fresh in-memory SQLite database.
pub(crate) async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let pool = confab_common::db::open_sqlite_memory().await.unwrap();
    let store = Store::sqlite(pool).await.unwrap();
    test(TestDb { store }).await;
}

/// Runs `test` on a fresh, migrated PostgreSQL database, and drops the database
/// afterwards, whether the test passed or panicked.
pub(crate) async fn on_postgres<F, Fut>(test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let database = PgDatabase::create().await;
    let pool = PgPoolOptions::new()
        .max_connections(PG_CONNECTIONS_PER_TEST)
        .connect(&database.url)
        .await
        .unwrap();
    migrate_postgres(&pool).await.unwrap();
    let store = Store::postgres(pool.clone());
    // On a task of its own, so that a panic comes back here as an error and the
    // database is dropped before the panic goes on.
    let outcome = tokio::spawn(test(TestDb { store })).await;
    pool.close().await;
    database.drop_database().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

/// Returns a service on a fresh in-memory SQLite database, with cheap password
/// hashing, for tests of SQLite alone.
pub(crate) async fn memory_service() -> GroupService {
    memory_service_with(GroupLimits::default()).await
}

/// Returns a service with `limits` on a fresh in-memory SQLite database, with cheap
/// password hashing, for tests of SQLite alone.
pub(crate) async fn memory_service_with(limits: GroupLimits) -> GroupService {
    let pool = confab_common::db::open_sqlite_memory().await.unwrap();
    let store = Store::sqlite(pool).await.unwrap();
    TestDb { store }.service_with(limits).await
}

/// Declares, for each `name` given (an `async fn name(db: TestDb)` in scope), a
/// module `name` with two tests: `sqlite` and `postgres`.
///
/// `backend_tests!(multi_thread: a, b)` runs them on the multi-threaded runtime,
/// for tests of concurrent calls.
macro_rules! backend_tests {
    (multi_thread: $($name:ident),* $(,)?) => {
        $(
            $crate::test_support::backend_tests!(
                @one $name, tokio::test(flavor = "multi_thread", worker_threads = 4)
            );
        )*
    };
    ($($name:ident),* $(,)?) => {
        $( $crate::test_support::backend_tests!(@one $name, tokio::test); )*
    };
    (@one $name:ident, $test:meta) => {
        mod $name {
            #[$test]
            async fn sqlite() {
                $crate::test_support::on_sqlite(super::$name).await;
            }

            #[$test]
            async fn postgres() {
                $crate::test_support::on_postgres(super::$name).await;
            }
        }
    };
}

pub(crate) use backend_tests;
