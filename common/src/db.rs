//! Opening SQLite databases the way Confab needs them.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

mod malloc;
mod page_cache;
mod wal_buffer;

/// Gives SQLite, once per process and before its first connection, the
/// allocator ([`malloc`]) and page cache ([`page_cache`]) every connection
/// uses: SQLite takes both only before it is initialised. Every way this
/// module opens a connection calls it first.
fn configure() {
    static CONFIGURED: std::sync::Once = std::sync::Once::new();
    CONFIGURED.call_once(|| {
        if !malloc::install() {
            tracing::warn!(
                "SQLite was initialised before Confab could configure it: \
                 it allocates with the C library's malloc"
            );
        }
        page_cache::install();
    });
}

/// Returns the connect options for the SQLite file at `path`: WAL journal, so that
/// readers never wait for the writer, and `synchronous = FULL`, so that a commit
/// returns only once its WAL frames are flushed to disk (a commit survives a power
/// loss; DESIGN.md section 4). Files are opened through [`wal_buffer`]'s VFS,
/// which writes a commit's WAL frames in one call, and their pages cached by
/// [`page_cache`].
pub fn sqlite_options(path: &Path) -> SqliteConnectOptions {
    configure();
    let options = SqliteConnectOptions::new();
    let options = match wal_buffer::name() {
        Some(vfs) => options.vfs(vfs),
        None => options,
    };
    options
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        .pragma("temp_store", "memory")
}

/// How long a statement waits for another connection's lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens (creating if needed) the SQLite file at `path` as [`sqlite_options`]
/// does, as a connection whose statements run on the thread that calls them:
/// for a serial stage that would otherwise hand every call to sqlx's thread of
/// the connection and wait to be woken again (the message writer).
///
/// # Errors
///
/// Fails when the file cannot be opened or created, or a setting not applied.
pub fn sqlite_connection(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::{Connection, OpenFlags};

    configure();
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = match wal_buffer::name() {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs)?,
        None => Connection::open_with_flags(path, flags)?,
    };
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// Opens (creating if needed) a pool on the SQLite file at `path`.
///
/// # Errors
///
/// Fails when the file cannot be opened or created.
pub async fn open_sqlite(path: &Path, max_connections: u32) -> Result<SqlitePool, sqlx::Error> {
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .connect_with(sqlite_options(path))
        .await
}

/// Opens an in-memory database, for unit tests.
///
/// # Errors
///
/// Fails when SQLite cannot allocate the database.
pub async fn open_sqlite_memory() -> Result<SqlitePool, sqlx::Error> {
    configure();
    // One connection: every connection to ":memory:" is a database of its own.
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::from_str("sqlite::memory:")?.foreign_keys(true))
        .await
}

/// One migration embedded in the binary: its version, a description, its SQL.
pub type EmbeddedMigration = (i64, &'static str, &'static str);

/// Returns a migrator over `migrations`, recording what it applied in `table`,
/// so that services sharing one database keep their versions apart.
pub fn embedded_migrator(
    table: &'static str,
    migrations: &[EmbeddedMigration],
) -> sqlx::migrate::Migrator {
    use sqlx::SqlSafeStr as _;
    use sqlx::migrate::{Migration, MigrationType, Migrator};

    let migrations = migrations
        .iter()
        .map(|&(version, description, sql)| {
            Migration::new(
                version,
                description.into(),
                MigrationType::Simple,
                sql.into_sql_str(),
                false,
            )
        })
        .collect();
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(table);
    migrator
}

#[cfg(test)]
mod tests {
    /// The bundled SQLite keeps no memory statistics (`.cargo/config.toml`):
    /// with them every allocation and free of SQLite's took one global mutex,
    /// which the tokio thread dropping a row's values and the SQLite threads
    /// allocating fought over (futex calls per message, with receipts: 4.9 →
    /// 3.8).
    #[tokio::test]
    async fn sqlite_keeps_no_memory_statistics() {
        let pool = super::open_sqlite_memory().await.unwrap();
        let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert!(
            options.iter().any(|option| option == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
    }

    /// A connection of [`super::sqlite_connection`] has the settings of one
    /// of sqlx's through [`super::sqlite_options`].
    #[tokio::test]
    async fn both_openers_agree() {
        use sqlx::ConnectOptions as _;

        const SETTINGS: [&str; 6] = [
            "journal_mode",
            "synchronous",
            "busy_timeout",
            "foreign_keys",
            "temp_store",
            "cache_size",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let mut sqlx_conn = super::sqlite_options(&path).connect().await.unwrap();
        let conn = super::sqlite_connection(&path).unwrap();
        for setting in SETTINGS {
            let pragma = format!("PRAGMA {setting}");
            let row = sqlx::query(sqlx::AssertSqlSafe(pragma.clone()))
                .fetch_one(&mut sqlx_conn)
                .await
                .unwrap();
            // Unchecked: SQLite gives an integer setting as text when asked.
            let from_sqlx: String = sqlx::Row::try_get_unchecked(&row, 0).unwrap();
            let own: rusqlite::types::Value =
                conn.query_row(&pragma, [], |row| row.get(0)).unwrap();
            let own = match own {
                rusqlite::types::Value::Integer(value) => value.to_string(),
                rusqlite::types::Value::Text(value) => value,
                other => panic!("{setting}: {other:?}"),
            };
            assert_eq!(own, from_sqlx, "{setting}");
        }
    }

    /// A statement whose LIMIT is a bound parameter keeps its plan across
    /// bindings. The bundled SQLite is built with the query planner stability
    /// guarantee (`.cargo/config.toml`); without it SQLite 3.51 re-prepares
    /// such a statement at its first step after every new binding (the catch-up
    /// page, the history page). `sqlite_stmt` (also enabled there) counts the
    /// re-preparations.
    #[tokio::test]
    async fn bound_limits_do_not_reprepare() {
        let pool = super::open_sqlite_memory().await.unwrap();
        let mut conn = pool.acquire().await.unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .execute(&mut *conn)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t VALUES (1), (2), (3), (4), (5), (6)")
            .execute(&mut *conn)
            .await
            .unwrap();
        for (after, limit) in [(0, 1), (1, 2), (2, 3)] {
            let page: Vec<i64> =
                sqlx::query_scalar("SELECT k FROM t WHERE k > $1 ORDER BY k LIMIT $2")
                    .bind(after)
                    .bind(limit)
                    .fetch_all(&mut *conn)
                    .await
                    .unwrap();
            assert_eq!(page.len(), usize::try_from(limit).unwrap());
        }
        let (runs, repreparations): (i64, i64) = sqlx::query_as(
            "SELECT run, reprep FROM sqlite_stmt WHERE sql LIKE 'SELECT k FROM t %'",
        )
        .fetch_one(&mut *conn)
        .await
        .unwrap();
        assert_eq!((runs, repreparations), (3, 0));
    }
}
