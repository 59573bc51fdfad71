//! The group-commit writer: one task owns the write side of the store and commits
//! every send that is waiting in one transaction, so that one fsync acknowledges
//! a whole batch (DESIGN.md section 4).
//!
//! Being the only writer also makes it the ordering point: message ids increase
//! in commit order within every conversation (section 3), and each user's event
//! sequence is assigned here, gap-free (section 5).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use confab_common::bus::{LiveBus, LiveEvent};
use confab_common::ids::Snowflake;
use confab_proto::v1::{Event, event};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::MessageError;
use crate::store::{LogWriter, StoreError, StoredMessage};

/// Sends waiting for the writer. When full, senders wait: the service never
/// buffers without bound.
const QUEUE_CAPACITY: usize = 8192;

/// Users whose last sequence number is kept; beyond it the map is cleared between
/// batches (reloading one is one indexed `MAX`).
const MAX_CACHED_SEQS: usize = 1_000_000;

/// A validated send whose sender is a member of the conversation.
#[derive(Debug)]
pub(crate) struct SendCommand {
    pub(crate) sender_id: i64,
    pub(crate) sender_device: String,
    pub(crate) conversation_id: i64,
    pub(crate) client_msg_id: String,
    pub(crate) text: String,
    /// Everyone who gets an event, the sender included.
    pub(crate) members: Arc<[i64]>,
    /// When the send path accepted the request, for the send-to-deliver metric.
    pub(crate) accepted_at: Instant,
}

/// The outcome of a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) message: StoredMessage,
    /// True when (sender, client_msg_id) was sent before: `message` is the
    /// original and nothing new was stored.
    pub(crate) duplicate: bool,
}

type Reply = oneshot::Sender<Result<Sent, MessageError>>;

/// One send on its way to the writer, with the channel its outcome goes back on.
#[derive(Debug)]
pub(crate) struct WriteRequest {
    command: SendCommand,
    reply: Reply,
}

/// Counters the tests read to see that commits really batch.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Transactions committed.
    pub(crate) commits: AtomicU64,
    /// Sends in the largest batch committed so far.
    pub(crate) max_batch: AtomicU64,
}

/// The sending half: cheap to clone, one per caller.
pub(crate) type WriterHandle = mpsc::Sender<WriteRequest>;

/// Starts the writer task on `log`. It runs until every [`WriterHandle`] is
/// dropped and the queue is drained; then it closes `log` and flips the returned
/// watch to `true`.
pub(crate) fn spawn(
    log: Box<dyn LogWriter>,
    node_id: u16,
    max_batch: usize,
    bus: Arc<dyn LiveBus>,
) -> (WriterHandle, watch::Receiver<bool>, Arc<WriterStats>) {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let (done_tx, done_rx) = watch::channel(false);
    let stats = Arc::new(WriterStats::default());
    let writer = Writer {
        log,
        ids: Snowflake::new(node_id),
        seqs: HashMap::new(),
        bus,
        max_batch: max_batch.max(1),
        stats: Arc::clone(&stats),
    };
    tokio::spawn(async move {
        writer.run(rx).await;
        let _ = done_tx.send(true);
    });
    (tx, done_rx, stats)
}

/// Hands `command` to the writer and waits until its batch is committed.
///
/// # Errors
///
/// [`MessageError::ShuttingDown`] when the writer has stopped;
/// [`MessageError::CommitFailed`] when the batch could not be committed.
pub(crate) async fn submit(
    handle: &WriterHandle,
    command: SendCommand,
) -> Result<Sent, MessageError> {
    let (reply, answer) = oneshot::channel();
    handle
        .send(WriteRequest { command, reply })
        .await
        .map_err(|_| MessageError::ShuttingDown)?;
    // A dropped reply means the writer died mid-batch: the outcome is unknown, and
    // the client's retry with the same client_msg_id settles it.
    answer.await.map_err(|_| MessageError::ShuttingDown)?
}

/// Where the message a send is answered with comes from.
#[derive(Debug, Clone, Copy)]
enum Original {
    /// Stored by an earlier batch: index into the dedup lookup's result.
    Stored(usize),
    /// New in this batch: index into the batch's new messages.
    New(usize),
}

