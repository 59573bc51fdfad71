//! The SQLite backend: a read pool for [`MessageStore`] and one dedicated
//! connection for [`LogWriter`]. WAL mode lets readers run while the writer
//! commits; `synchronous = FULL` makes every commit durable (`confab_common::db`).

use std::collections::HashMap;
use std::path::Path;

use confab_proto::v1::ReadState;
use sqlx::sqlite::SqliteConnection;
use sqlx::{ConnectOptions as _, QueryBuilder, Sqlite, SqlitePool};

use super::common::{
    self, event_to_sql, extend_present, extend_watermarks, message_columns, message_from_row,
    notice_to_sql, select_messages, seq_from_sql, seq_to_sql,
};
use super::{
    BoxFuture, EventRow, LogWriter, MessageStore, StoreError, StoredMessage, UNREAD_CAP,
    WatermarkMap, Watermarks,
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
    migrate(&mut conn).await?;
    let pool = confab_common::db::open_sqlite(path, READ_CONNECTIONS).await?;
    Ok((SqliteStore { pool }, SqliteLogWriter { conn }))
}

/// Columns added after the first release: `(table, column, type)`. Files created
/// since have them from `schema.sql`.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("messages", "notice", "BLOB"),
    ("user_events", "payload", "BLOB"),
];

