//! Tests of the SQLite backend: the conformance suite of the store traits
//! (`store::tests`), then what only SQLite has (a writer whose calls finish on
//! its own thread, the plans of its statements, the column migration of older
//! files, the settings of its connections).

use futures::FutureExt as _;
use sqlx::Connection as _;

use super::*;
use crate::store::HistoryQuery;
use crate::store::tests::{Log, Store, event_row, message};

/// Opens a fresh database in a new temporary directory, which the guard keeps.
async fn open_fresh() -> (Store, Log, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (store, log) = open(&dir.path().join("m.db")).await.unwrap();
    (Box::new(store), Box::new(log), dir)
}

/// Deletes the temporary directory.
async fn finish(dir: tempfile::TempDir) {
    dir.close().unwrap();
}

crate::store::tests::conformance_suite!(open = open_fresh, finish = finish);

/// Opens a fresh database and returns its writer as itself, not boxed.
async fn open_writer() -> (SqliteStore, SqliteLogWriter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (store, log) = open(&dir.path().join("m.db")).await.unwrap();
    (store, log, dir)
}

/// Returns the newest messages of conversation 7.
async fn conversation(store: &SqliteStore) -> Vec<StoredMessage> {
    let query = HistoryQuery {
        conversation_id: 7,
        before: None,
        after: None,
        up_to: None,
        limit: 10,
    };
    store.history(query).await.unwrap().items
}

/// Runs `call` of the writer, which must be done when it returns: the
/// statements ran on the caller's thread, with nothing left to wait for.
fn now<T>(call: BoxFuture<'_, Result<T, StoreError>>) -> Result<T, StoreError> {
    call.now_or_never()
        .expect("the writer's call finished on the caller's thread")
}

/// Every call of the writer is done when it returns, a commit included. A
/// write the database refuses (a repeated event key) fails there; after the
/// rollback nothing of the batch is stored, and the next batch commits.
#[tokio::test]
async fn calls_finish_on_the_callers_thread() {
    let (store, mut log, dir) = open_writer().await;
    now(log.begin()).unwrap();
    now(log.insert_messages(&[message(1, 7), message(2, 7)])).unwrap();
    let error = now(log.insert_events(&[event_row(1, 1, 1), event_row(1, 1, 2)])).unwrap_err();
    assert!(error.is_unique_violation(), "{error:?}");
    now(log.rollback()).unwrap();
    assert!(conversation(&store).await.is_empty());
    assert!(store.sync(1, 0, 10).await.unwrap().events.items.is_empty());
    // Nothing open: a second rollback is no error.
    now(log.rollback()).unwrap();

    now(log.begin()).unwrap();
    assert!(now(log.find_sent_many(&[(1, "c4")])).unwrap().is_empty());
    now(log.insert_messages(&[message(4, 7)])).unwrap();
    now(log.insert_events(&[event_row(1, 1, 4)])).unwrap();
    now(log.save_watermarks(&[(7, 1, Watermarks::default())])).unwrap();
    now(log.commit()).unwrap();
    assert_eq!(conversation(&store).await, vec![message(4, 7)]);
    assert_eq!(store.sync(1, 0, 10).await.unwrap().head, 1);
    now(Box::new(log).close()).unwrap();
    finish(dir).await;
}

/// A dedup key stored before fails the insert as a unique violation, which
/// the writer takes for a retry to look up (`writer::commit_batch`).
#[tokio::test]
async fn a_repeated_key_is_a_unique_violation() {
    let (_store, mut log, dir) = open_writer().await;
    now(log.begin()).unwrap();
    now(log.insert_messages(&[message(1, 7)])).unwrap();
    now(log.commit()).unwrap();
    now(log.begin()).unwrap();
    let mut again = message(1, 7);
    again.id = 2;
    let error = now(log.insert_messages(&[again])).unwrap_err();
    assert!(error.is_unique_violation(), "{error:?}");
    now(log.rollback()).unwrap();
    let found = now(log.find_sent_many(&[(message(1, 7).sender_id, "c1")])).unwrap();
    assert_eq!(found, vec![message(1, 7)]);
    finish(dir).await;
}

