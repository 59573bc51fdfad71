//! The SQLite backend: a read pool for [`MessageStore`] and one dedicated
//! connection for [`LogWriter`]. WAL mode lets readers run while the writer
//! commits; `synchronous = FULL` makes every commit durable (`confab_common::db`).
//! The WAL is copied into the file by a checkpointer of its own (`checkpoint`),
//! not by the writer's commits.

use std::collections::HashMap;
use std::future;
use std::iter;
use std::path::Path;

use confab_proto::v1::ReadState;
use sqlx::query_builder::Separated;
use sqlx::sqlite::SqliteConnection;
use sqlx::{ConnectOptions as _, QueryBuilder, Sqlite, SqlitePool};

use super::common::{
    self, event_to_sql, extend_present, extend_watermarks, message_columns, message_from_row,
    notice_to_sql, select_messages, seq_from_sql, seq_to_sql,
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

/// Prepared statements kept on the writer's connection: its keyed reads (the
/// dedup lookup, heads, watermarks, newest ids, a receipt's senders or
/// counts) in at most 16 texts each ([`padded_len`]; 10 up to the 512
/// commands of a batch), each twice when it may open the transaction (BEGIN in
/// front of it), plus a few fixed ones: fewer in practice, since only the
/// first read of a batch opens it; and the commits' texts, padded like the
/// reads up to [`CACHED_WRITE_ROWS`] ([`Pending::defer_rows`]). sqlx evicts the
/// least recently used beyond it, so this bounds memory whatever the texts.
const WRITER_STATEMENT_CACHE: usize = 128;

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
const WRITER_CACHE: &str = "-32768";

/// Rows up to which a deferred write is padded, so that its text is one of
/// few and its statement stays prepared: compiling a batch's multi-row
/// inserts took 11 % of the SQLite thread under one-to-one load (3–4 µs a
/// row). Beyond it (large group fan-outs) a write is prepared for its one call:
/// a prepared statement grows with its rows.
const CACHED_WRITE_ROWS: usize = 512;

/// Opens the database at `path`, creating the schema if needed, and returns the
/// read side and the write side.
///
/// # Errors
///
/// Fails when the file cannot be opened or the schema cannot be created.
pub(crate) async fn open(path: &Path) -> Result<(SqliteStore, SqliteLogWriter), StoreError> {
    let mut conn = confab_common::db::sqlite_options(path)
        .statement_cache_capacity(WRITER_STATEMENT_CACHE)
        .pragma("cache_size", WRITER_CACHE)
        .page_size(PAGE_SIZE)
        .connect()
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&mut conn).await?;
    migrate(&mut conn).await?;
    // The checkpointer copies the WAL into the file, not the writer's commits.
    sqlx::raw_sql("PRAGMA wal_autocheckpoint = 0")
        .execute(&mut conn)
        .await?;
    let checkpoints = Checkpoints::start(confab_common::db::sqlite_options(path).connect().await?);
    let pool = confab_common::db::open_sqlite(path, READ_CONNECTIONS).await?;
    Ok((
        SqliteStore { pool },
        SqliteLogWriter::new(conn, checkpoints),
    ))
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
///
/// sqlx runs every statement on the connection's own thread: each call on
/// `conn` is a hand-off to that thread and back, and under load each waits to
/// be scheduled. So the writer makes as few as it can: `begin` and the writes
/// send nothing but wait in `pending`, and go in front of the next statement of
/// the transaction, in one call. In the group commit, whose reads all come
/// before its writes, BEGIN goes with the first read and the writes with the
/// COMMIT: a batch of sends is one call, BEGIN, writes and COMMIT together, or
/// two when the writer looks its dedup keys up first (after a retry). A
/// deferred write that fails fails that later call, and the caller rolls back
/// as it would have on the write.
#[derive(Debug)]
pub(crate) struct SqliteLogWriter {
    conn: SqliteConnection,
    /// What the open transaction has not sent yet.
    pending: Pending,
    /// Told of every commit: copies the WAL into the file on its own thread.
    checkpoints: Checkpoints,
    /// Calls made on `conn`: the tests count the hand-offs of a transaction.
    #[cfg(test)]
    round_trips: u64,
}

/// Statements not sent yet, each followed by `;`: they go in front of the next
/// statement on the writer's connection, as one multi-statement query (sqlx
/// binds the `?` parameters of its statements in order).
#[derive(Default)]
struct Pending {
    query: QueryBuilder<Sqlite>,
    /// Statements in `query`.
    statements: usize,
    /// Whether one of them is a write whose text is not one of few (not
    /// padded): the query is then prepared for its one call instead of taking
    /// a place in the statement cache.
    uncached: bool,
}

impl Pending {
    /// Defers the start of a transaction.
    fn begin(&mut self) {
        // IMMEDIATE takes the write lock when the transaction starts, before its
        // reads, rather than at its first write: a busy database is waited for
        // (busy_timeout) before any work is done.
        self.query.push("BEGIN IMMEDIATE; ");
        self.statements += 1;
    }

    /// Defers the writes `push` appends to the query, whose text is not
    /// cached; it returns how many statements it appended.
    fn defer(&mut self, push: impl FnOnce(&mut QueryBuilder<Sqlite>) -> usize) {
        let statements = push(&mut self.query);
        self.statements += statements;
        self.uncached |= statements > 0;
    }

    /// Defers a write of `rows` as [`push_rows`] builds it: `head` ends with
    /// `SELECT * FROM (` and `tail` starts with `) WHERE column1 IS NOT NULL`,
    /// so that the padding rows of NULLs are written nowhere. Up to
    /// [`CACHED_WRITE_ROWS`] the rows are padded and the text may be cached.
    fn defer_rows<T>(
        &mut self,
        statement: (&str, &str),
        rows: &[T],
        columns: usize,
        push_row: impl FnMut(Separated<'_, Sqlite, &'static str>, &T),
    ) {
        debug_assert!(statement.0.ends_with("SELECT * FROM ("));
        debug_assert!(statement.1.starts_with(") WHERE column1 IS NOT NULL"));
        let padded = rows.len() <= CACHED_WRITE_ROWS;
        let statements = push_rows(&mut self.query, statement, rows, columns, padded, push_row);
        self.statements += statements;
        self.uncached |= !padded && statements > 0;
    }

    /// Returns the pending query, for the caller to append the statements it
    /// sends with it, and whether its text may be cached (every write in it is
    /// padded). Nothing stays pending.
    fn take(&mut self) -> (QueryBuilder<Sqlite>, bool) {
        let pending = std::mem::take(self);
        (pending.query, !pending.uncached)
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // QueryBuilder is not Debug.
        f.debug_struct("Pending")
            .field("statements", &self.statements)
            .field("uncached", &self.uncached)
            .finish_non_exhaustive()
    }
}

/// Most bound parameters one SQLite statement may carry
/// (`SQLITE_MAX_VARIABLE_NUMBER`, 32766 since SQLite 3.32).
const MAX_BIND_PARAMS: usize = 32_766;

/// Returns how many rows of `columns` bound parameters each fit in one
/// statement.
fn full_chunk(columns: usize) -> usize {
    debug_assert!((1..=MAX_BIND_PARAMS).contains(&columns));
    MAX_BIND_PARAMS / columns
}

/// Returns how many keys the read of a chunk of `len` keys of `columns`
/// parameters each carries: `len` rounded up to a power of two, at most a full
/// chunk, the rest filled with NULL keys (an equality with NULL matches no row).
///
/// Why: sqlx prepares and caches one statement per distinct SQL text, and a
/// multi-row statement's text depends on its row count. Padding bounds the
/// texts of one keyed read to 16 (a full chunk and the powers of two below it),
/// so that the reads are prepared once and stay in the statement cache
/// ([`WRITER_STATEMENT_CACHE`]), instead of preparing (and evicting) a new text
/// for nearly every batch size; and a read below a full chunk stays one
/// statement. The price is at most twice the keys. Writes up to
/// [`CACHED_WRITE_ROWS`] are padded the same way, their NULL rows filtered out
/// ([`Pending::defer_rows`]).
fn padded_len(len: usize, columns: usize) -> usize {
    len.next_power_of_two().min(full_chunk(columns))
}

/// Appends to `query` one statement per chunk of `rows`: `head`, the chunk as
/// `VALUES` (rows of `columns` parameters, bound by `push_row`), `tail` and
/// `;`. A chunk is as many rows as fit under [`MAX_BIND_PARAMS`]; with
/// `padded`, the last one is filled with rows of NULLs up to [`padded_len`].
/// Returns the number of statements appended.
fn push_rows<T>(
    query: &mut QueryBuilder<Sqlite>,
    (head, tail): (&str, &str),
    rows: &[T],
    columns: usize,
    padded: bool,
    mut push_row: impl FnMut(Separated<'_, Sqlite, &'static str>, &T),
) -> usize {
    let mut statements = 0;
    for chunk in rows.chunks(full_chunk(columns)) {
        let padding = if padded {
            padded_len(chunk.len(), columns) - chunk.len()
        } else {
            0
        };
        let rows = chunk.iter().map(Some).chain(iter::repeat_n(None, padding));
        query.push(head);
        query.push_values(rows, |mut values, row| match row {
            Some(row) => push_row(values, row),
            None => {
                for _ in 0..columns {
                    values.push_bind(None::<i64>);
                }
            }
        });
        query.push(tail).push("; ");
        statements += 1;
    }
    statements
}

/// Appends the dedup lookup of `keys` (sender id, client_msg_id) to `query`;
/// returns the number of statements appended.
fn push_find_sent(query: &mut QueryBuilder<Sqlite>, keys: &[(i64, &str)]) -> usize {
    // The keys as a constant table joined to the unique index: one index seek
    // per key (EXPLAIN QUERY PLAN: SCAN k, SEARCH m USING INDEX
    // messages_sender_client_msg_id; pinned by a test).
    let statement = (
        concat!("SELECT ", message_columns!(), " FROM ("),
        ") AS k JOIN messages m ON m.sender_id = k.column1 AND m.client_msg_id = k.column2",
    );
    push_rows(
        query,
        statement,
        keys,
        2,
        true,
        |mut row, &(sender_id, client_msg_id)| {
            row.push_bind(sender_id).push_bind(client_msg_id);
        },
    )
}

/// Appends the receipt reads of `queries` to `query`, padded like the keyed
/// reads so that their texts stay prepared: one statement for the senders
/// asked for (the queries as a constant table joined to the history index: a
/// range seek each, one DISTINCT for all) and one for the unread counts asked
/// for (a correlated count each, of at most `cap` index entries); a part that
/// nobody asks for is left out. The rows are those
/// [`common::receipt_facts_from_rows`] reads, the queries numbered in order.
/// Returns the number of statements appended: two when both parts are asked
/// for (a read watermark moved), and the caller keeps only one-statement texts
/// prepared (pairs of padded sizes would be too many to keep).
///
/// Written as a compound SELECT of a term per query (the Postgres form), the
/// statement's text changed with every batch, so it was compiled for each
/// one, and each term's DISTINCT opened a temporary B-tree of its own.
fn push_receipt_facts(
    query: &mut QueryBuilder<Sqlite>,
    queries: &[ReceiptQuery],
    cap: u32,
) -> usize {
    let numbered = || {
        queries
            .iter()
            .enumerate()
            .map(|(i, q)| (i64::try_from(i).unwrap_or(i64::MAX), q))
    };
    let senders: Vec<_> = numbered()
        .filter_map(|(number, q)| q.senders.map(|range| (number, q, range)))
        .collect();
    let counts: Vec<_> = numbered()
        .filter_map(|(number, q)| q.unread_after.map(|after| (number, q, after)))
        .collect();
    let mut statements = 0;
    if !senders.is_empty() {
        let statement = (
            "SELECT DISTINCT q.column1, 0, m.sender_id FROM (",
            ") AS q JOIN messages m ON m.conversation_id = q.column2 \
             AND m.id > q.column3 AND m.id <= q.column4 \
             AND m.sender_id <> q.column5 AND m.notice IS NULL",
        );
        statements += push_rows(
            query,
            statement,
            &senders,
            5,
            true,
            |mut row, &(number, q, (after, up_to))| {
                row.push_bind(number)
                    .push_bind(q.conversation_id)
                    .push_bind(after)
                    .push_bind(up_to)
                    .push_bind(q.user_id);
            },
        );
    }
    if !counts.is_empty() {
        let head = format!(
            "SELECT q.column1, 1, (SELECT COUNT(*) FROM (SELECT 1 FROM messages m \
             WHERE m.conversation_id = q.column2 AND m.id > q.column3 \
             AND m.sender_id <> q.column4 AND m.notice IS NULL LIMIT {cap})) FROM ("
        );
        statements += push_rows(
            query,
            (&head, ") AS q WHERE q.column1 IS NOT NULL"),
            &counts,
            4,
            true,
            |mut row, &(number, q, after)| {
                row.push_bind(number)
                    .push_bind(q.conversation_id)
                    .push_bind(after)
                    .push_bind(q.user_id);
            },
        );
    }
    statements
}

/// Appends to `query` the deletion of the rows of `user_ids` in one
/// conversation from `table` (a table keyed by `(conversation_id, user_id)`);
/// returns the number of statements appended.
fn push_delete(
    query: &mut QueryBuilder<Sqlite>,
    table: &'static str,
    conversation_id: i64,
    user_ids: &[i64],
) -> usize {
    let mut statements = 0;
    // One parameter per id, and one for the conversation.
    for chunk in user_ids.chunks(MAX_BIND_PARAMS - 1) {
        query.push(format_args!("DELETE FROM {table} WHERE conversation_id = "));
        query.push_bind(conversation_id).push(" AND user_id IN (");
        let mut ids = query.separated(", ");
        for &user_id in chunk {
            ids.push_bind(user_id);
        }
        query.push("); ");
        statements += 1;
    }
    statements
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

impl SqliteLogWriter {
    /// Returns `(key, max)` for each of `keys`, `max` being the correlated
    /// subquery `max_of` over the key `k.column1` (NULL where the key has no
    /// row): one statement, its key list padded like every keyed read; no
    /// statement for no keys.
    async fn max_per_key(
        &mut self,
        max_of: &str,
        keys: &[i64],
    ) -> Result<Vec<(i64, Option<i64>)>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (mut query, cacheable) = self.pending.take();
        let head = format!("SELECT k.column1, {max_of} FROM (");
        let statements = push_rows(
            &mut query,
            (&head, ") AS k"),
            keys,
            1,
            true,
            |mut row, &key| {
                row.push_bind(key);
            },
        );
        // The padding keys come back as (NULL, NULL).
        let rows: Vec<(Option<i64>, Option<i64>)> = query
            .build_query_as()
            .persistent(cacheable && statements == 1)
            .fetch_all(self.conn())
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(key, max)| Some((key?, max)))
            .collect())
    }

    fn new(conn: SqliteConnection, checkpoints: Checkpoints) -> Self {
        Self {
            conn,
            pending: Pending::default(),
            checkpoints,
            #[cfg(test)]
            round_trips: 0,
        }
    }

    /// Returns the connection for one call on it.
    fn conn(&mut self) -> &mut SqliteConnection {
        #[cfg(test)]
        {
            self.round_trips += 1;
        }
        &mut self.conn
    }
}

