//! Tests of the SQLite backend: the conformance suite of the store traits
//! (`store::tests`), then what only SQLite has (statement chunks, writes deferred
//! to the commit, the calls a group commit makes on the connection, the column
//! migration of older files).

use sqlx::Connection as _;

use super::*;
use crate::store::HistoryQuery;
use crate::store::tests::{
    BATCH_KEYS, BATCH_MESSAGES, BATCH_USERS, Log, Store, event_row, message,
};

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

// The suite's batch test spans several statements of every kind on SQLite:
// messages (8 parameters each), events (5), dedup keys (2) and users (1).
const _: () = assert!(
    BATCH_MESSAGES as usize * 8 > MAX_BIND_PARAMS
        && BATCH_MESSAGES as usize * 3 * 5 > MAX_BIND_PARAMS
        && BATCH_KEYS * 2 > MAX_BIND_PARAMS
        && BATCH_USERS as usize > MAX_BIND_PARAMS
);

/// Statements never exceed SQLite's parameter limit and cover every row in
/// order; a keyed read below a full chunk is one statement, padded to one of
/// few row counts.
#[test]
fn chunks_bounded_and_reads_padded() {
    assert_eq!(full_chunk(3), 10_922);
    assert_eq!(padded_len(1, 2), 1);
    assert_eq!(padded_len(15, 2), 16);
    assert_eq!(padded_len(16, 2), 16);
    assert_eq!(padded_len(9_000, 2), 16_383);
    let mut distinct = std::collections::BTreeSet::new();
    for columns in [1, 2, 3, 7] {
        for len in 1..=full_chunk(columns) {
            let padded = padded_len(len, columns);
            assert!(len <= padded && padded * columns <= MAX_BIND_PARAMS);
            distinct.insert((columns, padded));
        }
    }
    assert!(distinct.len() <= 4 * 16, "{} read texts", distinct.len());

    let items: Vec<i64> = (0..40_000).collect();
    for (columns, statements) in [(1, 2), (5, 7), (8, 10)] {
        let mut query = QueryBuilder::<Sqlite>::new("");
        let mut bound = Vec::new();
        let count = push_rows(
            &mut query,
            ("SELECT ", ""),
            &items,
            columns,
            false,
            |mut row, &item| {
                bound.push(item);
                for _ in 0..columns {
                    row.push_bind(item);
                }
            },
        );
        assert_eq!(count, statements);
        assert_eq!(bound, items);
        let sql = query.sql();
        for statement in sql.as_str().split("; ").filter(|s| !s.is_empty()) {
            assert!(statement.matches('?').count() <= MAX_BIND_PARAMS);
        }
    }
}

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

/// The writes wait for the commit: a write the database refuses (a repeated
/// event key) fails the commit, not the write; after the rollback nothing of
/// the batch is stored, a rolled back batch's writes are not sent with the
/// next one, and the next batch commits.
#[tokio::test]
async fn writes_deferred_to_commit_and_dropped_by_rollback() {
    let (store, mut log, dir) = open_writer().await;
    log.begin().await.unwrap();
    log.insert_messages(&[message(1, 7), message(2, 7)])
        .await
        .unwrap();
    log.insert_events(&[event_row(1, 1, 1), event_row(1, 1, 2)])
        .await
        .unwrap();
    log.save_watermarks(&[(7, 1, Watermarks::default())])
        .await
        .unwrap();
    let error = log.commit().await.unwrap_err();
    assert!(matches!(error, StoreError::Sql(_)), "{error:?}");
    log.rollback().await.unwrap();
    assert!(conversation(&store).await.is_empty());
    assert!(store.sync(1, 0, 10).await.unwrap().events.items.is_empty());
    assert!(store.watermarks(7, 0, 10).await.unwrap().is_empty());

    log.begin().await.unwrap();
    log.insert_messages(&[message(3, 7)]).await.unwrap();
    log.rollback().await.unwrap();

    log.begin().await.unwrap();
    log.insert_messages(&[message(4, 7)]).await.unwrap();
    log.insert_events(&[event_row(1, 1, 4)]).await.unwrap();
    log.commit().await.unwrap();
    assert_eq!(conversation(&store).await, vec![message(4, 7)]);
    assert_eq!(store.sync(1, 0, 10).await.unwrap().head, 1);
    Box::new(log).close().await.unwrap();
    finish(dir).await;
}

