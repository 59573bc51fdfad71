//! The conformance suite of the store traits: every backend runs each test here
//! on a fresh, empty store, through [`conformance_suite!`] in its own tests
//! module. The tests use the traits only, so that one behaviour is pinned for
//! all backends.

use std::collections::HashMap;

use confab_proto::v1::{MembersAdded, Notice, ReadState, Receipt, notice};

use super::{
    EventPayload, EventRow, HistoryQuery, LogWriter, MessageStore, Page, ReceiptFacts,
    ReceiptQuery, StoreError, StoredMessage, UNREAD_CAP, UserEventKind, Watermarks,
};

/// The read side of a fresh store, as the suite gets it.
pub(crate) type Store = Box<dyn MessageStore>;
/// The write side of the same store.
pub(crate) type Log = Box<dyn LogWriter>;

/// Generates one `#[tokio::test]` per conformance test. `open` is an async fn
/// returning `(Store, Log, guard)` for a fresh, empty store; `finish` is an async
/// fn taking the guard back after the test (to delete the store).
macro_rules! conformance_suite {
    (open = $open:path, finish = $finish:path) => {
        $crate::store::tests::conformance_suite!(
            @tests $open, $finish;
            history_pagination,
            history_stops_at_leave_point,
            sync_pages_in_seq_order,
            sync_reports_head,
            last_messages_newest_per_conversation,
            message_lookup_within_conversation,
            unique_client_msg_id_and_rollback,
            large_batches_round_trip,
            unread_count_capped,
            notices_receipts_and_read_states_round_trip,
            watermarks_saved_and_counted,
            leave_points_recorded_and_cleared,
            writer_reads_its_own_transaction
        );
    };
    (@tests $open:path, $finish:path; $($name:ident),* $(,)?) => {
        $(
            /// Runs the conformance test of the same name (`store::tests`) on this
            /// backend.
            #[tokio::test]
            async fn $name() {
                let (store, log, guard) = $open().await;
                $crate::store::tests::$name(store, log).await;
                $finish(guard).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

/// Messages of the batch test: their columns alone exceed one SQLite statement.
pub(crate) const BATCH_MESSAGES: i64 = 5_000;
/// Dedup keys the batch test looks up (each found or not).
pub(crate) const BATCH_KEYS: usize = 17_000;
/// Users the batch test asks the last sequence number of.
pub(crate) const BATCH_USERS: i64 = 33_000;

pub(crate) fn message(id: i64, conversation_id: i64) -> StoredMessage {
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

pub(crate) fn event_row(user_id: i64, seq: u64, message_id: i64) -> EventRow {
    EventRow {
        user_id,
        seq,
        message_id,
        payload: EventPayload::Message,
    }
}

/// Writes messages 1..=n to conversation 7 (and one to conversation 8), with
/// an event of user 1 each.
async fn seed(log: &mut Log, n: i64) {
    log.begin().await.unwrap();
    let mut messages: Vec<StoredMessage> = (1..=n).map(|id| message(id, 7)).collect();
    messages.push(message(1_000, 8));
    log.insert_messages(&messages).await.unwrap();
    let events: Vec<EventRow> = (1..=n).map(|id| event_row(1, id as u64, id)).collect();
    log.insert_events(&events).await.unwrap();
    log.commit().await.unwrap();
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
pub(crate) async fn history_pagination(store: Store, mut log: Log) {
    seed(&mut log, 7).await;

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

/// `up_to` (a former member's leave point) hides every later message, in both
/// scan directions.
pub(crate) async fn history_stops_at_leave_point(store: Store, mut log: Log) {
    seed(&mut log, 7).await;
    let up_to = |mut query: HistoryQuery| {
        query.up_to = Some(4);
        query
    };
    let newest = store.history(up_to(query(None, None, 3))).await.unwrap();
    assert_eq!((ids(&newest), newest.has_more), (vec![4, 3, 2], true));
    let newer = store.history(up_to(query(None, Some(2), 5))).await.unwrap();
    assert_eq!((ids(&newer), newer.has_more), (vec![4, 3], false));
}

/// Sync returns a user's events after the cursor in seq order, with `has_more`.
pub(crate) async fn sync_pages_in_seq_order(store: Store, mut log: Log) {
    seed(&mut log, 5).await;
    let page = store.sync(1, 1, 3).await.unwrap().events;
    let seqs: Vec<u64> = page.items.iter().map(|e| e.seq).collect();
    assert_eq!((seqs, page.has_more), (vec![2, 3, 4], true));
    assert_eq!(*page.items[0].message(), message(2, 7));
    let rest = store.sync(1, 4, 3).await.unwrap().events;
    assert_eq!((rest.items.len(), rest.has_more), (1, false));
    assert!(store.sync(2, 0, 10).await.unwrap().events.items.is_empty());
}

/// Sync reports the user's head (0 without events) and never pages beyond it;
/// a cursor at or beyond the head gets an empty page and the head.
pub(crate) async fn sync_reports_head(store: Store, mut log: Log) {
    seed(&mut log, 5).await;
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

/// LastMessages returns the newest message of each conversation that has one,
/// in the order asked.
pub(crate) async fn last_messages_newest_per_conversation(store: Store, mut log: Log) {
    seed(&mut log, 3).await;
    let last = store.last_messages(&[7, 8, 9]).await.unwrap();
    assert_eq!(
        last.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![3, 1_000]
    );
    let reversed = store.last_messages(&[9, 8, 7]).await.unwrap();
    assert_eq!(
        reversed.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![1_000, 3]
    );
    assert!(store.last_messages(&[]).await.unwrap().is_empty());
}

/// A message is found by id only in its own conversation.
pub(crate) async fn message_lookup_within_conversation(store: Store, mut log: Log) {
    seed(&mut log, 2).await;
    assert_eq!(store.message(7, 2).await.unwrap(), Some(message(2, 7)));
    assert_eq!(store.message(8, 2).await.unwrap(), None);
    assert_eq!(store.message(7, 99).await.unwrap(), None);
}

/// Returns the error of inserting `messages` and committing: a backend may
/// refuse the insert at once or defer it to the commit.
async fn insert_and_commit_error(log: &mut Log, messages: &[StoredMessage]) -> StoreError {
    match log.insert_messages(messages).await {
        Err(error) => error,
        Ok(()) => log.commit().await.unwrap_err(),
    }
}

/// The unique index refuses a second (sender, client_msg_id), and a rolled
/// back transaction leaves nothing behind.
pub(crate) async fn unique_client_msg_id_and_rollback(store: Store, mut log: Log) {
    log.begin().await.unwrap();
    log.insert_messages(&[message(1, 7)]).await.unwrap();
    let mut copy = message(2, 7);
    copy.client_msg_id = "c1".into();
    let error = insert_and_commit_error(&mut log, &[copy]).await;
    assert!(!error.is_retryable(), "{error:?}");
    log.rollback().await.unwrap();
    // Two copies inside one multi-row INSERT are refused as well.
    log.begin().await.unwrap();
    let mut twin = message(3, 7);
    twin.client_msg_id = "c2".into();
    insert_and_commit_error(&mut log, &[message(2, 7), twin]).await;
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

/// Each batch operation handles thousands of rows in one call (more than one
/// SQLite statement may carry): 5,000 messages, 15,000 events, 17,000 dedup
/// keys and 33,000 users, all found again.
pub(crate) async fn large_batches_round_trip(store: Store, mut log: Log) {
    let messages: Vec<StoredMessage> = (1..=BATCH_MESSAGES).map(|id| message(id, 7)).collect();
    let events: Vec<EventRow> = messages
        .iter()
        .flat_map(|m| (1..=3).map(move |user| event_row(user, m.id as u64, m.id)))
        .collect();
    log.begin().await.unwrap();
    log.insert_messages(&messages).await.unwrap();
    log.insert_events(&events).await.unwrap();

    // Inside the transaction the writes are visible to the lookups.
    let missing: Vec<String> = (messages.len()..BATCH_KEYS)
        .map(|i| format!("missing{i}"))
        .collect();
    let keys: Vec<(i64, &str)> = messages
        .iter()
        .map(|m| (m.sender_id, m.client_msg_id.as_str()))
        .chain(missing.iter().map(|c| (1, c.as_str())))
        .collect();
    assert_eq!(keys.len(), BATCH_KEYS);
    let mut found = log.find_sent_many(&keys).await.unwrap();
    found.sort_by_key(|m| m.id);
    assert_eq!(found, messages);

    let users: Vec<i64> = (0..BATCH_USERS).collect();
    let last = log.last_seqs(&users).await.unwrap();
    let n = BATCH_MESSAGES as u64;
    assert_eq!(last, HashMap::from([(1, n), (2, n), (3, n)]));
    log.commit().await.unwrap();

    for user in 1..=3 {
        let page = store.sync(user, 0, 10_000).await.unwrap();
        let seqs: Vec<u64> = page.events.items.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>());
        assert_eq!(page.head, n);
    }
    let newest = store.history(query(None, None, 1)).await.unwrap();
    assert_eq!(ids(&newest), vec![BATCH_MESSAGES]);
}

/// Unread counts stop at the cap: 10,005 unread messages count as 10,000.
pub(crate) async fn unread_count_capped(store: Store, mut log: Log) {
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

/// Notices, receipts and read states come back from history and sync exactly
/// as they were written.
pub(crate) async fn notices_receipts_and_read_states_round_trip(store: Store, mut log: Log) {
    let notice = Notice {
        actor_id: 3,
        kind: Some(notice::Kind::MembersAdded(MembersAdded {
            user_ids: vec![2, 4],
        })),
    };
    let mut announced = message(1, 7);
    announced.text = String::new();
    announced.notice = Some(notice);
    let receipt = Receipt {
        conversation_id: 7,
        user_id: 2,
        delivered_up_to: 1,
        read_up_to: 1,
    };
    let read = ReadState {
        conversation_id: 7,
        read_up_to: 1,
        unread_count: 0,
    };
    log.begin().await.unwrap();
    log.insert_messages(std::slice::from_ref(&announced))
        .await
        .unwrap();
    let rows = [
        event_row(1, 1, 1),
        EventRow {
            user_id: 1,
            seq: 2,
            message_id: 0,
            payload: EventPayload::Receipt(receipt),
        },
        EventRow {
            user_id: 1,
            seq: 3,
            message_id: 0,
            payload: EventPayload::ReadState(read),
        },
    ];
    log.insert_events(&rows).await.unwrap();
    log.commit().await.unwrap();

    assert_eq!(store.message(7, 1).await.unwrap(), Some(announced.clone()));
    let kinds: Vec<UserEventKind> = store
        .sync(1, 0, 10)
        .await
        .unwrap()
        .events
        .items
        .into_iter()
        .map(|event| event.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            UserEventKind::Message(announced),
            UserEventKind::Receipt(receipt),
            UserEventKind::ReadState(read),
        ]
    );
    // A notice is nobody's unread message.
    assert_eq!(
        store.unread_counts(2, &[7]).await.unwrap()[0].unread_count,
        0
    );
}

/// Saved watermarks are found by key inside the transaction, replace older
/// ones, and feed the member list, the receipt counts and the unread counts.
pub(crate) async fn watermarks_saved_and_counted(store: Store, mut log: Log) {
    let marks = |delivered_up_to, read_up_to| Watermarks {
        delivered_up_to,
        read_up_to,
    };
    log.begin().await.unwrap();
    log.insert_messages(&(1..=5).map(|id| message(id, 7)).collect::<Vec<_>>())
        .await
        .unwrap();
    log.save_watermarks(&[
        (7, 2, marks(3, 1)),
        (7, 3, marks(5, 5)),
        (7, 1, marks(5, 5)),
    ])
    .await
    .unwrap();
    // Saving a key again replaces its watermarks, even within one call.
    log.save_watermarks(&[(7, 2, marks(3, 2)), (7, 2, marks(4, 3))])
        .await
        .unwrap();
    let loaded = log
        .load_watermarks(&[(7, 2), (7, 3), (7, 4), (8, 2)])
        .await
        .unwrap();
    assert_eq!(
        loaded,
        HashMap::from([((7, 2), marks(4, 3)), ((7, 3), marks(5, 5))])
    );
    log.commit().await.unwrap();

    let members = store.watermarks(7, 1, 10).await.unwrap();
    assert_eq!(members, vec![(2, marks(4, 3)), (3, marks(5, 5))]);
    assert_eq!(store.watermarks(7, 1, 1).await.unwrap().len(), 1);
    assert_eq!(store.receipt_counts(7, 4, 1).await.unwrap(), (2, 1));
    assert_eq!(store.receipt_counts(7, 5, 3).await.unwrap(), (1, 1));
    assert_eq!(store.receipt_counts(9, 1, 0).await.unwrap(), (0, 0));
    let state = &store.unread_counts(2, &[7]).await.unwrap()[0];
    assert_eq!((state.read_up_to, state.unread_count), (3, 2));
}

/// Leave points are recorded (the last one given wins), may drop the users'
/// watermarks, and are forgotten when the users come back.
pub(crate) async fn leave_points_recorded_and_cleared(store: Store, mut log: Log) {
    let marks = Watermarks {
        delivered_up_to: 1,
        read_up_to: 1,
    };
    log.begin().await.unwrap();
    log.save_watermarks(&[(7, 2, marks), (7, 3, marks), (7, 4, marks)])
        .await
        .unwrap();
    log.record_leaves(7, &[(2, 10), (3, 11), (2, 12)], true)
        .await
        .unwrap();
    log.record_leaves(7, &[(4, 13)], false).await.unwrap();
    log.commit().await.unwrap();
    assert_eq!(store.leave_point(7, 2).await.unwrap(), Some(12));
    assert_eq!(store.leave_point(7, 3).await.unwrap(), Some(11));
    assert_eq!(store.leave_point(8, 2).await.unwrap(), None);
    let kept: Vec<i64> = store
        .watermarks(7, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|(user, _)| user)
        .collect();
    assert_eq!(kept, vec![4]);

    log.begin().await.unwrap();
    log.clear_leaves(7, &[2, 4]).await.unwrap();
    log.clear_leaves(7, &[]).await.unwrap();
    log.record_leaves(7, &[(3, 14)], false).await.unwrap();
    log.commit().await.unwrap();
    assert_eq!(store.leave_point(7, 2).await.unwrap(), None);
    assert_eq!(store.leave_point(7, 3).await.unwrap(), Some(14));
    assert_eq!(store.leave_point(7, 4).await.unwrap(), None);
}

/// The writer's own reads (newest ids, senders, unread counts, last sequence
/// numbers) see the writes of its open transaction, and empty batches are no-ops.
pub(crate) async fn writer_reads_its_own_transaction(_store: Store, mut log: Log) {
    let from = |id, sender_id| StoredMessage {
        sender_id,
        ..message(id, 7)
    };
    let mut notice = from(6, 4);
    notice.notice = Some(Notice::default());
    log.begin().await.unwrap();
    log.insert_messages(&[
        from(1, 1),
        from(2, 2),
        from(3, 3),
        from(4, 2),
        from(5, 1),
        notice,
    ])
    .await
    .unwrap();
    log.insert_events(&[event_row(5, 1, 1), event_row(5, 2, 2), event_row(6, 1, 2)])
        .await
        .unwrap();
    assert_eq!(
        log.newest_ids(&[7, 8]).await.unwrap(),
        HashMap::from([(7, 6)])
    );
    // Several receipt commands' reads in one call, answered in order: the
    // senders only where asked for, the counts stopping at the cap.
    let query = |user_id, senders, unread_after| ReceiptQuery {
        conversation_id: 7,
        user_id,
        senders,
        unread_after: Some(unread_after),
    };
    let queries = [
        query(3, Some((1, 6)), 1),
        query(1, None, 1),
        query(1, None, 6),
        query(1, Some((6, 9)), 6),
        ReceiptQuery {
            conversation_id: 8,
            ..query(1, Some((0, 9)), 0)
        },
    ];
    let mut facts = log.receipt_facts(&queries, 100).await.unwrap();
    facts[0].senders.sort_unstable();
    let fact = |senders: Vec<i64>, unread| ReceiptFacts { senders, unread };
    assert_eq!(
        facts,
        [
            fact(vec![1, 2], 3),
            fact(vec![], 3),
            fact(vec![], 0),
            fact(vec![], 0),
            fact(vec![], 0),
        ]
    );
    let capped = log.receipt_facts(&queries[1..2], 2).await.unwrap();
    assert_eq!(capped, [fact(vec![], 2)]);
    // Only what is asked for: no count, or nothing at all.
    let no_count = ReceiptQuery {
        unread_after: None,
        ..queries[0]
    };
    let nothing = ReceiptQuery {
        senders: None,
        ..no_count
    };
    let mut facts = log.receipt_facts(&[no_count, nothing], 2).await.unwrap();
    facts[0].senders.sort_unstable();
    assert_eq!(facts, [fact(vec![1, 2], 0), fact(vec![], 0)]);
    let facts = log.receipt_facts(&[nothing], 2).await.unwrap();
    assert_eq!(facts, [fact(vec![], 0)]);
    assert!(log.receipt_facts(&[], 2).await.unwrap().is_empty());
    // More queries than SQLite allows in one compound SELECT.
    let many = vec![queries[0]; 450];
    let mut answers = log.receipt_facts(&many, 100).await.unwrap();
    answers.iter_mut().for_each(|a| a.senders.sort_unstable());
    assert_eq!(answers, vec![fact(vec![1, 2], 3); 450]);
    assert_eq!(
        log.last_seqs(&[5, 6, 7, 5]).await.unwrap(),
        HashMap::from([(5, 2), (6, 1)])
    );
    assert!(log.find_sent_many(&[]).await.unwrap().is_empty());
    assert!(log.last_seqs(&[]).await.unwrap().is_empty());
    assert!(log.newest_ids(&[]).await.unwrap().is_empty());
    assert!(log.load_watermarks(&[]).await.unwrap().is_empty());
    log.insert_messages(&[]).await.unwrap();
    log.insert_events(&[]).await.unwrap();
    log.save_watermarks(&[]).await.unwrap();
    log.record_leaves(7, &[], true).await.unwrap();
    log.commit().await.unwrap();
    log.close().await.unwrap();
}
