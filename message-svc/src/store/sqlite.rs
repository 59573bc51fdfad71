//! The SQLite backend: a read pool for [`MessageStore`] and one dedicated
//! connection for [`LogWriter`]. WAL mode lets readers run while the writer
//! commits; `synchronous = FULL` makes every commit durable (`confab_common::db`).
//! The WAL is copied into the file by a checkpointer of its own (`checkpoint`),
//! not by the writer's commits.
//!
//! The readers are sqlx's; the writer's connection is rusqlite's, on the same
//! SQLite library, so that its statements run on the writer's own thread
//! ([`SqliteLogWriter`]).

use std::collections::HashMap;
use std::future;
use std::path::Path;

use confab_proto::v1::{Notice, ReadState};
use prost::Message as _;
use rusqlite::types::Type;
use rusqlite::{CachedStatement, Connection, OptionalExtension as _, params};
use sqlx::sqlite::SqliteConnection;
use sqlx::{ConnectOptions as _, SqlitePool};

use super::common::{
    self, event_to_sql, message_from_row, notice_to_sql, select_messages, seq_from_sql, seq_to_sql,
};
use super::{
    BoxFuture, EventRow, LogWriter, MessageStore, ReceiptFacts, ReceiptQuery, StoreError,
    StoredMessage, UNREAD_CAP, WatermarkMap, Watermarks,
};

mod checkpoint;

use checkpoint::Checkpoints;

const SCHEMA: &str = include_str!("schema.sql");

/// Readers in the pool: reads never wait for the writer in WAL mode, so a few
/// connections serve many concurrent calls.
const READ_CONNECTIONS: u32 = 4;

/// Prepared statements kept on the writer's connection: every text it runs is
/// one of the fixed ones below, fewer than this.
const WRITER_STATEMENT_CACHE: usize = 32;

/// The page size of a new message store, in bytes: 2 KiB, where SQLite's
/// default is 4. Every page a commit changes goes whole into the WAL: the
/// message, its two dedup and history index entries and an event per member
/// each land on a leaf of their own, ~3.5 pages a one-to-one message, so the
/// writer checksummed, copied, synced and later checkpointed ~14 KiB of WAL
/// per message (the checksum alone 13 % of its thread). One-to-one at 20,000
/// msg/s offered (200 pairs, alternating runs): p99 559 / 439 ms with 4 KiB,
/// 74 / 25 / 29 / 22 with 2 KiB, 24 / 21 / 76 / 67 with 1 KiB; the writer's
/// commit time 47–49 → 43–44 µs a message. History pages and group fan-out
/// the same within the noise (3,261 / 3,318 → 3,132 / 3,310 pages/s at 1 KiB).
/// 2 KiB rather than 1: a dedup key of 64 multi-byte characters still fits
/// in an index leaf, and a long text needs half the overflow pages. SQLite
/// sets it when it creates the file; an older file keeps its 4 KiB.
const PAGE_SIZE: u32 = 2048;

/// The writer's page cache (`cache_size`, negative: KiB): 32 MiB, where
/// SQLite's default is 2 MB. A batch touches a leaf of every member's event
/// sequence, of every sender's dedup range and of every conversation's index
/// (one-to-one, 200 pairs: about 1,200 leaves and their parents); with 2 MB
/// they no longer fit, and each batch read ~160 pages back from the file
/// (`pread`, 22,313 calls in 3 s at 20,000 msg/s; 1,769 with 64 MiB). 16 and 64
/// MiB did the same here (one-to-one at 20,000 msg/s offered: p99 712 ms with
/// 2 MB, 154 with 16 MiB, 169 with 64); 32 leaves room for more active users.
/// Pages are allocated as they are used: an idle store keeps little.
const WRITER_CACHE: i64 = -32_768;

