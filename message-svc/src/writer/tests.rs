//! Unit tests of the group-commit writer.

use std::sync::atomic::AtomicBool;

use super::*;
use crate::store::sqlite::{self, SqliteLogWriter, SqliteStore};
use crate::store::{BoxFuture, MessageStore as _, UserEvent, UserEventKind};
use crate::testing::RecordingBus;

struct Setup {
    handle: WriterHandle,
    done: watch::Receiver<bool>,
    stats: Arc<WriterStats>,
    store: SqliteStore,
    bus: Arc<RecordingBus>,
    live: mpsc::UnboundedReceiver<Arc<LiveEvent>>,
}

async fn setup(dir: &tempfile::TempDir, fail_commit: Option<Arc<AtomicBool>>) -> Setup {
    let (store, log) = sqlite::open(&dir.path().join("m.db")).await.unwrap();
    let log: Box<dyn LogWriter> = match fail_commit {
        Some(fail) => Box::new(FailingLog::new(log, fail)),
        None => Box::new(log),
    };
    let (bus, live) = RecordingBus::new();
    // On the test's runtime: commands queued before it yields land in one batch.
    let (handle, done, stats) = spawn(log, Home::Runtime, 3, 512, bus.clone()).unwrap();
    Setup {
        handle,
        done,
        stats,
        store,
        bus,
        live,
    }
}

fn command(
    sender_id: i64,
    conversation_id: i64,
    members: &[i64],
    client_msg_id: &str,
) -> SendCommand {
    SendCommand {
        sender_id,
        sender_device: format!("device-{sender_id}"),
        conversation_id,
        client_msg_id: client_msg_id.into(),
        text: format!("hello from {sender_id}"),
        hint: hint(members),
        accepted_at: Instant::now(),
    }
}

/// A group snapshot at version 1 with `members`.
fn hint(members: &[i64]) -> Arc<Snapshot> {
    let mut members = members.to_vec();
    members.sort_unstable();
    Arc::new(Snapshot {
        version: 1,
        kind: confab_proto::v1::ConversationKind::Group,
        member_count: members.len() as u32,
        members: members.into(),
    })
}

/// Returns the user a live event is for; panics on anything else.
fn user_of(event: &LiveEvent) -> i64 {
    match event.audience {
        Audience::User(user_id) => user_id,
        other => panic!("not a user's event: {other:?}"),
    }
}

async fn all_events(store: &SqliteStore, user_id: i64) -> Vec<UserEvent> {
    store.sync(user_id, 0, 10_000).await.unwrap().events.items
}

/// Fails the next commit when `fail` is set, like a full disk would; with
/// `commit_gate`, each commit first waits for a permit; `on_lookup` runs at
/// each dedup lookup, `on_commit` as each commit is asked for.
#[derive(Debug)]
struct FailingLog {
    inner: SqliteLogWriter,
    fail: Arc<AtomicBool>,
    commit_gate: Option<Arc<tokio::sync::Semaphore>>,
    on_lookup: Option<Hook>,
    on_commit: Option<Hook>,
}

/// A callback of a test's, run by [`FailingLog`].
#[derive(Clone)]
struct Hook(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

impl FailingLog {
    fn new(inner: SqliteLogWriter, fail: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            fail,
            commit_gate: None,
            on_lookup: None,
            on_commit: None,
        }
    }
}

