//! The SQLite backend: a read pool for [`MessageStore`] and one dedicated
//! connection for [`LogWriter`]. WAL mode lets readers run while the writer
//! commits; `synchronous = FULL` makes every commit durable (`confab_common::db`).

use std::collections::HashMap;
use std::path::Path;

use sqlx::sqlite::{SqliteConnection, SqliteRow};
use sqlx::{ConnectOptions as _, Connection as _, QueryBuilder, Row as _, Sqlite, SqlitePool};

use super::{
    BoxFuture, HistoryQuery, LogWriter, MessageStore, Page, StoreError, StoredMessage, SyncPage,
    UserEvent,
};

const SCHEMA: &str = include_str!("schema.sql");

/// Readers in the pool: reads never wait for the writer in WAL mode, so a few
/// connections serve many concurrent calls.
const READ_CONNECTIONS: u32 = 4;

/// Prepared statements kept on the writer's connection: four batch statements of
/// at most ~15 texts each ([`chunk_sizes`]) plus the fixed ones fit with room to
/// spare. sqlx evicts the least recently used beyond it, so this bounds memory
/// whatever the texts.
const WRITER_STATEMENT_CACHE: usize = 128;

/// Opens the database at `path`, creating the schema if needed, and returns the
/// read side and the write side.
///
/// # Errors
///
/// Fails when the file cannot be opened or the schema cannot be created.
pub(crate) async fn open(path: &Path) -> Result<(SqliteStore, SqliteLogWriter), StoreError> {
    let mut conn = confab_common::db::sqlite_options(path)
        .statement_cache_capacity(WRITER_STATEMENT_CACHE)
        .connect()
        .await?;
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

/// `user_events.kind` of a new-message event (schema.sql).
const EVENT_KIND_MESSAGE: &str = "1";

/// Most bound parameters one SQLite statement may carry
/// (`SQLITE_MAX_VARIABLE_NUMBER`, 32766 since SQLite 3.32).
const MAX_BIND_PARAMS: usize = 32_766;

/// Returns the row counts of the statements that carry `rows` rows of `columns`
/// bound parameters each: as many full chunks as fit under [`MAX_BIND_PARAMS`],
/// then the remainder split into powers of two, largest first.
///
/// Why powers of two: sqlx prepares and caches one statement per distinct SQL
/// text, and a multi-row statement's text depends on its row count. Cutting
/// every remainder into 1, 2, 4, ... rows bounds the texts of one kind of
/// statement to about 15 (one full size and 14 powers of two below 10,922), so
/// the writer's four batch statements stay well inside its statement cache
/// ([`WRITER_STATEMENT_CACHE`]) and are prepared once, instead of preparing (and
/// evicting) a new text for nearly every batch size. The price is at most
/// log2(chunk) statements for a remainder, still independent of the number of
/// messages.
fn chunk_sizes(rows: usize, columns: usize) -> impl Iterator<Item = usize> {
    debug_assert!((1..=MAX_BIND_PARAMS).contains(&columns));
    let full = MAX_BIND_PARAMS / columns;
    let remainder = rows % full;
    let powers = (0..usize::BITS)
        .rev()
        .map(|bit| 1_usize << bit)
        .filter(move |power| remainder & power != 0);
    std::iter::repeat_n(full, rows / full).chain(powers)
}

/// Splits `items` into the chunks of [`chunk_sizes`].
fn chunks<T>(items: &[T], columns: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    chunk_sizes(items.len(), columns).map(move |size| {
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        chunk
    })
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
    ) -> BoxFuture<'_, Result<SyncPage, StoreError>> {
        Box::pin(async move {
            let mut conn = self.pool.acquire().await?;
            // The head first, and the page bounded by it: the two agree without a
            // read transaction. Every seq up to the head is committed when the
            // head is (one batch, one commit), so the page is gap-free up to it.
            let head: Option<i64> =
                sqlx::query_scalar("SELECT MAX(seq) FROM user_events WHERE user_id = ?1")
                    .bind(user_id)
                    .fetch_one(&mut *conn)
                    .await?;
            let head = head.unwrap_or(0);
            let rows = sqlx::query(
                "SELECT e.seq AS seq, m.id AS id, m.conversation_id AS conversation_id, \
                 m.sender_id AS sender_id, m.sender_device AS sender_device, \
                 m.client_msg_id AS client_msg_id, m.sent_at_ms AS sent_at_ms, m.text AS text \
                 FROM user_events e JOIN messages m ON m.id = e.message_id \
                 WHERE e.user_id = ?1 AND e.seq > ?2 AND e.seq <= ?3 \
                 ORDER BY e.seq ASC LIMIT ?4",
            )
            .bind(user_id)
            .bind(seq_to_sql(after))
            .bind(head)
            .bind(i64::from(limit) + 1)
            .fetch_all(&mut *conn)
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
            Ok(SyncPage {
                events: Page { items, has_more },
                head: seq_from_sql(head),
            })
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

    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            let mut found = Vec::new();
            for chunk in chunks(keys, 2) {
                // The keys as a constant table joined to the unique index: one index
                // seek per key (EXPLAIN QUERY PLAN: SCAN k, SEARCH m USING INDEX
                // messages_sender_client_msg_id).
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT m.id AS id, m.conversation_id AS conversation_id, \
                     m.sender_id AS sender_id, m.sender_device AS sender_device, \
                     m.client_msg_id AS client_msg_id, m.sent_at_ms AS sent_at_ms, \
                     m.text AS text FROM (",
                );
                query.push_values(chunk, |mut row, &(sender_id, client_msg_id)| {
                    row.push_bind(sender_id).push_bind(client_msg_id);
                });
                query.push(
                    ") AS k JOIN messages m \
                     ON m.sender_id = k.column1 AND m.client_msg_id = k.column2",
                );
                let rows = query.build().fetch_all(&mut self.conn).await?;
                for row in &rows {
                    found.push(message_from_row(row)?);
                }
            }
            Ok(found)
        })
    }

    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>> {
        Box::pin(async move {
            let mut last = HashMap::with_capacity(user_ids.len());
            for chunk in chunks(user_ids, 1) {
                // A correlated MAX per user is one seek at the end of the user's
                // primary-key range; `WHERE user_id IN (..) GROUP BY user_id` would
                // read every event of every user named (measured: 0.1 ms against
                // 120 ms for 3 users of 200,000 events each).
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT k.column1 AS user_id, \
                     (SELECT MAX(seq) FROM user_events WHERE user_id = k.column1) AS seq \
                     FROM (",
                );
                query.push_values(chunk, |mut row, &user_id| {
                    row.push_bind(user_id);
                });
                query.push(") AS k");
                let rows = query.build().fetch_all(&mut self.conn).await?;
                for row in &rows {
                    let seq: Option<i64> = row.try_get("seq")?;
                    if let Some(seq) = seq {
                        last.insert(row.try_get("user_id")?, seq_from_sql(seq));
                    }
                }
            }
            Ok(last)
        })
    }

    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(messages, 7) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO messages (id, conversation_id, sender_id, sender_device, \
                     client_msg_id, sent_at_ms, text) ",
                );
                query.push_values(chunk, |mut row, message| {
                    row.push_bind(message.id)
                        .push_bind(message.conversation_id)
                        .push_bind(message.sender_id)
                        .push_bind(message.sender_device.as_str())
                        .push_bind(message.client_msg_id.as_str())
                        .push_bind(message.sent_at_ms)
                        .push_bind(message.text.as_str());
                });
                query.build().execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    fn insert_events<'a>(
        &'a mut self,
        events: &'a [(i64, u64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(events, 3) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO user_events (user_id, seq, kind, message_id) ",
                );
                query.push_values(chunk, |mut row, &(user_id, seq, message_id)| {
                    row.push_bind(user_id)
                        .push_bind(seq_to_sql(seq))
                        .push(EVENT_KIND_MESSAGE)
                        .push_bind(message_id);
                });
                query.build().execute(&mut self.conn).await?;
            }
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
        let mut messages: Vec<StoredMessage> = (1..=n).map(|id| message(id, 7)).collect();
        messages.push(message(1_000, 8));
        log.insert_messages(&messages).await.unwrap();
        let events: Vec<(i64, u64, i64)> = (1..=n).map(|id| (1, id as u64, id)).collect();
        log.insert_events(&events).await.unwrap();
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
        let page = store.sync(1, 1, 3).await.unwrap().events;
        let seqs: Vec<u64> = page.items.iter().map(|e| e.seq).collect();
        assert_eq!((seqs, page.has_more), (vec![2, 3, 4], true));
        assert_eq!(page.items[0].message, message(2, 7));
        let rest = store.sync(1, 4, 3).await.unwrap().events;
        assert_eq!((rest.items.len(), rest.has_more), (1, false));
        assert!(store.sync(2, 0, 10).await.unwrap().events.items.is_empty());
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
        log.insert_messages(&[message(1, 7)]).await.unwrap();
        let mut copy = message(2, 7);
        copy.client_msg_id = "c1".into();
        assert!(log.insert_messages(&[copy.clone()]).await.is_err());
        // Two copies inside one multi-row INSERT are refused as well.
        let mut twin = message(3, 7);
        twin.client_msg_id = "c2".into();
        assert!(log.insert_messages(&[message(2, 7), twin]).await.is_err());
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

    /// Sync reports the user's head (0 without events) and never pages beyond it;
    /// a cursor at or beyond the head gets an empty page and the head.
    #[tokio::test]
    async fn sync_reports_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = seeded(&dir, 5).await;
        let page = store.sync(1, 0, 2).await.unwrap();
        assert_eq!((page.head, page.events.has_more), (5, true));
        let all = store.sync(1, 0, 100).await.unwrap();
        assert_eq!((all.head, all.events.items.len()), (5, 5));
        let beyond = store.sync(1, 9, 100).await.unwrap();
        assert_eq!(
            (
                beyond.head,
                beyond.events.items.len(),
                beyond.events.has_more
            ),
            (5, 0, false)
        );
        let nobody = store.sync(2, 0, 100).await.unwrap();
        assert_eq!((nobody.head, nobody.events.items.len()), (0, 0));
    }

    /// Chunks never exceed SQLite's parameter limit, cover every row in order,
    /// and come in few distinct sizes: full chunks, then powers of two.
    #[test]
    fn chunk_sizes_bounded_and_complete() {
        assert_eq!(
            chunk_sizes(18_000, 3).collect::<Vec<_>>(),
            vec![10_922, 4_096, 2_048, 512, 256, 128, 32, 4, 2]
        );
        assert_eq!(chunk_sizes(0, 7).count(), 0);
        assert_eq!(chunk_sizes(64, 7).collect::<Vec<_>>(), vec![64]);
        assert_eq!(chunk_sizes(4_680, 7).collect::<Vec<_>>(), vec![4_680]);
        let mut distinct = std::collections::BTreeSet::new();
        for columns in [1, 2, 3, 7] {
            for rows in (0..40_000).step_by(37) {
                let sizes: Vec<usize> = chunk_sizes(rows, columns).collect();
                assert_eq!(sizes.iter().sum::<usize>(), rows);
                assert!(sizes.iter().all(|size| size * columns <= MAX_BIND_PARAMS));
                distinct.extend(sizes.iter().map(|&size| (columns, size)));
            }
        }
        assert!(
            distinct.len() <= 4 * 16,
            "{} statement texts",
            distinct.len()
        );
        let items: Vec<u32> = (0..1_000).collect();
        let joined: Vec<u32> = chunks(&items, 7).flatten().copied().collect();
        assert_eq!(joined, items);
    }

    /// Each batch operation handles more rows than one statement may carry:
    /// 5,000 messages (7 parameters each), 15,000 events (3 each), 17,000 dedup
    /// keys (2 each) and 33,000 users (1 each), all found again.
    #[tokio::test]
    async fn batch_operations_span_several_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut log) = open(&dir.path().join("m.db")).await.unwrap();
        let messages: Vec<StoredMessage> = (1..=5_000).map(|id| message(id, 7)).collect();
        let events: Vec<(i64, u64, i64)> = messages
            .iter()
            .flat_map(|m| (1..=3).map(move |user| (user, m.id as u64, m.id)))
            .collect();
        assert!(messages.len() * 7 > MAX_BIND_PARAMS && events.len() * 3 > MAX_BIND_PARAMS);
        log.begin().await.unwrap();
        log.insert_messages(&messages).await.unwrap();
        log.insert_events(&events).await.unwrap();

        // Inside the transaction the writes are visible to the lookups.
        let missing: Vec<String> = (0..12_000).map(|i| format!("missing{i}")).collect();
        let keys: Vec<(i64, &str)> = messages
            .iter()
            .map(|m| (m.sender_id, m.client_msg_id.as_str()))
            .chain(missing.iter().map(|c| (1, c.as_str())))
            .collect();
        assert!(keys.len() * 2 > MAX_BIND_PARAMS);
        let mut found = log.find_sent_many(&keys).await.unwrap();
        found.sort_by_key(|m| m.id);
        assert_eq!(found, messages);

        let users: Vec<i64> = (0..33_000).collect();
        let last = log.last_seqs(&users).await.unwrap();
        assert_eq!(last, HashMap::from([(1, 5_000), (2, 5_000), (3, 5_000)]));
        log.commit().await.unwrap();

        for user in 1..=3 {
            let page = store.sync(user, 0, 10_000).await.unwrap();
            let seqs: Vec<u64> = page.events.items.iter().map(|e| e.seq).collect();
            assert_eq!(seqs, (1..=5_000).collect::<Vec<_>>());
            assert_eq!(page.head, 5_000);
        }
        let newest = store.history(query(None, None, 1)).await.unwrap();
        assert_eq!(ids(&newest), vec![5_000]);
    }
}