/// The writer's commits never checkpoint (`wal_autocheckpoint = 0`): the
/// checkpointer copies the WAL into the database file after a commit, on its
/// own connection.
#[tokio::test]
async fn the_checkpointer_copies_the_wal_not_the_commits() {
    let (_store, mut log, dir) = open_writer().await;
    let automatic: i64 = log
        .conn
        .query_row("PRAGMA wal_autocheckpoint", [], |row| row.get(0))
        .unwrap();
    assert_eq!(automatic, 0);
    let file = dir.path().join("m.db");
    let before = std::fs::metadata(&file).unwrap().len();
    let messages: Vec<StoredMessage> = (1..500).map(|id| message(id, 7)).collect();
    now(log.begin()).unwrap();
    now(log.insert_messages(&messages)).unwrap();
    now(log.commit()).unwrap();
    log.checkpoints.completed(1).await;
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(
        after > before,
        "the checkpoint left the file at {after} bytes (from {before})"
    );
    now(Box::new(log).close()).unwrap();
    finish(dir).await;
}

/// Asserts that the plan of `sql` on the writer's connection seeks `index`
/// of the messages, aliased `m`.
fn assert_seeks(log: &SqliteLogWriter, sql: &str, index: &str) {
    let mut explain = log
        .conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap();
    // The plan does not depend on the values: NULLs for every parameter.
    let nulls = std::iter::repeat_n(rusqlite::types::Null, explain.parameter_count());
    let details: Vec<String> = explain
        .query_map(rusqlite::params_from_iter(nulls), |row| row.get(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let seek = format!("SEARCH m USING INDEX {index}");
    assert!(details.iter().any(|d| d.starts_with(&seek)), "{details:?}");
}

/// The dedup lookup seeks the unique index; the receipt reads seek the
/// history index (a range for the senders, a capped count).
#[tokio::test]
async fn the_writers_reads_seek_their_indexes() {
    let (_store, log, dir) = open_writer().await;
    assert_seeks(&log, sql::FIND_SENT, "messages_sender_client_msg_id");
    assert_seeks(&log, sql::RECEIPT_SENDERS, "messages_conversation_id");
    let count = common::UNREAD_COUNT.replace("FROM messages", "FROM messages m");
    assert_seeks(&log, &count, "messages_conversation_id");
    finish(dir).await;
}

/// A file created before notices and receipts gains the new columns at
/// open, keeps its rows, and opening again changes nothing.
#[tokio::test]
async fn migration_adds_columns_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    {
        let mut conn = confab_common::db::sqlite_options(&path)
            .connect()
            .await
            .unwrap();
        sqlx::raw_sql(
            "CREATE TABLE messages (id BIGINT PRIMARY KEY, conversation_id BIGINT NOT NULL, \
             sender_id BIGINT NOT NULL, sender_device TEXT NOT NULL, \
             client_msg_id TEXT NOT NULL, sent_at_ms BIGINT NOT NULL, text TEXT NOT NULL); \
             CREATE TABLE user_events (user_id BIGINT NOT NULL, seq BIGINT NOT NULL, \
             kind SMALLINT NOT NULL DEFAULT 1, message_id BIGINT NOT NULL, \
             PRIMARY KEY (user_id, seq)); \
             INSERT INTO messages VALUES (1, 7, 1, 'phone', 'c1', 1001, 'text 1'); \
             INSERT INTO user_events (user_id, seq, message_id) VALUES (1, 1, 1);",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        conn.close().await.unwrap();
    }
    for _ in 0..2 {
        let (store, log) = open(&path).await.unwrap();
        let page = store.sync(1, 0, 10).await.unwrap();
        assert_eq!(*page.events.items[0].message(), message(1, 7));
        Box::new(log).close().await.unwrap();
    }
}

/// Returns `pragma` (a `PRAGMA` read) on the writer's connection and on a
/// reader's.
async fn on_both(store: &SqliteStore, log: &SqliteLogWriter, pragma: &'static str) -> [i64; 2] {
    let writer = log.conn.query_row(pragma, [], |row| row.get(0)).unwrap();
    let reader = sqlx::query_scalar(pragma)
        .fetch_one(&store.pool)
        .await
        .unwrap();
    [writer, reader]
}

/// The writer's connection keeps a page cache of [`WRITER_CACHE`] (the leaves
/// a batch touches), the readers SQLite's default.
#[tokio::test]
async fn the_writer_keeps_a_larger_page_cache() {
    let (store, log, _dir) = open_writer().await;
    let [writer, reader] = on_both(&store, &log, "PRAGMA cache_size").await;
    assert_eq!(writer, WRITER_CACHE);
    assert_eq!(reader, -2000);
}

/// A new store's file has pages of [`PAGE_SIZE`], for every connection.
#[tokio::test]
async fn a_new_store_has_small_pages() {
    let (store, log, _dir) = open_writer().await;
    let sizes = on_both(&store, &log, "PRAGMA page_size").await;
    assert_eq!(sizes, [i64::from(PAGE_SIZE); 2]);
}