impl LogWriter for FailingLog {
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.begin()
    }
    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
        if let Some(hook) = &self.on_lookup {
            (hook.0)();
        }
        self.inner.find_sent_many(keys)
    }
    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>> {
        self.inner.last_seqs(user_ids)
    }
    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.insert_messages(messages)
    }
    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.insert_events(events)
    }
    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>> {
        self.inner.newest_ids(conversation_ids)
    }
    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<crate::store::WatermarkMap, StoreError>> {
        self.inner.load_watermarks(keys)
    }
    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.save_watermarks(rows)
    }
    fn receipt_facts<'a>(
        &'a mut self,
        queries: &'a [crate::store::ReceiptQuery],
        cap: u32,
    ) -> BoxFuture<'a, Result<Vec<crate::store::ReceiptFacts>, StoreError>> {
        self.inner.receipt_facts(queries, cap)
    }
    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner
            .record_leaves(conversation_id, leaves, drop_receipts)
    }
    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        self.inner.clear_leaves(conversation_id, user_ids)
    }
    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        if self.fail.swap(false, Ordering::SeqCst) {
            return Box::pin(async {
                Err(sqlx::Error::Protocol("injected commit failure".into()).into())
            });
        }
        if let Some(hook) = &self.on_commit {
            (hook.0)();
        }
        match self.commit_gate.clone() {
            Some(gate) => Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                self.inner.commit().await
            }),
            None => self.inner.commit(),
        }
    }
    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.rollback()
    }
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        Box::new(self.inner).close()
    }
}

/// A retry with the same (sender, client_msg_id) returns the original message
/// with `duplicate` set and stores nothing, also with other content.
#[tokio::test]
async fn retry_returns_original() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let first = submit(&s.handle, command(1, 10, &[1, 2], "a"))
        .await
        .unwrap();
    let mut retry = command(1, 10, &[1, 2], "a");
    retry.text = "different".into();
    let second = submit(&s.handle, retry).await.unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate);
    assert_eq!(second.message, first.message);
    assert_eq!(all_events(&s.store, 2).await.len(), 1);
    // Another sender may use the same client_msg_id.
    let other = submit(&s.handle, command(2, 10, &[1, 2], "a"))
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_ne!(other.message.id, first.message.id);
}

/// Two copies of one send inside one batch store one message: the second is
/// answered with the first's message, marked duplicate.
#[tokio::test]
async fn duplicate_within_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    // On the current-thread runtime the writer cannot run before both are
    // queued, so they land in one batch.
    let (a, b) = tokio::join!(
        submit(&s.handle, command(1, 10, &[1, 2], "same")),
        submit(&s.handle, command(1, 10, &[1, 2], "same")),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(s.stats.commits.load(Ordering::Relaxed), 1);
    assert_eq!((a.duplicate, b.duplicate), (false, true));
    assert_eq!(a.message, b.message);
    assert_eq!(all_events(&s.store, 1).await.len(), 1);
    assert_eq!(
        s.bus.events.lock().len(),
        2,
        "one event per member, none for the copy"
    );
}

/// 200 concurrent sends from three senders: every user's sequence is 1..=n
/// with each message once, ids increase with seq within every conversation,
/// far fewer commits than sends, and the bus sees every event in per-user seq
/// order, each readable (committed) when published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_gap_free_and_batched() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = setup(&dir, None).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200_i64 {
        let handle = s.handle.clone();
        let sender = 1 + i % 3;
        // Conversation 10 = {1, 2, 3}, conversation 20 = {1, 2}.
        let (conversation, members): (i64, &[i64]) = if sender == 3 || i % 2 == 0 {
            (10, &[1, 2, 3])
        } else {
            (20, &[1, 2])
        };
        tasks.spawn(async move {
            submit(
                &handle,
                command(sender, conversation, members, &format!("m{i}")),
            )
            .await
        });
    }
    let mut sent = Vec::new();
    while let Some(result) = tasks.join_next().await {
        sent.push(result.unwrap().unwrap());
    }
    let commits = s.stats.commits.load(Ordering::Relaxed);
    let largest = s.stats.max_batch.load(Ordering::Relaxed);
    println!("200 concurrent sends: {commits} commits, largest batch {largest}");
    assert!(commits <= 100, "{commits} commits for 200 sends");

    for user in 1..=3_i64 {
        let events = all_events(&s.store, user).await;
        let expected = sent
            .iter()
            .filter(|sent| user != 3 || sent.message.conversation_id == 10)
            .count();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=expected as u64).collect::<Vec<_>>(),
            "user {user}"
        );
        let mut ids: Vec<i64> = events.iter().map(|e| e.message().id).collect();
        for conversation in [10, 20] {
            let in_conversation: Vec<i64> = events
                .iter()
                .filter(|e| e.message().conversation_id == conversation)
                .map(|e| e.message().id)
                .collect();
            assert!(
                in_conversation.windows(2).all(|w| w[0] < w[1]),
                "ids out of commit order"
            );
        }
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), expected, "user {user} got a message twice");
    }

    let mut last_seq: HashMap<i64, u64> = HashMap::new();
    let published = s.bus.events.lock().len();
    for _ in 0..published {
        let event = s.live.recv().await.unwrap();
        let last = last_seq.entry(user_of(&event)).or_default();
        assert_eq!(
            event.event.seq,
            *last + 1,
            "user {} out of order",
            user_of(&event)
        );
        *last = event.event.seq;
        let stored = s
            .store
            .sync(user_of(&event), event.event.seq - 1, 1)
            .await
            .unwrap();
        let Some(event::Kind::Message(message)) = &event.event.kind else {
            panic!("not a message event");
        };
        assert_eq!(stored.events.items[0].message().id, message.id);
        let own = user_of(&event) == message.sender_id;
        assert_eq!(event.origin_device.is_some(), own);
    }
    assert_eq!(last_seq[&1], 200);
}