/// Adds the [`ADDED_COLUMNS`] a file lacks. Idempotent: each column is looked up
/// first, since SQLite has no `ADD COLUMN IF NOT EXISTS`.
async fn migrate(conn: &mut SqliteConnection) -> Result<(), StoreError> {
    for &(table, column, sql_type) in ADDED_COLUMNS {
        let present: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM pragma_table_info(?1) WHERE name = ?2")
                .bind(table)
                .bind(column)
                .fetch_one(&mut *conn)
                .await?;
        if present == 0 {
            tracing::info!(table, column, "adding column to the message store");
            // Audited: every part comes from ADDED_COLUMNS.
            let alter = format!("ALTER TABLE {table} ADD COLUMN {column} {sql_type}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(alter))
                .execute(&mut *conn)
                .await?;
        }
    }
    Ok(())
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

/// The head of a user's event sequence ([`common::Shared::sync`]): the last
/// event itself, since one process numbers every user.
const SEQ_HEAD: &str = "SELECT MAX(seq) FROM user_events WHERE user_id = ?1";

impl MessageStore for SqliteStore {
    common::shared_reads!(
        history,
        sync = SEQ_HEAD,
        leave_point,
        message,
        watermarks,
        receipt_counts,
    );

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
                let row = sqlx::query(select_messages!(
                    "WHERE conversation_id = ?1 ORDER BY id DESC LIMIT 1"
                ))
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

    fn unread_counts<'a>(
        &'a self,
        user_id: i64,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<ReadState>, StoreError>> {
        Box::pin(async move {
            // Two index seeks and one capped range count per conversation, on one
            // connection.
            let mut conn = self.pool.acquire().await?;
            let mut states = Vec::with_capacity(conversation_ids.len());
            for &conversation_id in conversation_ids {
                let read_up_to: Option<i64> = sqlx::query_scalar(
                    "SELECT read_up_to FROM receipts WHERE conversation_id = ?1 AND user_id = ?2",
                )
                .bind(conversation_id)
                .bind(user_id)
                .fetch_optional(&mut *conn)
                .await?;
                let read_up_to = read_up_to.unwrap_or(0);
                let unread = common::Shared::count_unread(
                    &mut *conn,
                    conversation_id,
                    read_up_to,
                    user_id,
                    UNREAD_CAP,
                )
                .await?;
                states.push(ReadState {
                    conversation_id,
                    read_up_to,
                    unread_count: unread,
                });
            }
            Ok(states)
        })
    }
}

impl LogWriter for SqliteLogWriter {
    /// One process owns the file: the writer may keep sequence numbers between
    /// transactions.
    fn shared(&self) -> bool {
        false
    }

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
                let mut query =
                    QueryBuilder::<Sqlite>::new(concat!("SELECT ", message_columns!(), " FROM ("));
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
                let rows: Vec<(i64, Option<i64>)> =
                    query.build_query_as().fetch_all(&mut self.conn).await?;
                let seqs = rows
                    .into_iter()
                    .map(|(user, seq)| (user, seq.map(seq_from_sql)));
                extend_present(&mut last, seqs);
            }
            Ok(last)
        })
    }

    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(messages, 8) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO messages (id, conversation_id, sender_id, sender_device, \
                     client_msg_id, sent_at_ms, text, notice) ",
                );
                query.push_values(chunk, |mut row, message| {
                    row.push_bind(message.id)
                        .push_bind(message.conversation_id)
                        .push_bind(message.sender_id)
                        .push_bind(message.sender_device.as_str())
                        .push_bind(message.client_msg_id.as_str())
                        .push_bind(message.sent_at_ms)
                        .push_bind(message.text.as_str())
                        .push_bind(notice_to_sql(message));
                });
                query.build().execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(events, 5) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO user_events (user_id, seq, kind, message_id, payload) ",
                );
                query.push_values(chunk, |mut row, event| {
                    let (kind, payload) = event_to_sql(&event.payload);
                    row.push_bind(event.user_id)
                        .push_bind(seq_to_sql(event.seq))
                        .push_bind(kind)
                        .push_bind(event.message_id)
                        .push_bind(payload);
                });
                query.build().execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>> {
        Box::pin(async move {
            let mut newest = HashMap::with_capacity(conversation_ids.len());
            for chunk in chunks(conversation_ids, 1) {
                // A correlated MAX is one seek at the end of each conversation's
                // index range (as in `last_seqs`).
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT k.column1 AS conversation_id, \
                     (SELECT MAX(id) FROM messages WHERE conversation_id = k.column1) AS id \
                     FROM (",
                );
                query.push_values(chunk, |mut row, &conversation_id| {
                    row.push_bind(conversation_id);
                });
                query.push(") AS k");
                let rows: Vec<(i64, Option<i64>)> =
                    query.build_query_as().fetch_all(&mut self.conn).await?;
                extend_present(&mut newest, rows);
            }
            Ok(newest)
        })
    }

    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<WatermarkMap, StoreError>> {
        Box::pin(async move {
            let mut found = HashMap::with_capacity(keys.len());
            for chunk in chunks(keys, 2) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "SELECT r.conversation_id AS conversation_id, r.user_id AS user_id, \
                     r.delivered_up_to AS delivered_up_to, r.read_up_to AS read_up_to FROM (",
                );
                query.push_values(chunk, |mut row, &(conversation_id, user_id)| {
                    row.push_bind(conversation_id).push_bind(user_id);
                });
                query.push(
                    ") AS k JOIN receipts r \
                     ON r.conversation_id = k.column1 AND r.user_id = k.column2",
                );
                let rows: Vec<(i64, i64, i64, i64)> =
                    query.build_query_as().fetch_all(&mut self.conn).await?;
                extend_watermarks(&mut found, rows);
            }
            Ok(found)
        })
    }

    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(rows, 4) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO receipts (conversation_id, user_id, delivered_up_to, read_up_to) ",
                );
                query.push_values(chunk, |mut row, &(conversation_id, user_id, marks)| {
                    row.push_bind(conversation_id)
                        .push_bind(user_id)
                        .push_bind(marks.delivered_up_to)
                        .push_bind(marks.read_up_to);
                });
                query.push(
                    " ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
                     delivered_up_to = excluded.delivered_up_to, \
                     read_up_to = excluded.read_up_to",
                );
                query.build().execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            for chunk in chunks(leaves, 3) {
                let mut query = QueryBuilder::<Sqlite>::new(
                    "INSERT INTO former_members (conversation_id, user_id, last_visible_id) ",
                );
                query.push_values(chunk, |mut row, &(user_id, last_visible_id)| {
                    row.push_bind(conversation_id)
                        .push_bind(user_id)
                        .push_bind(last_visible_id);
                });
                query.push(
                    " ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
                     last_visible_id = excluded.last_visible_id",
                );
                query.build().execute(&mut self.conn).await?;
            }
            if drop_receipts {
                let user_ids: Vec<i64> = leaves.iter().map(|&(user_id, _)| user_id).collect();
                delete_rows(&mut self.conn, "receipts", conversation_id, &user_ids).await?;
            }
            Ok(())
        })
    }

    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(delete_rows(
            &mut self.conn,
            "former_members",
            conversation_id,
            user_ids,
        ))
    }

    common::shared_writes!(senders_between, count_unread, commit, close);

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
}

/// Deletes the rows of `user_ids` in one conversation from `table` (a table
/// keyed by `(conversation_id, user_id)`).
async fn delete_rows(
    conn: &mut SqliteConnection,
    table: &'static str,
    conversation_id: i64,
    user_ids: &[i64],
) -> Result<(), StoreError> {
    // Two "columns" per id leave room for the conversation id's parameter.
    for chunk in chunks(user_ids, 2) {
        let mut query =
            QueryBuilder::<Sqlite>::new(format!("DELETE FROM {table} WHERE conversation_id = "));
        query.push_bind(conversation_id).push(" AND user_id IN (");
        let mut ids = query.separated(", ");
        for &user_id in chunk {
            ids.push_bind(user_id);
        }
        query.push(")");
        query.build().execute(&mut *conn).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