struct Writer {
    log: Box<dyn LogWriter>,
    ids: Snowflake,
    /// Last sequence number per user, loaded with `last_seqs` on first use.
    /// Between batches it holds only committed values: a failed batch drops the
    /// users it touched.
    seqs: HashMap<i64, u64>,
    bus: Arc<dyn LiveBus>,
    max_batch: usize,
    stats: Arc<WriterStats>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        // Waits for one send, then takes whatever else is queued: while one batch
        // is being flushed the next one gathers, with no timer.
        while rx.recv_many(&mut batch, self.max_batch).await > 0 {
            self.commit_batch(std::mem::take(&mut batch)).await;
            if self.seqs.len() > MAX_CACHED_SEQS {
                self.seqs.clear();
            }
        }
        if let Err(error) = self.log.close().await {
            tracing::warn!(error = %error, "closing the message log failed");
        }
    }

    async fn commit_batch(&mut self, batch: Vec<WriteRequest>) {
        let started = Instant::now();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut touched = HashSet::new();
        let result = self
            .apply(&batch, &mut outcomes, &mut events, &mut touched)
            .await;
        if let Err(error) = result {
            self.fail_batch(batch, error, &touched).await;
            return;
        }

        let accepted = outcomes
            .iter()
            .filter(|sent: &&Sent| !sent.duplicate)
            .count();
        metrics::counter!("confab_messages_accepted_total").increment(accepted as u64);
        metrics::counter!("confab_messages_duplicate_total")
            .increment((batch.len() - accepted) as u64);
        metrics::histogram!("confab_message_commit_batch_size").record(batch.len() as f64);
        metrics::histogram!("confab_message_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .max_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);

        for (request, sent) in batch.into_iter().zip(outcomes) {
            // The caller may have given up; the message is stored all the same and
            // its retry finds it.
            let _ = request.reply.send(Ok(sent));
        }
        if !events.is_empty() {
            self.bus.publish(&events);
        }
    }

    /// Runs the whole batch in one transaction. On success `outcomes` holds one
    /// entry per request and `events` the new events in commit order.
    ///
    /// The statements do not grow with the batch: one dedup lookup, one lookup of
    /// the last seqs not in memory, one insert of the messages and one of the
    /// events (each split only at the backend's size limit). Everything else,
    /// dedup within the batch included, is decided here in memory, in request
    /// order.
    async fn apply(
        &mut self,
        batch: &[WriteRequest],
        outcomes: &mut Vec<Sent>,
        events: &mut Vec<Arc<LiveEvent>>,
        touched: &mut HashSet<i64>,
    ) -> Result<(), StoreError> {
        self.log.begin().await?;

        let keys: Vec<(i64, &str)> = batch
            .iter()
            .map(|request| {
                let command = &request.command;
                (command.sender_id, command.client_msg_id.as_str())
            })
            .collect();
        let stored = self.log.find_sent_many(&keys).await?;
        // Where the message of each (sender, client_msg_id) is: stored before, or
        // new in this batch. A key seen again (stored, or earlier in the batch)
        // is a duplicate and gets that message.
        let mut originals: HashMap<(i64, &str), Original> = stored
            .iter()
            .enumerate()
            .map(|(i, message)| {
                let key = (message.sender_id, message.client_msg_id.as_str());
                (key, Original::Stored(i))
            })
            .collect();
        let mut answers = Vec::with_capacity(batch.len());
        let mut new_commands = Vec::new();
        for (request, &key) in batch.iter().zip(&keys) {
            match originals.entry(key) {
                Entry::Occupied(original) => answers.push((*original.get(), true)),
                Entry::Vacant(slot) => {
                    let original = Original::New(new_commands.len());
                    slot.insert(original);
                    answers.push((original, false));
                    new_commands.push(&request.command);
                }
            }
        }

        let unknown: HashSet<i64> = new_commands
            .iter()
            .flat_map(|command| command.members.iter().copied())
            .filter(|user_id| !self.seqs.contains_key(user_id))
            .collect();
        if !unknown.is_empty() {
            let unknown: Vec<i64> = unknown.into_iter().collect();
            let last = self.log.last_seqs(&unknown).await?;
            // Committed values (the transaction has written nothing yet), so they
            // may stay in the map whatever happens to this batch.
            for user_id in unknown {
                self.seqs
                    .insert(user_id, last.get(&user_id).copied().unwrap_or(0));
            }
        }

        let sent_at_ms = confab_common::now_ms();
        let mut messages = Vec::with_capacity(new_commands.len());
        let mut rows =
            Vec::with_capacity(new_commands.iter().map(|c| c.members.len()).sum::<usize>());
        for command in new_commands {
            // In request order: ids increase in commit order in every
            // conversation, and each user's seqs follow the same order.
            let message = StoredMessage {
                id: self.ids.next_id(),
                conversation_id: command.conversation_id,
                sender_id: command.sender_id,
                sender_device: command.sender_device.clone(),
                client_msg_id: command.client_msg_id.clone(),
                sent_at_ms,
                text: command.text.clone(),
            };
            for &user_id in command.members.iter() {
                let seq = self.next_seq(user_id, touched);
                rows.push((user_id, seq, message.id));
                let origin_device =
                    (user_id == command.sender_id).then(|| command.sender_device.clone());
                events.push(Arc::new(LiveEvent {
                    user_id,
                    event: Event {
                        seq,
                        kind: Some(event::Kind::Message((&message).into())),
                    },
                    origin_device,
                    accepted_at: command.accepted_at,
                }));
            }
            messages.push(message);
        }
        if !messages.is_empty() {
            self.log.insert_messages(&messages).await?;
            self.log.insert_events(&rows).await?;
        }

        outcomes.extend(answers.into_iter().map(|(original, duplicate)| {
            let message = match original {
                Original::Stored(i) => stored[i].clone(),
                Original::New(i) => messages[i].clone(),
            };
            Sent { message, duplicate }
        }));
        // The acknowledgements wait for this: with synchronous = FULL the batch is
        // on disk when it returns.
        self.log.commit().await
    }

    /// Returns the next sequence number of `user_id` and records it as used. The
    /// user's last number must be in `seqs` already (`apply` loads the missing
    /// ones first).
    fn next_seq(&mut self, user_id: i64, touched: &mut HashSet<i64>) -> u64 {
        let last = self.seqs.get(&user_id).copied();
        debug_assert!(last.is_some(), "last seq of user {user_id} not loaded");
        // Were the invariant ever broken, the event's primary key (user_id, seq)
        // refuses the reused number and the batch fails and reloads: no gap, no
        // double.
        let next = last.unwrap_or(0) + 1;
        self.seqs.insert(user_id, next);
        touched.insert(user_id);
        next
    }

    async fn fail_batch(
        &mut self,
        batch: Vec<WriteRequest>,
        error: StoreError,
        touched: &HashSet<i64>,
    ) {
        if let Err(rollback_error) = self.log.rollback().await {
            tracing::error!(error = %rollback_error, "rollback of the message batch failed");
        }
        // The numbers handed out in the failed transaction were never stored: the
        // next batch reloads these users from the database.
        for user_id in touched {
            self.seqs.remove(user_id);
        }
        tracing::error!(error = %error, source = ?std::error::Error::source(&error), batch = batch.len(), "commit of a message batch failed");
        let error = Arc::new(error);
        for request in batch {
            let _ = request
                .reply
                .send(Err(MessageError::CommitFailed(Arc::clone(&error))));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::store::sqlite::{self, SqliteLogWriter, SqliteStore};
    use crate::store::{BoxFuture, MessageStore as _, UserEvent};
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
            Some(fail) => Box::new(FailingLog { inner: log, fail }),
            None => Box::new(log),
        };
        let (bus, live) = RecordingBus::new();
        let (handle, done, stats) = spawn(log, 3, 512, bus.clone());
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
            members: members.into(),
            accepted_at: Instant::now(),
        }
    }

    async fn all_events(store: &SqliteStore, user_id: i64) -> Vec<UserEvent> {
        store.sync(user_id, 0, 10_000).await.unwrap().events.items
    }

    /// Fails the next commit when `fail` is set, like a full disk would.
    #[derive(Debug)]
    struct FailingLog {
        inner: SqliteLogWriter,
        fail: Arc<AtomicBool>,
    }

    impl LogWriter for FailingLog {
        fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
            self.inner.begin()
        }
        fn find_sent_many<'a>(
            &'a mut self,
            keys: &'a [(i64, &'a str)],
        ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>> {
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
            events: &'a [(i64, u64, i64)],
        ) -> BoxFuture<'a, Result<(), StoreError>> {
            self.inner.insert_events(events)
        }
        fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>> {
            if self.fail.swap(false, Ordering::SeqCst) {
                return Box::pin(async {
                    Err(sqlx::Error::Protocol("injected commit failure".into()).into())
                });
            }
            self.inner.commit()
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
            let mut ids: Vec<i64> = events.iter().map(|e| e.message.id).collect();
            for conversation in [10, 20] {
                let in_conversation: Vec<i64> = events
                    .iter()
                    .filter(|e| e.message.conversation_id == conversation)
                    .map(|e| e.message.id)
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
            let last = last_seq.entry(event.user_id).or_default();
            assert_eq!(
                event.event.seq,
                *last + 1,
                "user {} out of order",
                event.user_id
            );
            *last = event.event.seq;
            let stored = s
                .store
                .sync(event.user_id, event.event.seq - 1, 1)
                .await
                .unwrap();
            let Some(event::Kind::Message(message)) = &event.event.kind else {
                panic!("not a message event");
            };
            assert_eq!(stored.events.items[0].message.id, message.id);
            let own = event.user_id == message.sender_id;
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
            let stored: Vec<(u64, i64)> = events.iter().map(|e| (e.seq, e.message.id)).collect();
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
            let ids: Vec<i64> = events.iter().map(|e| e.message.id).collect();
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
                .map(|e| (e.seq, e.message.id))
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
}