/// A failed commit answers every send of the batch with an error, stores
/// nothing, and the next batch reuses no sequence number and skips none.
#[tokio::test]
async fn failed_commit_rolls_back_and_reloads_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let s = setup(&dir, Some(fail.clone())).await;
    submit(&s.handle, command(1, 10, &[1, 2], "ok-1"))
        .await
        .unwrap();
    fail.store(true, Ordering::SeqCst);
    let (a, b) = tokio::join!(
        submit(&s.handle, command(1, 10, &[1, 2], "lost-1")),
        submit(&s.handle, command(2, 10, &[1, 2], "lost-2")),
    );
    assert!(matches!(a, Err(MessageError::CommitFailed(_))));
    assert!(matches!(b, Err(MessageError::CommitFailed(_))));
    let retried = submit(&s.handle, command(1, 10, &[1, 2], "lost-1"))
        .await
        .unwrap();
    assert!(!retried.duplicate, "the failed batch stored nothing");
    for user in [1, 2] {
        let seqs: Vec<u64> = all_events(&s.store, user)
            .await
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }
    assert_eq!(
        s.bus.events.lock().len(),
        4,
        "nothing published for the failed batch"
    );
}

/// After a restart the sequences continue where they stopped, and old
/// client_msg_ids still dedup.
#[tokio::test]
async fn restart_continues_sequences() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let first = submit(&s.handle, command(1, 10, &[1, 2], "before"))
        .await
        .unwrap();
    submit(&s.handle, command(2, 10, &[1, 2], "before-2"))
        .await
        .unwrap();
    let Setup {
        handle, mut done, ..
    } = s;
    drop(handle);
    done.wait_for(|done| *done).await.unwrap();

    let s = setup(&dir, None).await;
    let retry = submit(&s.handle, command(1, 10, &[1, 2], "before"))
        .await
        .unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message.id, first.message.id);
    let after = submit(&s.handle, command(1, 10, &[1, 2], "after"))
        .await
        .unwrap();
    assert!(after.message.id > first.message.id);
    for user in [1, 2] {
        let seqs: Vec<u64> = all_events(&s.store, user)
            .await
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
    assert_eq!(
        s.bus
            .events
            .lock()
            .iter()
            .map(|e| e.event.seq)
            .collect::<Vec<_>>(),
        vec![3, 3]
    );
}

