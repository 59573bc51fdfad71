//! Tests of the SQLite backend: the conformance suite of the store traits
//! (`store::tests`), then what only SQLite has (statement chunks, the column
//! migration of older files).

use sqlx::Connection as _;

use super::*;
use crate::store::tests::{BATCH_KEYS, BATCH_MESSAGES, BATCH_USERS, Log, Store, message};

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