/// Opens the database at `path`, creating the schema if needed, and returns the
/// read side and the write side.
///
/// # Errors
///
/// Fails when the file cannot be opened, the schema cannot be created or the
/// checkpointer's thread cannot be started.
pub(crate) async fn open(path: &Path) -> Result<(SqliteStore, SqliteLogWriter), StoreError> {
    // The schema through sqlx, whose first connection sets a new file's page
    // size before anything is written.
    let mut conn = confab_common::db::sqlite_options(path)
        .page_size(PAGE_SIZE)
        .connect()
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
    migrate(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    let checkpoints = Checkpoints::start(confab_common::db::sqlite_connection(path)?)
        .map_err(StoreError::Start)?;
    let pool = confab_common::db::open_sqlite(path, READ_CONNECTIONS).await?;
    let log = SqliteLogWriter::open(path, checkpoints)?;
    Ok((SqliteStore { pool }, log))
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

/// The write side, on its own connection: a single writer needs no pool, and a
/// dedicated connection cannot be starved by readers.
///
/// Its statements run on the thread that calls them, the writer's own
/// (`writer::Home::OwnThread`), one row or key at a time: a call returns when
/// SQLite is done, with no thread to hand it to. Through sqlx every call went
/// to the connection's own thread and back, so that writer sent BEGIN and the
/// writes with its next statement, as multi-row statements padded to few
/// texts; here each statement is one prepared text, bound and stepped once per
/// row. The store benchmark's batches (16, 128 and 512 sends; callgrind, which
/// counts the same whatever the machine does) went from 69,400 to 41,700
/// instructions a message. Under one-to-one load on two busy cores the
/// writer's serial threads used about 7 % less CPU, and latency and
/// throughput did not separate from the noise.
///
/// Every call blocks its thread until SQLite answers (a commit: until the WAL
/// is flushed to disk); the futures it returns are ready.
#[derive(Debug)]
pub(crate) struct SqliteLogWriter {
    conn: Connection,
    /// Told of every commit: copies the WAL into the file on its own thread.
    checkpoints: Checkpoints,
}

/// The writer's statements, each prepared once and kept
/// ([`WRITER_STATEMENT_CACHE`]). OR FAIL, not the default ABORT, on the
/// inserts: SQLite then never keeps a statement journal to undo one statement,
/// and every failed write rolls the whole transaction back anyway.
mod sql {
    use super::select_messages;

    /// IMMEDIATE takes the write lock when the transaction starts, before its
    /// reads, rather than at its first write: a busy database is waited for
    /// (busy_timeout) before any work is done.
    pub(super) const BEGIN: &str = "BEGIN IMMEDIATE";
    pub(super) const COMMIT: &str = "COMMIT";
    pub(super) const ROLLBACK: &str = "ROLLBACK";
    /// A seek of the unique index (pinned by a test).
    pub(super) const FIND_SENT: &str =
        select_messages!("WHERE m.sender_id = ?1 AND m.client_msg_id = ?2");
    /// One seek at the end of the user's primary-key range.
    pub(super) const LAST_SEQ: &str = super::SEQ_HEAD;
    /// One seek at the end of the conversation's index range.
    pub(super) const NEWEST_ID: &str = "SELECT MAX(id) FROM messages WHERE conversation_id = ?1";
    pub(super) const INSERT_MESSAGE: &str = "INSERT OR FAIL INTO messages (id, conversation_id, \
         sender_id, sender_device, client_msg_id, sent_at_ms, text, notice) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";
    pub(super) const INSERT_EVENT: &str = "INSERT OR FAIL INTO user_events \
         (user_id, seq, kind, message_id, payload) VALUES (?1, ?2, ?3, ?4, ?5)";
    pub(super) const LOAD_WATERMARKS: &str = "SELECT delivered_up_to, read_up_to FROM receipts \
         WHERE conversation_id = ?1 AND user_id = ?2";
    pub(super) const SAVE_WATERMARKS: &str = "INSERT INTO receipts \
         (conversation_id, user_id, delivered_up_to, read_up_to) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
         delivered_up_to = excluded.delivered_up_to, read_up_to = excluded.read_up_to";
    /// A range seek of the history index (pinned by a test).
    pub(super) const RECEIPT_SENDERS: &str = "SELECT DISTINCT sender_id FROM messages m \
         WHERE m.conversation_id = ?1 AND m.id > ?2 AND m.id <= ?3 \
         AND m.sender_id <> ?4 AND m.notice IS NULL";
    pub(super) const RECORD_LEAVE: &str = "INSERT INTO former_members \
         (conversation_id, user_id, last_visible_id) VALUES (?1, ?2, ?3) \
         ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
         last_visible_id = excluded.last_visible_id";
    pub(super) const DELETE_RECEIPTS: &str =
        "DELETE FROM receipts WHERE conversation_id = ?1 AND user_id = ?2";
    pub(super) const DELETE_LEAVE: &str =
        "DELETE FROM former_members WHERE conversation_id = ?1 AND user_id = ?2";
}

/// Reads a message from the columns of [`select_messages!`], in their order.
fn message_from_columns(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let notice: Option<Vec<u8>> = row.get(7)?;
    let notice = notice
        .map(|bytes| Notice::decode(bytes.as_slice()))
        .transpose()
        .map_err(|error| rusqlite::Error::FromSqlConversionFailure(7, Type::Blob, error.into()))?;
    Ok(StoredMessage {
        id: row.get(0)?,
        conversation_id: row.get(1)?,
        sender_id: row.get(2)?,
        sender_device: row.get(3)?,
        client_msg_id: row.get(4)?,
        sent_at_ms: row.get(5)?,
        text: row.get(6)?,
        notice,
    })
}

/// Returns the answer of a call that ran to its end on the caller's thread.
fn ready<'a, T: Send + 'a>(result: Result<T, StoreError>) -> BoxFuture<'a, Result<T, StoreError>> {
    Box::pin(future::ready(result))
}

impl SqliteLogWriter {
    /// Opens the writer's connection to the store at `path`, which
    /// [`open`] has set up.
    fn open(path: &Path, checkpoints: Checkpoints) -> Result<Self, StoreError> {
        let conn = confab_common::db::sqlite_connection(path)?;
        conn.pragma_update(None, "cache_size", WRITER_CACHE)?;
        // The checkpointer copies the WAL into the file, not the writer's commits.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        conn.set_prepared_statement_cache_capacity(WRITER_STATEMENT_CACHE);
        Ok(Self { conn, checkpoints })
    }

    /// Returns the prepared statement of `sql`.
    fn statement(&self, sql: &str) -> rusqlite::Result<CachedStatement<'_>> {
        self.conn.prepare_cached(sql)
    }

    /// Runs `sql`, which returns no rows, once.
    fn run(&self, sql: &str) -> Result<(), StoreError> {
        self.statement(sql)?.execute([])?;
        Ok(())
    }

    /// Runs the write `sql` once per row, binding each with `bind`.
    fn write_each<T>(
        &self,
        sql: &str,
        rows: &[T],
        mut bind: impl FnMut(&mut CachedStatement<'_>, &T) -> rusqlite::Result<usize>,
    ) -> Result<(), StoreError> {
        let mut statement = self.statement(sql)?;
        for row in rows {
            bind(&mut statement, row)?;
        }
        Ok(())
    }

    /// Returns `(key, max)` for each of `keys` whose `MAX` (the one-column,
    /// one-row read `sql` of the key) is not NULL.
    fn max_per_key(&self, sql: &str, keys: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        let mut statement = self.statement(sql)?;
        let mut found = Vec::with_capacity(keys.len());
        for &key in keys {
            let max: Option<i64> = statement.query_row([key], |row| row.get(0))?;
            found.extend(max.map(|max| (key, max)));
        }
        Ok(found)
    }

    fn begin_now(&self) -> Result<(), StoreError> {
        if self.checkpoints.catch_up_due()
            && let Err(error) = checkpoint::catch_up(&self.conn)
        {
            tracing::warn!(%error, "checkpoint of the message store failed");
        }
        self.run(sql::BEGIN)
    }

    fn find_sent(&self, keys: &[(i64, &str)]) -> Result<Vec<StoredMessage>, StoreError> {
        let mut statement = self.statement(sql::FIND_SENT)?;
        let mut found = Vec::new();
        for &(sender_id, client_msg_id) in keys {
            let message = statement
                .query_row(params![sender_id, client_msg_id], message_from_columns)
                .optional()?;
            found.extend(message);
        }
        Ok(found)
    }

    fn load_watermarks_now(&self, keys: &[(i64, i64)]) -> Result<WatermarkMap, StoreError> {
        let mut statement = self.statement(sql::LOAD_WATERMARKS)?;
        let mut found = HashMap::with_capacity(keys.len());
        for &key in keys {
            let marks = statement
                .query_row(params![key.0, key.1], |row| {
                    Ok(Watermarks {
                        delivered_up_to: row.get(0)?,
                        read_up_to: row.get(1)?,
                    })
                })
                .optional()?;
            found.extend(marks.map(|marks| (key, marks)));
        }
        Ok(found)
    }

    fn receipt_facts_now(
        &self,
        queries: &[ReceiptQuery],
        cap: u32,
    ) -> Result<Vec<ReceiptFacts>, StoreError> {
        let mut senders = self.statement(sql::RECEIPT_SENDERS)?;
        let mut unread = self.statement(common::UNREAD_COUNT)?;
        let mut facts = Vec::with_capacity(queries.len());
        for query in queries {
            let mut fact = ReceiptFacts::default();
            if let Some((after, up_to)) = query.senders {
                let bound = params![query.conversation_id, after, up_to, query.user_id];
                fact.senders = senders
                    .query_map(bound, |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
            }
            if let Some(after) = query.unread_after {
                let bound = params![query.conversation_id, after, query.user_id, i64::from(cap)];
                let count: i64 = unread.query_row(bound, |row| row.get(0))?;
                fact.unread = common::count_from_sql(count, cap);
            }
            facts.push(fact);
        }
        Ok(facts)
    }

    fn rollback_now(&self) -> Result<(), StoreError> {
        // SQLite ends the transaction itself on some errors, and a failed
        // BEGIN never opened one; then there is nothing to roll back.
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.run(sql::ROLLBACK)
    }
}

impl LogWriter for SqliteLogWriter {
    /// One process owns the file: the writer may keep sequence numbers between
    /// transactions.
    fn shared(&self) -> bool {
        false
    }

    fn blocking(&self) -> bool {
        true
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.begin_now())
    }

    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        ready(self.find_sent(keys))
    }

    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>> {
        let seqs = self.max_per_key(sql::LAST_SEQ, user_ids).map(|rows| {
            rows.into_iter()
                .map(|(user, seq)| (user, seq_from_sql(seq)))
                .collect()
        });
        ready(seqs)
    }

    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        ready(
            self.write_each(sql::INSERT_MESSAGE, messages, |statement, m| {
                statement.execute(params![
                    m.id,
                    m.conversation_id,
                    m.sender_id,
                    m.sender_device,
                    m.client_msg_id,
                    m.sent_at_ms,
                    m.text,
                    notice_to_sql(m),
                ])
            }),
        )
    }

    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        ready(
            self.write_each(sql::INSERT_EVENT, events, |statement, event| {
                let (kind, payload) = event_to_sql(&event.payload);
                statement.execute(params![
                    event.user_id,
                    seq_to_sql(event.seq),
                    kind,
                    event.message_id,
                    payload,
                ])
            }),
        )
    }

    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>> {
        let ids = self
            .max_per_key(sql::NEWEST_ID, conversation_ids)
            .map(|rows| rows.into_iter().collect());
        ready(ids)
    }

    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<WatermarkMap, StoreError>> {
        ready(self.load_watermarks_now(keys))
    }

    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        ready(self.write_each(
            sql::SAVE_WATERMARKS,
            rows,
            |statement, &(conversation_id, user_id, marks)| {
                statement.execute(params![
                    conversation_id,
                    user_id,
                    marks.delivered_up_to,
                    marks.read_up_to,
                ])
            },
        ))
    }

    fn receipt_facts<'a>(
        &'a mut self,
        queries: &'a [ReceiptQuery],
        cap: u32,
    ) -> BoxFuture<'a, Result<Vec<ReceiptFacts>, StoreError>> {
        ready(self.receipt_facts_now(queries, cap))
    }

    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let mut written = self.write_each(
            sql::RECORD_LEAVE,
            leaves,
            |statement, &(user_id, last_visible_id)| {
                statement.execute(params![conversation_id, user_id, last_visible_id])
            },
        );
        if drop_receipts && written.is_ok() {
            written = self.write_each(sql::DELETE_RECEIPTS, leaves, |statement, &(user_id, _)| {
                statement.execute(params![conversation_id, user_id])
            });
        }
        ready(written)
    }

    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        ready(
            self.write_each(sql::DELETE_LEAVE, user_ids, |statement, &user_id| {
                statement.execute(params![conversation_id, user_id])
            }),
        )
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        let committed = self.run(sql::COMMIT);
        if committed.is_ok() {
            self.checkpoints.committed();
        }
        ready(committed)
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        ready(self.rollback_now())
    }

    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        let Self { conn, checkpoints } = *self;
        let closed = conn.close().map_err(|(_, error)| error.into());
        // The checkpointer stops, and its connection, the last, checkpoints
        // what is left.
        drop(checkpoints);
        ready(closed)
    }
}

#[cfg(test)]
mod tests;