/// Three sends in one batch to a conversation of 6,000 members: 18,000 event
/// rows, more than one INSERT may carry (10,922 rows of 3 parameters), all
/// stored, each member's seqs 1, 2, 3 in the messages' commit order.
#[tokio::test]
async fn batch_beyond_one_chunk_stores_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let members: Vec<i64> = (1..=6_000).collect();
    let (a, b, c) = tokio::join!(
        submit(&s.handle, command(1, 10, &members, "a")),
        submit(&s.handle, command(2, 10, &members, "b")),
        submit(&s.handle, command(3, 10, &members, "c")),
    );
    let ids = [a.unwrap(), b.unwrap(), c.unwrap()].map(|sent| sent.message.id);
    assert_eq!(s.stats.commits.load(Ordering::Relaxed), 1, "one batch");
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    for &user in &members {
        let events = all_events(&s.store, user).await;
        let stored: Vec<(u64, i64)> = events.iter().map(|e| (e.seq, e.message().id)).collect();
        assert_eq!(
            stored,
            vec![(1, ids[0]), (2, ids[1]), (3, ids[2])],
            "user {user}"
        );
    }
    assert_eq!(s.bus.events.lock().len(), 18_000);
}

/// 600 sends queued at once with batches of at most 512: every one stored
/// once, in at least two commits, each member's seqs 1..=600 with ids
/// increasing along them.
#[tokio::test]
async fn more_sends_than_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let members = [1, 2, 3, 4];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..600_i64 {
        let handle = s.handle.clone();
        let sender = 1 + i % 4;
        tasks.spawn(async move {
            submit(&handle, command(sender, 10, &members, &format!("m{i}"))).await
        });
    }
    let mut sent = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let result = result.unwrap().unwrap();
        assert!(!result.duplicate);
        sent.push(result.message.id);
    }
    let commits = s.stats.commits.load(Ordering::Relaxed);
    let largest = s.stats.max_batch.load(Ordering::Relaxed);
    println!("600 queued sends: {commits} commits, largest batch {largest}");
    assert!(commits >= 2, "{commits} commits");
    assert!(largest <= 512, "batch of {largest}");
    sent.sort_unstable();
    sent.dedup();
    assert_eq!(sent.len(), 600);
    for user in members {
        let events = all_events(&s.store, user).await;
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=600).collect::<Vec<_>>(), "user {user}");
        let ids: Vec<i64> = events.iter().map(|e| e.message().id).collect();
        assert_eq!(ids, sent, "user {user}: ids follow the seqs");
    }
}

/// A copy in the batch of a message stored by an earlier batch, and a second
/// copy of a new one, are both answered from the right original, and the
/// seqs of the batch stay gap-free.
#[tokio::test]
async fn duplicates_of_stored_and_new_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let old = submit(&s.handle, command(1, 10, &[1, 2], "old"))
        .await
        .unwrap();
    let (retry, fresh, copy, other) = tokio::join!(
        submit(&s.handle, command(1, 10, &[1, 2], "old")),
        submit(&s.handle, command(2, 10, &[1, 2], "new")),
        submit(&s.handle, command(2, 10, &[1, 2], "new")),
        submit(&s.handle, command(1, 10, &[1, 2], "other")),
    );
    let (retry, fresh, copy, other) = (
        retry.unwrap(),
        fresh.unwrap(),
        copy.unwrap(),
        other.unwrap(),
    );
    assert_eq!(s.stats.commits.load(Ordering::Relaxed), 2);
    assert_eq!((retry.duplicate, &retry.message), (true, &old.message));
    assert!(!fresh.duplicate && !other.duplicate);
    assert_eq!(
        (copy.duplicate, copy.message),
        (true, fresh.message.clone())
    );
    assert!(fresh.message.id < other.message.id);
    for user in [1, 2] {
        let ids: Vec<(u64, i64)> = all_events(&s.store, user)
            .await
            .iter()
            .map(|e| (e.seq, e.message().id))
            .collect();
        assert_eq!(
            ids,
            vec![
                (1, old.message.id),
                (2, fresh.message.id),
                (3, other.message.id)
            ]
        );
    }
}

