//! The SQLite backend (the embedded mode's `presence.db`): a small pool, WAL and
//! `synchronous = FULL` (`confab_common::db`).

use std::collections::HashMap;
use std::path::Path;

use sqlx::{QueryBuilder, Row as _, Sqlite, SqlitePool};

use super::{BoxFuture, PresenceStore, StoreError, StoredPresence, Visibility};

const SCHEMA: &str = include_str!("schema.sql");

/// Connections in the pool: one sweep writes at a time, a few queries read.
const CONNECTIONS: u32 = 4;

/// Rows per statement: 2 bound parameters each, far below SQLite's limit of
/// 32,766, and the same statement text for every full chunk.
const ROWS_PER_STATEMENT: usize = 500;

/// Last-seen times and privacy choices in one SQLite file.
#[derive(Debug)]
pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the database at `path`, creating the schema if needed.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be opened or the schema cannot be created.
    pub(crate) async fn open(path: &Path) -> Result<Self, StoreError> {
        let pool = confab_common::db::open_sqlite(path, CONNECTIONS).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }
}

impl PresenceStore for SqliteStore {
    fn load<'a>(
        &'a self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, StoredPresence>, StoreError>> {
        Box::pin(async move {
            let mut found = HashMap::with_capacity(user_ids.len());
            for chunk in user_ids.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT user_id, last_seen_ms, last_seen_visibility FROM presence \
                     WHERE user_id IN (",
                );
                let mut ids = query.separated(", ");
                for &user_id in chunk {
                    ids.push_bind(user_id);
                }
                query.push(")");
                let rows = query
                    .build()
                    .persistent(false)
                    .fetch_all(&self.pool)
                    .await?;
                for row in &rows {
                    let stored = StoredPresence {
                        last_seen_ms: row.try_get("last_seen_ms")?,
                        visibility: Visibility::from_code(row.try_get("last_seen_visibility")?),
                        online: false,
                    };
                    found.insert(row.try_get("user_id")?, stored);
                }
            }
            Ok(found)
        })
    }

    fn write_last_seen<'a>(
        &'a self,
        rows: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut query =
                    QueryBuilder::<Sqlite>::new("INSERT INTO presence (user_id, last_seen_ms) ");
                query.push_values(chunk, |mut row, &(user_id, last_seen_ms)| {
                    row.push_bind(user_id).push_bind(last_seen_ms);
                });
                // CASE rather than SQLite's MAX(a, b) or PostgreSQL's GREATEST:
                // the same text runs on both. A time never goes backwards, whoever
                // wrote last.
                query.push(
                    " ON CONFLICT (user_id) DO UPDATE SET last_seen_ms = \
                     CASE WHEN excluded.last_seen_ms > presence.last_seen_ms \
                     THEN excluded.last_seen_ms ELSE presence.last_seen_ms END",
                );
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_visibility(
        &self,
        user_id: i64,
        visibility: Visibility,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO presence (user_id, last_seen_visibility) VALUES (?1, ?2) \
                 ON CONFLICT (user_id) DO UPDATE \
                 SET last_seen_visibility = excluded.last_seen_visibility",
            )
            .bind(user_id)
            .bind(visibility.code())
            .execute(&self.pool)
            .await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch larger than one statement is written whole, and a stored time
    /// never goes backwards; privacy and last seen live in the same row.
    #[tokio::test]
    async fn batch_upsert_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("presence.db"))
            .await
            .unwrap();
        let rows: Vec<(i64, i64)> = (1..=1_201).map(|id| (id, id * 10)).collect();
        store.write_last_seen(&rows).await.unwrap();
        store.write_last_seen(&[(7, 5), (8, 500)]).await.unwrap();
        store.set_visibility(8, Visibility::Nobody).await.unwrap();
        store
            .set_visibility(5_000, Visibility::Everyone)
            .await
            .unwrap();
        let ids: Vec<i64> = (1..=1_201).chain([5_000, 9_999]).collect();
        let loaded = store.load(&ids).await.unwrap();
        assert_eq!(loaded.len(), 1_202);
        assert_eq!(loaded[&1_201].last_seen_ms, 12_010);
        assert_eq!(loaded[&7].last_seen_ms, 70, "never backwards");
        let eight = StoredPresence {
            last_seen_ms: 500,
            visibility: Visibility::Nobody,
            online: false,
        };
        assert_eq!(loaded[&8], eight);
        let stranger = StoredPresence {
            last_seen_ms: 0,
            visibility: Visibility::Everyone,
            online: false,
        };
        assert_eq!(loaded[&5_000], stranger);
    }
}