impl LogWriter for SqliteLogWriter {
    /// One process owns the file: the writer may keep sequence numbers between
    /// transactions.
    fn shared(&self) -> bool {
        false
    }

    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            if self.checkpoints.catch_up_due()
                && let Err(error) = checkpoint::catch_up(self.conn()).await
            {
                tracing::warn!(%error, "checkpoint of the message store failed");
            }
            self.pending.begin();
            Ok(())
        })
    }

    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let (mut query, cacheable) = self.pending.take();
            let statements = push_find_sent(&mut query, keys);
            let rows = query
                .build()
                .persistent(cacheable && statements == 1)
                .fetch_all(self.conn())
                .await?;
            rows.iter().map(message_from_row).collect()
        })
    }

    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>> {
        Box::pin(async move {
            // A correlated MAX per user is one seek at the end of the user's
            // primary-key range; `WHERE user_id IN (..) GROUP BY user_id` would
            // read every event of every user named (measured: 0.1 ms against
            // 120 ms for 3 users of 200,000 events each).
            let rows = self
                .max_per_key(
                    "(SELECT MAX(seq) FROM user_events WHERE user_id = k.column1)",
                    user_ids,
                )
                .await?;
            let seqs = rows
                .into_iter()
                .map(|(user, seq)| (user, seq.map(seq_from_sql)));
            let mut last = HashMap::with_capacity(user_ids.len());
            extend_present(&mut last, seqs);
            Ok(last)
        })
    }

    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // OR FAIL, not the default ABORT: a multi-row statement that may abort
        // half-way makes SQLite copy every page it changes into a statement
        // journal first, to undo just that statement (5 % of the writer's time in
        // a profile at 11,000 msg/s). FAIL stops at the failing row and keeps the
        // rows before it, which is the same here: every failed write rolls back
        // the whole transaction.
        let statement = (
            "INSERT OR FAIL INTO messages (id, conversation_id, sender_id, sender_device, \
             client_msg_id, sent_at_ms, text, notice) SELECT * FROM (",
            ") WHERE column1 IS NOT NULL",
        );
        self.pending
            .defer_rows(statement, messages, 8, |mut row, message| {
                row.push_bind(message.id)
                    .push_bind(message.conversation_id)
                    .push_bind(message.sender_id)
                    .push_bind(message.sender_device.as_str())
                    .push_bind(message.client_msg_id.as_str())
                    .push_bind(message.sent_at_ms)
                    .push_bind(message.text.as_str())
                    .push_bind(notice_to_sql(message));
            });
        Box::pin(future::ready(Ok(())))
    }

    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        // OR FAIL (see `insert_messages`).
        let statement = (
            "INSERT OR FAIL INTO user_events (user_id, seq, kind, message_id, payload) \
             SELECT * FROM (",
            ") WHERE column1 IS NOT NULL",
        );
        self.pending
            .defer_rows(statement, events, 5, |mut row, event| {
                let (kind, payload) = event_to_sql(&event.payload);
                row.push_bind(event.user_id)
                    .push_bind(seq_to_sql(event.seq))
                    .push_bind(kind)
                    .push_bind(event.message_id)
                    .push_bind(payload);
            });
        Box::pin(future::ready(Ok(())))
    }

    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>> {
        Box::pin(async move {
            // A correlated MAX is one seek at the end of each conversation's
            // index range (as in `last_seqs`).
            let rows = self
                .max_per_key(
                    "(SELECT MAX(id) FROM messages WHERE conversation_id = k.column1)",
                    conversation_ids,
                )
                .await?;
            let ids = rows.into_iter();
            let mut newest = HashMap::with_capacity(conversation_ids.len());
            extend_present(&mut newest, ids);
            Ok(newest)
        })
    }

    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<WatermarkMap, StoreError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(HashMap::new());
            }
            let (mut query, cacheable) = self.pending.take();
            let statement = (
                "SELECT r.conversation_id AS conversation_id, r.user_id AS user_id, \
                 r.delivered_up_to AS delivered_up_to, r.read_up_to AS read_up_to FROM (",
                ") AS k JOIN receipts r \
                 ON r.conversation_id = k.column1 AND r.user_id = k.column2",
            );
            let statements = push_rows(
                &mut query,
                statement,
                keys,
                2,
                true,
                |mut row, &(conversation_id, user_id)| {
                    row.push_bind(conversation_id).push_bind(user_id);
                },
            );
            let rows: Vec<(i64, i64, i64, i64)> = query
                .build_query_as()
                .persistent(cacheable && statements == 1)
                .fetch_all(self.conn())
                .await?;
            let mut found = HashMap::with_capacity(keys.len());
            extend_watermarks(&mut found, rows);
            Ok(found)
        })
    }

    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let statement = (
            "INSERT INTO receipts (conversation_id, user_id, delivered_up_to, read_up_to) \
             SELECT * FROM (",
            ") WHERE column1 IS NOT NULL \
             ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
             delivered_up_to = excluded.delivered_up_to, \
             read_up_to = excluded.read_up_to",
        );
        self.pending.defer_rows(
            statement,
            rows,
            4,
            |mut row, &(conversation_id, user_id, marks)| {
                row.push_bind(conversation_id)
                    .push_bind(user_id)
                    .push_bind(marks.delivered_up_to)
                    .push_bind(marks.read_up_to);
            },
        );
        Box::pin(future::ready(Ok(())))
    }

    fn receipt_facts<'a>(
        &'a mut self,
        queries: &'a [ReceiptQuery],
        cap: u32,
    ) -> BoxFuture<'a, Result<Vec<ReceiptFacts>, StoreError>> {
        Box::pin(async move {
            if !queries.iter().any(ReceiptQuery::asks) {
                return Ok(vec![ReceiptFacts::default(); queries.len()]);
            }
            // In front of it whatever is pending (BEGIN, in a batch whose only
            // reads are these).
            let (mut query, cacheable) = self.pending.take();
            let statements = push_receipt_facts(&mut query, queries, cap);
            let rows: Vec<(i64, i64, i64)> = query
                .build_query_as()
                .persistent(cacheable && statements == 1)
                .fetch_all(self.conn())
                .await?;
            Ok(common::receipt_facts_from_rows(queries.len(), rows, cap))
        })
    }

    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        let statement = (
            "INSERT INTO former_members (conversation_id, user_id, last_visible_id) \
             SELECT * FROM (",
            ") WHERE column1 IS NOT NULL \
             ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
             last_visible_id = excluded.last_visible_id",
        );
        self.pending.defer_rows(
            statement,
            leaves,
            3,
            |mut row, &(user_id, last_visible_id)| {
                row.push_bind(conversation_id)
                    .push_bind(user_id)
                    .push_bind(last_visible_id);
            },
        );
        if drop_receipts {
            let user_ids: Vec<i64> = leaves.iter().map(|&(user_id, _)| user_id).collect();
            self.pending
                .defer(|query| push_delete(query, "receipts", conversation_id, &user_ids));
        }
        Box::pin(future::ready(Ok(())))
    }

    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.pending
            .defer(|query| push_delete(query, "former_members", conversation_id, user_ids));
        Box::pin(future::ready(Ok(())))
    }

    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            // The whole transaction when it read nothing, its writes otherwise:
            // one call. A failed write stops the query before the COMMIT, and the
            // caller rolls back.
            let (mut query, cacheable) = self.pending.take();
            query.push("COMMIT");
            query
                .build()
                .persistent(cacheable)
                .execute(self.conn())
                .await?;
            self.checkpoints.committed();
            Ok(())
        })
    }

    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        // What was not sent is not done.
        self.pending = Pending::default();
        Box::pin(async move {
            // SQLite ends the transaction itself on some errors, and a
            // transaction that sent nothing never began; then there is nothing
            // left to roll back.
            match sqlx::raw_sql("ROLLBACK").execute(self.conn()).await {
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

    common::shared_writes!(close);
}

#[cfg(test)]
mod tests;
