//! Unit tests of the SQLite backend.

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
        notice: None,
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
    let events: Vec<EventRow> = (1..=n).map(|id| event_row(1, id as u64, id)).collect();
    log.insert_events(&events).await.unwrap();
    log.commit().await.unwrap();
    store
}

fn event_row(user_id: i64, seq: u64, message_id: i64) -> EventRow {
    EventRow {
        user_id,
        seq,
        message_id,
        payload: EventPayload::Message,
    }
}

fn ids(page: &Page<StoredMessage>) -> Vec<i64> {
    page.items.iter().map(|m| m.id).collect()
}

fn query(before: Option<i64>, after: Option<i64>, limit: u32) -> HistoryQuery {
    HistoryQuery {
        conversation_id: 7,
        before,
        after,
        up_to: None,
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
    assert_eq!(*page.items[0].message(), message(2, 7));
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
    let events: Vec<EventRow> = messages
        .iter()
        .flat_map(|m| (1..=3).map(move |user| event_row(user, m.id as u64, m.id)))
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

/// Unread counts stop at the cap: 10,005 unread messages count as 10,000.
#[tokio::test]
async fn unread_count_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut log) = open(&dir.path().join("m.db")).await.unwrap();
    let messages: Vec<StoredMessage> = (1..=10_005).map(|id| message(id, 7)).collect();
    log.begin().await.unwrap();
    log.insert_messages(&messages).await.unwrap();
    log.commit().await.unwrap();
    let states = store.unread_counts(2, &[7, 9]).await.unwrap();
    let unread: Vec<(i64, i64, u32)> = states
        .iter()
        .map(|s| (s.conversation_id, s.read_up_to, s.unread_count))
        .collect();
    assert_eq!(unread, vec![(7, 0, UNREAD_CAP), (9, 0, 0)]);
    assert_eq!(
        store.unread_counts(1, &[7]).await.unwrap()[0].unread_count,
        0
    );
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