/// Runs the group commit of sends of messages `ids` as the writer does (the
/// dedup lookup, the messages, an event for each of two users, the commit) and
/// returns the calls it made on the connection.
async fn commit_sends(log: &mut SqliteLogWriter, ids: std::ops::Range<i64>) -> u64 {
    let messages: Vec<StoredMessage> = ids.map(|id| message(id, 7)).collect();
    let keys: Vec<(i64, &str)> = messages
        .iter()
        .map(|m| (m.sender_id, m.client_msg_id.as_str()))
        .collect();
    let events: Vec<EventRow> = messages
        .iter()
        .flat_map(|m| [1, 2].map(|user| event_row(user, m.id as u64, m.id)))
        .collect();
    let before = log.round_trips;
    log.begin().await.unwrap();
    assert!(log.find_sent_many(&keys).await.unwrap().is_empty());
    log.insert_messages(&messages).await.unwrap();
    log.insert_events(&events).await.unwrap();
    log.commit().await.unwrap();
    log.round_trips - before
}

/// A deferred write of up to [`CACHED_WRITE_ROWS`] rows is padded: row counts
/// with the same padding give the same text, which may be cached; beyond, the
/// text is the rows' own and is not cached.
#[test]
fn writes_padded_up_to_the_cached_rows() {
    let statement = (
        "INSERT INTO t (a) SELECT * FROM (",
        ") WHERE column1 IS NOT NULL",
    );
    let text = |rows: usize| {
        let mut pending = Pending::default();
        let ids: Vec<i64> = (0..rows as i64).collect();
        pending.defer_rows(statement, &ids, 1, |mut row, &id| {
            row.push_bind(id);
        });
        let (query, cacheable) = pending.take();
        (query.sql().as_str().to_owned(), cacheable)
    };
    let (five, cacheable) = text(5);
    assert!(cacheable);
    assert_eq!(text(7), (five.clone(), true));
    assert_ne!(text(9).0, five);
    assert!(text(CACHED_WRITE_ROWS).1);
    assert!(!text(CACHED_WRITE_ROWS + 1).1);
}

/// A group commit of sends is two calls on the connection (BEGIN with the
/// dedup lookup, the writes with the COMMIT) and caches no new statement when
/// the batch size changes a little; one of receipts is four, however many
/// receipts (BEGIN with the watermark lookup, the newest ids, every receipt's
/// senders and unread count, the writes with the COMMIT).
#[tokio::test]
async fn group_commit_round_trips() {
    let (_store, mut log, dir) = open_writer().await;
    assert_eq!(commit_sends(&mut log, 1..16).await, 2);
    let cached = log.conn.cached_statements_size();
    // 13 keys are padded to the 16 of the lookup before.
    assert_eq!(commit_sends(&mut log, 16..29).await, 2);
    assert_eq!(log.conn.cached_statements_size(), cached);

    let before = log.round_trips;
    log.begin().await.unwrap();
    let marks = log.load_watermarks(&[(7, 2), (7, 3)]).await.unwrap();
    assert!(marks.is_empty());
    assert_eq!(log.newest_ids(&[7]).await.unwrap()[&7], 28);
    let queries: Vec<ReceiptQuery> = [2, 3]
        .map(|user_id| ReceiptQuery {
            conversation_id: 7,
            user_id,
            senders: Some((0, 28)),
            unread_after: Some(28),
        })
        .into();
    let facts = log.receipt_facts(&queries, UNREAD_CAP).await.unwrap();
    assert_eq!(facts.len(), 2);
    let moved = Watermarks {
        delivered_up_to: 28,
        read_up_to: 28,
    };
    log.save_watermarks(&[(7, 2, moved), (7, 3, moved)])
        .await
        .unwrap();
    log.commit().await.unwrap();
    assert_eq!(log.round_trips - before, 4);
    let marks = log.load_watermarks(&[(7, 2)]).await.unwrap();
    assert_eq!(marks[&(7, 2)], moved);
    Box::new(log).close().await.unwrap();
    finish(dir).await;
}