/// Receipts and sends in one batch: the receipt commands' reads of stored
/// messages are answered together after the batch is applied, yet every event
/// sits where its command put it, and the counts include the batch's own
/// messages as of each command's place.
#[tokio::test]
async fn receipts_and_sends_in_one_batch_keep_command_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = setup(&dir, None).await;
    let members = [1, 2, 3];
    let m1 = submit(&s.handle, command(1, 10, &members, "m1"))
        .await
        .unwrap();
    let m2 = submit(&s.handle, command(2, 10, &members, "m2"))
        .await
        .unwrap();
    let receipt = |user_id, delivered_up_to, read_up_to| ReceiptCommand {
        user_id,
        conversation_id: 10,
        delivered_up_to,
        read_up_to,
        hint: hint(&members),
    };
    let commits = s.stats.commits.load(Ordering::Relaxed);
    // On the current-thread runtime the writer cannot run before all three
    // are queued, so they land in one batch.
    let (read, m3, read_m1) = tokio::join!(
        submit_receipts(&s.handle, receipt(3, 0, m2.message.id)),
        submit(&s.handle, command(1, 10, &members, "m3")),
        submit_receipts(&s.handle, receipt(2, 0, m1.message.id)),
    );
    let (read, read_m1) = (read.unwrap(), read_m1.unwrap());
    assert!(!m3.unwrap().duplicate);
    assert_eq!(s.stats.commits.load(Ordering::Relaxed), commits + 1);
    // User 3 read both stored messages; m3 came after the command.
    assert_eq!(read.unread_count, Some(0));
    // User 2 read m1: m3 (this batch, before the command) is unread, m2 is
    // their own.
    assert_eq!(read_m1.unread_count, Some(1));
    assert_eq!(read_m1.marks.delivered_up_to, m1.message.id);

    let kinds = |events: Vec<UserEvent>| -> Vec<String> {
        events
            .into_iter()
            .map(|event| match event.kind {
                UserEventKind::Message(m) => format!("message {}", m.client_msg_id),
                UserEventKind::Receipt(r) => format!("receipt of {}", r.user_id),
                UserEventKind::ReadState(r) => format!("read state, {} unread", r.unread_count),
            })
            .collect()
    };
    assert_eq!(
        kinds(all_events(&s.store, 1).await),
        [
            "message m1",
            "message m2",
            "receipt of 3",
            "message m3",
            "receipt of 2"
        ]
    );
    assert_eq!(
        kinds(all_events(&s.store, 2).await),
        [
            "message m1",
            "message m2",
            "receipt of 3",
            "message m3",
            "read state, 1 unread"
        ]
    );
    assert_eq!(
        kinds(all_events(&s.store, 3).await),
        [
            "message m1",
            "message m2",
            "read state, 0 unread",
            "message m3"
        ]
    );
}

/// A bus that records the name of the thread each batch is published from.
#[derive(Debug, Default)]
struct ThreadBus {
    threads: parking_lot::Mutex<Vec<Option<String>>>,
}

impl LiveBus for ThreadBus {
    fn publish(&self, _events: &[Arc<LiveEvent>]) {
        let name = std::thread::current().name().map(str::to_owned);
        self.threads.lock().push(name);
    }
}

/// A writer at [`Home::OwnThread`] commits on its own thread, not on the
/// caller's runtime; a blocking store's batches (SQLite's) are published by
/// the publisher's thread, before their senders are answered. The writer
/// stops (flipping its done watch) once every handle is dropped.
#[tokio::test]
async fn a_writer_of_its_own_thread_commits_there_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let (store, log) = sqlite::open(&dir.path().join("m.db")).await.unwrap();
    let bus = Arc::new(ThreadBus::default());
    let (handle, mut done, _stats) =
        spawn(Box::new(log), Home::OwnThread, 3, 512, bus.clone()).unwrap();
    let sent = submit(&handle, command(1, 10, &[1, 2], "own-thread"))
        .await
        .unwrap();
    assert!(!sent.duplicate);
    assert_eq!(*bus.threads.lock(), [Some("confab-publish".to_owned())]);
    assert_eq!(all_events(&store, 2).await.len(), 1);
    drop(handle);
    done.wait_for(|done| *done).await.unwrap();
}

