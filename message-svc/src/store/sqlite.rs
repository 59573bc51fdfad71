//! The SQLite backend: a read pool for [`MessageStore`] and one dedicated
//! connection for [`LogWriter`]. WAL mode lets readers run while the writer
//! commits; `synchronous = FULL` makes every commit durable (`confab_common::db`).

use std::path::Path;

use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{ConnectOptions as _, Connection as _, Row as _, SqlitePool};

use super::{
    BoxFuture, HistoryQuery, LogWriter, MessageStore, Page, StoreError, StoredMessage, UserEvent,
};

const SCHEMA: &str = include_str!("schema.sql");

/// Readers in the pool: reads never wait for the writer in WAL mode, so a few
/// connections serve many concurrent calls.
const READ_CONNECTIONS: u32 = 4;

/// Opens the database at `path`, creating the schema if needed, and returns the
/// read side and the write side.
///
/// # Errors
///
/// Fails when the file cannot be opened or the schema cannot be created.
pub(crate) async fn open(path: &Path) -> Result<(SqliteStore, SqliteLogWriter), StoreError> {
    let mut conn = confab_common::db::sqlite_options(path).connect().await?;
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
    let pool = confab_common::db::open_sqlite(path, READ_CONNECTIONS).await?;
    Ok((SqliteStore { pool }, SqliteLogWriter { conn }))
}

/// The read side, on a connection pool.
#[derive(Debug, Clone)]
pub(crate) struct SqliteStore {
    pool: SqlitePool,
}

/// The write side, on its own connection: a single writer needs no pool, and a
/// dedicated connection cannot be starved by readers.
#[derive(Debug)]
pub(crate) struct SqliteLogWriter {
    conn: SqliteConnection,
}

fn message_from_row(row: &SqliteRow) -> Result<StoredMessage, sqlx::Error> {
    Ok(StoredMessage {
        id: row.try_get("id")?,
        conversation_id: row.try_get("conversation_id")?,
        sender_id: row.try_get("sender_id")?,
        sender_device: row.try_get("sender_device")?,
        client_msg_id: row.try_get("client_msg_id")?,
        sent_at_ms: row.try_get("sent_at_ms")?,
        text: row.try_get("text")?,
    })
}

/// Converts a sequence number for a BIGINT column; sequences never come near
/// `i64::MAX`, and a client's cursor beyond it matches nothing either way.
fn seq_to_sql(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn seq_from_sql(seq: i64) -> u64 {
    u64::try_from(seq).unwrap_or(0)
}

impl MessageStore for SqliteStore {
    fn history(
        &self,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Page<StoredMessage>, StoreError>> {
        Box::pin(async move {
            // One row more than the page tells whether the scan has more.
            let fetch = i64::from(query.limit) + 1;
            let upwards = query.after.is_some() && query.before.is_none();
            let rows = if upwards {
                sqlx::query(
                    "SELECT id, conversation_id, sender_id, sender_device, client_msg_id, \
                     sent_at_ms, text FROM messages \
                     WHERE conversation_id = ?1 AND id > ?2 ORDER BY id ASC LIMIT ?3",
                )
                .bind(query.conversation_id)
                .bind(query.after.unwrap_or(i64::MIN))
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            } else {
                sqlx::query(
                    "SELECT id, conversation_id, sender_id, sender_device, client_msg_id, \
                     sent_at_ms, text FROM messages \
                     WHERE conversation_id = ?1 AND id < ?2 AND id > ?3 \
                     ORDER BY id DESC LIMIT ?4",
                )
                .bind(query.conversation_id)
                .bind(query.before.unwrap_or(i64::MAX))
                .bind(query.after.unwrap_or(i64::MIN))
                .bind(fetch)
                .fetch_all(&self.pool)
                .await?
            };
            let has_more = rows.len() > query.limit as usize;
            let mut items = rows
                .iter()
                .take(query.limit as usize)
                .map(message_from_row)
                .collect::<Result<Vec<_>, _>>()?;
            if upwards {
                items.reverse();
            }
            Ok(Page { items, has_more })
        })
    }

    fn sync(
        &self,
        user_id: i64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Page<UserEvent>, StoreError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT e.seq AS seq, m.id AS id, m.conversation_id AS conversation_id, \
                 m.sender_id AS sender_id, m.sender_device AS sender_device, \
                 m.client_msg_id AS client_msg_id, m.sent_at_ms AS sent_at_ms, m.text AS text \
                 FROM user_events e JOIN messages m ON m.id = e.message_id \
                 WHERE e.user_id = ?1 AND e.seq > ?2 ORDER BY e.seq ASC LIMIT ?3",
            )
            .bind(user_id)
            .bind(seq_to_sql(after))
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.pool)
            .await?;
            let has_more = rows.len() > limit as usize;
            let items = rows
                .iter()
                .take(limit as usize)
                .map(|row| {
                    Ok(UserEvent {
                        seq: seq_from_sql(row.try_get("seq")?),
                        message: message_from_row(row)?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(Page { items, has_more })
        })
    }

    fn last_messages<'a>(
        &'a self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            // One index seek per conversation, on one connection: portable, and
            // cheaper than a GROUP BY that may scan whole conversations.
            let mut conn = self.pool.acquire().await?;
            let mut messages = Vec::with_capacity(conversation_ids.len());
            for &conversation_id in conversation_ids {
                let row = sqlx::query(
                    "SELECT id, conversation_id, sender_id, sender_device, client_msg_id, \
                     sent_at_ms, text FROM messages \
                     WHERE conversation_id = ?1 ORDER BY id DESC LIMIT 1",
                )
                .bind(conversation_id)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some(row) = row {
                    messages.push(message_from_row(&row)?);
                }
            }
            Ok(messages)
        })
    }
}