/// The writer's commits never checkpoint (`wal_autocheckpoint = 0`): the
/// checkpointer copies the WAL into the database file after a commit, on its
/// own connection.
#[tokio::test]
async fn the_checkpointer_copies_the_wal_not_the_commits() {
    let (_store, mut log, dir) = open_writer().await;
    let automatic: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint")
        .fetch_one(&mut log.conn)
        .await
        .unwrap();
    assert_eq!(automatic, 0);
    let file = dir.path().join("m.db");
    let before = std::fs::metadata(&file).unwrap().len();
    commit_sends(&mut log, 1..500).await;
    log.checkpoints.completed(1).await;
    let after = std::fs::metadata(&file).unwrap().len();
    assert!(
        after > before,
        "the checkpoint left the file at {after} bytes (from {before})"
    );
    Box::new(log).close().await.unwrap();
    finish(dir).await;
}

/// Asserts that the plan of `explain` (an `EXPLAIN QUERY PLAN` of one
/// statement) seeks `index` of the messages, aliased `m`.
async fn assert_seeks(conn: &mut SqliteConnection, mut explain: QueryBuilder<Sqlite>, index: &str) {
    let plan: Vec<(i64, i64, i64, String)> =
        explain.build_query_as().fetch_all(conn).await.unwrap();
    let details: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
    let seek = format!("SEARCH m USING INDEX {index}");
    assert!(details.iter().any(|d| d.starts_with(&seek)), "{details:?}");
}

/// The dedup lookup, padded or not, seeks the unique index once per key.
#[tokio::test]
async fn dedup_lookup_uses_the_unique_index() {
    let (_store, mut log, dir) = open_writer().await;
    for keys in [&[(1, "a")][..], &[(1, "a"), (2, "b"), (3, "c")]] {
        let mut query = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
        assert_eq!(push_find_sent(&mut query, keys), 1);
        assert_seeks(&mut log.conn, query, "messages_sender_client_msg_id").await;
    }
    Box::new(log).close().await.unwrap();
    finish(dir).await;
}

/// The receipt reads are one statement per part, each seeking the history
/// index once per query (a range for the senders, a capped count), and their
/// texts are padded: 3 and 4 queries read with the same text.
#[tokio::test]
async fn receipt_reads_seek_the_history_index() {
    let (_store, mut log, dir) = open_writer().await;
    let query = |conversation_id| ReceiptQuery {
        conversation_id,
        user_id: 1,
        senders: Some((0, 100)),
        unread_after: Some(0),
    };
    let mut texts = Vec::new();
    for queries in [
        vec![query(1)],
        vec![query(1), query(2), query(3)],
        vec![query(4); 4],
    ] {
        for (senders, counts) in [(true, false), (false, true)] {
            let queries: Vec<_> = queries
                .iter()
                .map(|q| ReceiptQuery {
                    senders: q.senders.filter(|_| senders),
                    unread_after: q.unread_after.filter(|_| counts),
                    ..*q
                })
                .collect();
            let mut explain = QueryBuilder::<Sqlite>::new("EXPLAIN QUERY PLAN ");
            assert_eq!(push_receipt_facts(&mut explain, &queries, 10), 1);
            texts.push(explain.sql().to_owned());
            assert_seeks(&mut log.conn, explain, "messages_conversation_id").await;
        }
    }
    // One query, then 3 and 4 padded alike: per part, two texts.
    assert_eq!(texts[2], texts[4]);
    assert_eq!(texts[3], texts[5]);
    assert_ne!(texts[0], texts[2]);
    Box::new(log).close().await.unwrap();
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
async fn on_both(store: &SqliteStore, log: &mut SqliteLogWriter, pragma: &'static str) -> [i64; 2] {
    let writer = sqlx::query_scalar(pragma)
        .fetch_one(log.conn())
        .await
        .unwrap();
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
    let (store, mut log, _dir) = open_writer().await;
    let [writer, reader] = on_both(&store, &mut log, "PRAGMA cache_size").await;
    assert_eq!(writer.to_string(), WRITER_CACHE);
    assert_eq!(reader, -2000);
}

/// A new store's file has pages of [`PAGE_SIZE`], for every connection.
#[tokio::test]
async fn a_new_store_has_small_pages() {
    let (store, mut log, _dir) = open_writer().await;
    let sizes = on_both(&store, &mut log, "PRAGMA page_size").await;
    assert_eq!(sizes, [i64::from(PAGE_SIZE); 2]);
}