/// Runs the current-thread runtime's other tasks until `done` holds.
async fn until(mut done: impl FnMut() -> bool) {
    for _ in 0..100_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

/// The next batch's first call goes to the store before the last batch is
/// published and answered, so the store's thread has work meanwhile: when the
/// second batch asks for its commit (its one call: no key was looked up) the
/// first one's events are not published yet.
#[tokio::test]
async fn the_next_batch_reaches_the_store_before_the_last_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, log) = sqlite::open(&dir.path().join("m.db")).await.unwrap();
    let (bus, _live) = RecordingBus::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let published_at_commit = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let hook = {
        let (bus, seen) = (bus.clone(), Arc::clone(&published_at_commit));
        Hook(Arc::new(move || seen.lock().push(bus.events.lock().len())))
    };
    let log = FailingLog {
        commit_gate: Some(Arc::clone(&gate)),
        on_commit: Some(hook),
        ..FailingLog::new(log, Arc::new(AtomicBool::new(false)))
    };
    let (handle, _done, _stats) = spawn(Box::new(log), Home::Runtime, 3, 512, bus.clone()).unwrap();
    let send = |id: &'static str| {
        let handle = handle.clone();
        tokio::spawn(async move { submit(&handle, command(1, 10, &[1, 2], id)).await })
    };
    let first = send("first");
    // The first batch waits at its commit; the second is queued meanwhile.
    until(|| published_at_commit.lock().len() == 1).await;
    let second = send("second");
    until(|| handle.capacity() < handle.max_capacity()).await;
    gate.add_permits(2);
    assert!(!first.await.unwrap().unwrap().duplicate);
    assert!(!second.await.unwrap().unwrap().duplicate);
    assert_eq!(*published_at_commit.lock(), [0, 0]);
    assert_eq!(bus.events.lock().len(), 4);
}

/// An unshared store's batch writes without looking its keys up; a retry of a
/// message committed in an earlier batch is refused by the unique index, and
/// its batch runs again with the lookup, answering the original. The batches
/// after it look up for a while (a retry seldom comes alone).
#[tokio::test]
async fn keys_are_looked_up_only_after_a_retry_hits_one() {
    let dir = tempfile::tempdir().unwrap();
    let (store, log) = sqlite::open(&dir.path().join("m.db")).await.unwrap();
    let (bus, _live) = RecordingBus::new();
    let lookups = Arc::new(AtomicU64::new(0));
    let hook = {
        let lookups = Arc::clone(&lookups);
        Hook(Arc::new(move || {
            lookups.fetch_add(1, Ordering::SeqCst);
        }))
    };
    let log = FailingLog {
        on_lookup: Some(hook),
        ..FailingLog::new(log, Arc::new(AtomicBool::new(false)))
    };
    let (handle, _done, stats) = spawn(Box::new(log), Home::Runtime, 3, 512, bus.clone()).unwrap();
    let first = submit(&handle, command(1, 10, &[1, 2], "a")).await.unwrap();
    submit(&handle, command(2, 10, &[1, 2], "b")).await.unwrap();
    assert_eq!(lookups.load(Ordering::SeqCst), 0);

    let retry = submit(&handle, command(1, 10, &[1, 2], "a")).await.unwrap();
    assert!(retry.duplicate);
    assert_eq!(retry.message, first.message);
    assert_eq!(stats.redone.load(Ordering::Relaxed), 1);
    assert_eq!(lookups.load(Ordering::SeqCst), 1);
    assert_eq!(
        all_events(&store, 1).await.len(),
        2,
        "no event for the retry"
    );

    let next = submit(&handle, command(1, 10, &[1, 2], "c")).await.unwrap();
    assert!(!next.duplicate);
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
    // The sequence numbers the refused run took were handed out again.
    let seqs: Vec<u64> = all_events(&store, 1).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
}