impl LogWriter for SqliteLogWriter {
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        // IMMEDIATE takes the write lock now rather than at the first INSERT, so a
        // busy database is waited for (busy_timeout) before any work is done.
        Box::pin(async move {
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut self.conn)
                .await?;
            Ok(())
        })
    }

    fn find_sent<'a>(
        &'a mut self,
        sender_id: i64,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredMessage>, StoreError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT id, conversation_id, sender_id, sender_device, client_msg_id, \
                 sent_at_ms, text FROM messages WHERE sender_id = ?1 AND client_msg_id = ?2",
            )
            .bind(sender_id)
            .bind(client_msg_id)
            .fetch_optional(&mut self.conn)
            .await?;
            Ok(row.as_ref().map(message_from_row).transpose()?)
        })
    }

    fn last_seq(&mut self, user_id: i64) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            let last: Option<i64> =
                sqlx::query_scalar("SELECT MAX(seq) FROM user_events WHERE user_id = ?1")
                    .bind(user_id)
                    .fetch_one(&mut self.conn)
                    .await?;
            Ok(last.map_or(0, seq_from_sql))
        })
    }

    fn insert_message<'a>(
        &'a mut self,
        message: &'a StoredMessage,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO messages (id, conversation_id, sender_id, sender_device, \
                 client_msg_id, sent_at_ms, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(message.id)
            .bind(message.conversation_id)
            .bind(message.sender_id)
            .bind(&message.sender_device)
            .bind(&message.client_msg_id)
            .bind(message.sent_at_ms)
            .bind(&message.text)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    fn insert_event(
        &mut self,
        user_id: i64,
        seq: u64,
        message_id: i64,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO user_events (user_id, seq, kind, message_id) VALUES (?1, ?2, 1, ?3)",
            )
            .bind(user_id)
            .bind(seq_to_sql(seq))
            .bind(message_id)
            .execute(&mut self.conn)
            .await?;
            Ok(())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            sqlx::raw_sql("COMMIT").execute(&mut self.conn).await?;
            Ok(())
        })
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // SQLite ends the transaction itself on some errors; then there is
            // nothing left to roll back.
            match sqlx::raw_sql("ROLLBACK").execute(&mut self.conn).await {
                Err(sqlx::Error::Database(error))
                    if error.message().contains("no transaction is active") =>
                {
                    Ok(())
                }
                Err(error) => Err(error.into()),
                Ok(_) => Ok(()),
            }
        })
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::pin(async move {
            self.conn.close().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64, conversation_id: i64) -> StoredMessage {
        StoredMessage {
            id,
            conversation_id,
            sender_id: 1,
            sender_device: "phone".into(),
            client_msg_id: format!("c{id}"),
            sent_at_ms: 1_000 + id,
            text: format!("text {id}"),
        }
    }

    /// Writes messages 1..=n to conversation 7 (and one to conversation 8), with
    /// an event of user 1 each.
    async fn seeded(dir: &tempfile::TempDir, n: i64) -> SqliteStore {
        let (store, mut log) = open(&dir.path().join("m.db")).await.unwrap();
        log.begin().await.unwrap();
        for id in 1..=n {
            log.insert_message(&message(id, 7)).await.unwrap();
            log.insert_event(1, id as u64, id).await.unwrap();
        }
        log.insert_message(&message(1_000, 8)).await.unwrap();
        log.commit().await.unwrap();
        store
    }

    fn ids(page: &Page<StoredMessage>) -> Vec<i64> {
        page.items.iter().map(|m| m.id).collect()
    }

    fn query(before: Option<i64>, after: Option<i64>, limit: u32) -> HistoryQuery {
        HistoryQuery {
            conversation_id: 7,
            before,
            after,
            limit,
        }
    }

    /// History pages run newest first; `has_more` says whether the scan has more,
    /// downwards from `before` and upwards from `after`.
    #[tokio::test]
    async fn history_pagination() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(&dir, 7).await;

        let newest = store.history(query(None, None, 3)).await.unwrap();
        assert_eq!((ids(&newest), newest.has_more), (vec![7, 6, 5], true));
        let older = store.history(query(Some(5), None, 3)).await.unwrap();
        assert_eq!((ids(&older), older.has_more), (vec![4, 3, 2], true));
        let oldest = store.history(query(Some(2), None, 3)).await.unwrap();
        assert_eq!((ids(&oldest), oldest.has_more), (vec![1], false));
        let exact = store.history(query(Some(4), None, 3)).await.unwrap();
        assert_eq!((ids(&exact), exact.has_more), (vec![3, 2, 1], false));

        let newer = store.history(query(None, Some(2), 3)).await.unwrap();
        assert_eq!((ids(&newer), newer.has_more), (vec![5, 4, 3], true));
        let newest_after = store.history(query(None, Some(5), 3)).await.unwrap();
        assert_eq!(
            (ids(&newest_after), newest_after.has_more),
            (vec![7, 6], false)
        );

        let between = store.history(query(Some(6), Some(2), 2)).await.unwrap();
        assert_eq!((ids(&between), between.has_more), (vec![5, 4], true));
        let all_between = store.history(query(Some(6), Some(2), 10)).await.unwrap();
        assert_eq!(
            (ids(&all_between), all_between.has_more),
            (vec![5, 4, 3], false)
        );
    }

    /// Sync returns a user's events after the cursor in seq order, with `has_more`.
    #[tokio::test]
    async fn sync_pages_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(&dir, 5).await;
        let page = store.sync(1, 1, 3).await.unwrap();
        let seqs: Vec<u64> = page.items.iter().map(|e| e.seq).collect();
        assert_eq!((seqs, page.has_more), (vec![2, 3, 4], true));
        assert_eq!(page.items[0].message, message(2, 7));
        let rest = store.sync(1, 4, 3).await.unwrap();
        assert_eq!((rest.items.len(), rest.has_more), (1, false));
        assert!(store.sync(2, 0, 10).await.unwrap().items.is_empty());
    }

    /// LastMessages returns the newest message of each conversation that has one.
    #[tokio::test]
    async fn last_messages_newest_per_conversation() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(&dir, 3).await;
        let last = store.last_messages(&[7, 8, 9]).await.unwrap();
        assert_eq!(
            last.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![3, 1_000]
        );
    }

    /// The unique index refuses a second (sender, client_msg_id), and a rolled
    /// back transaction leaves nothing behind.
    #[tokio::test]
    async fn unique_client_msg_id_and_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut log) = open(&dir.path().join("m.db")).await.unwrap();
        log.begin().await.unwrap();
        log.insert_message(&message(1, 7)).await.unwrap();
        let mut copy = message(2, 7);
        copy.client_msg_id = "c1".into();
        assert!(log.insert_message(&copy).await.is_err());
        log.rollback().await.unwrap();
        log.rollback().await.unwrap();
        assert!(
            store
                .history(query(None, None, 10))
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }
}
