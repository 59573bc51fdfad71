//! The group-commit writer: one task owns the write side of the store and commits
//! every command that is waiting in one transaction, so that one fsync
//! acknowledges a whole batch (DESIGN.md section 4).
//!
//! Being the only writer also makes it the ordering point: message ids increase
//! in commit order within every conversation (section 3), and each user's event
//! sequence is assigned here, gap-free (section 5). It is also the authority on
//! who receives what: it keeps a membership snapshot per conversation, changed
//! only in commit order by notices (`AppendNotice`), so that a member who left
//! gets nothing committed after the notice of their leaving, and cannot send
//! after it (section 13, invariant 5). Receipts are commands here too, so that
//! watermarks, the messages they cover and the events they cause are ordered with
//! the sends (section 6).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use confab_common::bus::{Audience, LiveBus, LiveEvent};
use confab_common::ids::Snowflake;
use confab_proto::v1::{Event, Notice, ReadState, Receipt, event};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::MessageError;
use crate::members::Snapshot;
use crate::store::{
    EventPayload, EventRow, LogWriter, ReceiptQuery, StoreError, StoredMessage, UNREAD_CAP,
    Watermarks,
};

/// Commands waiting for the writer. When full, senders wait: the service never
/// buffers without bound.
const QUEUE_CAPACITY: usize = 8192;

/// Users whose last sequence number is kept; beyond it the map is cleared between
/// batches (reloading one is one indexed `MAX`).
const MAX_CACHED_SEQS: usize = 1_000_000;

/// Batches that look their dedup keys up before writing, after a batch found
/// or hit a key stored before: retries come in bursts (a client reconnecting
/// resends what it has not seen acknowledged), and each hit costs a redo.
const LOOKUP_AFTER_DUPLICATE: u32 = 64;

/// Conversations whose snapshot is kept; beyond it the map is cleared between
/// batches and refilled from the send path's hints.
const MAX_CACHED_SNAPSHOTS: usize = 100_000;

/// A validated send whose sender the send path found to be a member.
#[derive(Debug)]
pub(crate) struct SendCommand {
    pub(crate) sender_id: i64,
    pub(crate) sender_device: String,
    pub(crate) conversation_id: i64,
    pub(crate) client_msg_id: String,
    pub(crate) text: String,
    /// The send path's snapshot of the conversation: installed when the writer
    /// has none or an older one.
    pub(crate) hint: Arc<Snapshot>,
    /// When the send path accepted the request, for the send-to-deliver metric.
    pub(crate) accepted_at: Instant,
}

/// A committed change of membership or metadata, to be written in order with
/// the messages.
#[derive(Debug)]
pub(crate) struct NoticeCommand {
    pub(crate) conversation_id: i64,
    /// The conversation after the change.
    pub(crate) snapshot: Arc<Snapshot>,
    /// What to write into the conversation; `None` writes no message.
    pub(crate) notice: Option<Notice>,
    /// Users who are no longer members since the change: they get the notice,
    /// and a leave point.
    pub(crate) removed: Vec<i64>,
    /// Users who are members again (`MembersAdded`): their leave points go.
    pub(crate) added: Vec<i64>,
}

/// A member's delivered and read watermarks, to be moved forward.
#[derive(Debug)]
pub(crate) struct ReceiptCommand {
    pub(crate) user_id: i64,
    pub(crate) conversation_id: i64,
    /// 0 leaves the watermark as it is.
    pub(crate) delivered_up_to: i64,
    /// 0 leaves the watermark as it is.
    pub(crate) read_up_to: i64,
    /// As [`SendCommand::hint`].
    pub(crate) hint: Arc<Snapshot>,
}

/// What the writer is asked to do.
#[derive(Debug)]
pub(crate) enum Command {
    Send(SendCommand),
    Notice(NoticeCommand),
    Receipts(ReceiptCommand),
}

/// The outcome of a send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sent {
    pub(crate) message: StoredMessage,
    /// True when (sender, client_msg_id) was sent before: `message` is the
    /// original and nothing new was stored.
    pub(crate) duplicate: bool,
}

/// The outcome of a receipt command: the watermarks after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReceiptsMoved {
    pub(crate) marks: Watermarks,
    /// Messages after the read watermark sent by others, at most
    /// [`UNREAD_CAP`], when the command asked to move the read watermark (a
    /// delivery changes nothing of what is unread, and counting costs up to
    /// the cap).
    pub(crate) unread_count: Option<u32>,
}

/// The outcome of any command.
#[derive(Debug)]
pub(crate) enum Outcome {
    Sent(Sent),
    /// The notice message, `None` when nothing was written (channels).
    Notice(Option<Sent>),
    Receipts(ReceiptsMoved),
}

type Reply = oneshot::Sender<Result<Outcome, MessageError>>;

/// One command on its way to the writer, with the channel its outcome goes back
/// on.
#[derive(Debug)]
pub(crate) struct WriteRequest {
    command: Command,
    reply: Reply,
}

/// Counters the tests read to see that commits really batch.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    /// Transactions committed.
    pub(crate) commits: AtomicU64,
    /// Commands in the largest batch committed so far.
    pub(crate) max_batch: AtomicU64,
    /// Batches run again with their keys looked up, after the unique index
    /// refused one of their keys.
    pub(crate) redone: AtomicU64,
}

/// The sending half: cheap to clone, one per caller.
pub(crate) type WriterHandle = mpsc::Sender<WriteRequest>;

/// Where the writer task runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Home {
    /// On the runtime that spawns it, beside every other task.
    Runtime,
    /// On a thread of its own (`confab-writer`) with a single-threaded
    /// runtime: for a store whose calls block (SQLite's, which runs its
    /// statements on the caller's thread) or complete on a thread outside the
    /// runtime.
    ///
    /// The writer is the one serial stage of the send path. When the SQLite
    /// store still ran on sqlx's thread, each batch waited on it twice (the
    /// dedup read, the commit), and an answer from that thread woke the
    /// writer from outside the runtime, through the shared queue that busy
    /// workers look at only every 61 tasks of their own, so under load each
    /// batch waited that long twice. One-to-one at
    /// 22,000 msg/s offered (200 pairs, two alternating runs each): 19,869 /
    /// 20,176 delivered a second on the workers, 21,308 / 21,925 on its own
    /// thread; p99 847 / 688 ms → 272 / 105 ms. The workers looking at the
    /// shared queue every 7 tasks instead changed nothing measurable.
    OwnThread,
}

/// Starts the writer task on `log`, at `home`. It runs until every
/// [`WriterHandle`] is dropped and the queue is drained; then it closes `log`
/// and flips the returned watch to `true`.
///
/// # Errors
///
/// [`StoreError::Start`] when the writer's own thread, its runtime or its
/// publisher's thread cannot be started.
pub(crate) fn spawn(
    log: Box<dyn LogWriter>,
    home: Home,
    node_id: u16,
    max_batch: usize,
    bus: Arc<dyn LiveBus>,
) -> Result<(WriterHandle, watch::Receiver<bool>, Arc<WriterStats>), StoreError> {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let (done_tx, done_rx) = watch::channel(false);
    let stats = Arc::new(WriterStats::default());
    let publisher = if log.blocking() {
        Some(Publisher::start(Arc::clone(&bus)).map_err(StoreError::Start)?)
    } else {
        None
    };
    let writer = Writer {
        log,
        ids: Snowflake::new(node_id),
        seqs: HashMap::new(),
        snapshots: HashMap::new(),
        bus,
        max_batch: max_batch.max(1),
        stats: Arc::clone(&stats),
        lookups_left: 0,
        publisher,
    };
    let run = async move {
        writer.run(rx).await;
        let _ = done_tx.send(true);
    };
    if home == Home::OwnThread {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::Start)?;
        std::thread::Builder::new()
            .name("confab-writer".to_owned())
            .spawn(move || runtime.block_on(run))
            .map_err(StoreError::Start)?;
    } else {
        tokio::spawn(run);
    }
    Ok((tx, done_rx, stats))
}

/// Hands `command` to the writer and waits until its batch is committed.
///
/// # Errors
///
/// [`MessageError::ShuttingDown`] when the writer has stopped;
/// [`MessageError::CommitFailed`] when the batch could not be committed; the
/// command's own refusal (a non-member: [`MessageError::ConversationNotFound`]).
async fn request(handle: &WriterHandle, command: Command) -> Result<Outcome, MessageError> {
    enqueue(handle, command).await?.await_outcome().await
}

/// The outcome of a queued command, once its batch is committed.
#[derive(Debug)]
pub(crate) struct Queued(oneshot::Receiver<Result<Outcome, MessageError>>);

impl Queued {
    /// Waits until the command's batch is committed (or failed).
    ///
    /// # Errors
    ///
    /// As [`request`].
    pub(crate) async fn await_outcome(self) -> Result<Outcome, MessageError> {
        // A dropped reply means the writer died mid-batch: the outcome is unknown,
        // and the client's retry with the same client_msg_id settles it.
        self.0.await.map_err(|_| MessageError::ShuttingDown)?
    }
}

/// Queues `command` for the writer and returns at once with a handle on its
/// outcome: commands queued one after the other by one task are committed in
/// that order (the distributed mode's log consumer relies on it).
///
/// # Errors
///
/// [`MessageError::ShuttingDown`] when the writer has stopped.
pub(crate) async fn enqueue(
    handle: &WriterHandle,
    command: Command,
) -> Result<Queued, MessageError> {
    let (reply, answer) = oneshot::channel();
    handle
        .send(WriteRequest { command, reply })
        .await
        .map_err(|_| MessageError::ShuttingDown)?;
    Ok(Queued(answer))
}

/// Sends a message and waits until it is durable (or found to be a retry).
///
/// # Errors
///
/// As [`request`].
pub(crate) async fn submit(
    handle: &WriterHandle,
    command: SendCommand,
) -> Result<Sent, MessageError> {
    match request(handle, Command::Send(command)).await? {
        Outcome::Sent(sent) => Ok(sent),
        other => unreachable!("send answered with {other:?}"),
    }
}

/// Writes a membership change and waits until it is durable.
///
/// # Errors
///
/// As [`request`].
pub(crate) async fn submit_notice(
    handle: &WriterHandle,
    command: NoticeCommand,
) -> Result<Option<Sent>, MessageError> {
    match request(handle, Command::Notice(command)).await? {
        Outcome::Notice(sent) => Ok(sent),
        other => unreachable!("notice answered with {other:?}"),
    }
}

/// Moves watermarks and waits until they are durable.
///
/// # Errors
///
/// As [`request`].
pub(crate) async fn submit_receipts(
    handle: &WriterHandle,
    command: ReceiptCommand,
) -> Result<ReceiptsMoved, MessageError> {
    match request(handle, Command::Receipts(command)).await? {
        Outcome::Receipts(moved) => Ok(moved),
        other => unreachable!("receipts answered with {other:?}"),
    }
}

/// Returns the client_msg_id of the notice of a conversation at `version`: a
/// retried AppendNotice finds the original. The conversation id is part of it
/// because versions count per conversation and one actor changes many.
pub(crate) fn notice_key(conversation_id: i64, version: i64) -> String {
    format!("notice:{conversation_id}:{version}")
}

/// Where the message a command is answered with comes from.
#[derive(Debug, Clone, Copy)]
enum Original {
    /// Stored by an earlier batch: index into the dedup lookup's result.
    Stored(usize),
    /// New in this batch: index into the batch's new messages.
    New(usize),
}

/// How one command will be answered once the batch commits.
#[derive(Debug)]
enum Answer {
    Sent(Original, bool),
    Notice(Option<(Original, bool)>),
    Receipts(ReceiptsMoved),
    Refused(MessageError),
}

/// An event decided in the first pass, numbered in the second.
#[derive(Debug)]
struct Pending {
    audience: Audience,
    payload: PendingPayload,
    origin_device: Option<String>,
    accepted_at: Instant,
}

#[derive(Debug)]
enum PendingPayload {
    /// Index into the batch's new messages.
    Message(usize),
    ChannelPost(usize),
    Receipt(Receipt),
    ReadState(ReadState),
}

/// A change to the leave points, applied in command order.
#[derive(Debug)]
enum LeaveChange {
    Record {
        conversation_id: i64,
        leaves: Vec<(i64, i64)>,
        drop_receipts: bool,
    },
    Clear {
        conversation_id: i64,
        user_ids: Vec<i64>,
    },
}

/// What one batch has decided so far, in commit order.
#[derive(Debug)]
struct BatchState<'k> {
    /// Where the message of each dedup key is: stored before, or new in this
    /// batch.
    originals: HashMap<(i64, &'k str), Original>,
    /// New messages, in id order.
    messages: Vec<StoredMessage>,
    /// New events, in commit order.
    pending: Vec<Pending>,
    leaves: Vec<LeaveChange>,
    /// Watermarks of the receipt commands' (conversation, user), as loaded and
    /// then moved.
    marks: HashMap<(i64, i64), Watermarks>,
    /// The keys of `marks` that moved.
    moved: HashSet<(i64, i64)>,
    /// Newest message id of the receipt commands' conversations, this batch's
    /// messages included.
    newest: HashMap<i64, i64>,
    answers: Vec<Answer>,
    /// The receipt commands' reads of stored messages, answered for the whole
    /// batch in one call once every command is applied ([`Writer::complete_receipts`]).
    reads: Vec<ReceiptRead>,
    accepted_at: Instant,
}

/// A receipt command's read of the stored messages, and what waits for it.
#[derive(Debug)]
struct ReceiptRead {
    query: ReceiptQuery,
    /// Where in `pending` the receipt events for the senders go: where the
    /// command would have put them.
    events_at: usize,
    /// The receipt those events carry.
    receipt: Receipt,
    /// The senders among this batch's messages, known when the command was
    /// applied.
    senders: Vec<i64>,
    /// The read state event in `pending` whose unread count gets the stored
    /// messages' added.
    read_state_at: Option<usize>,
    /// The answer in `answers` that does.
    answer_at: usize,
}

impl BatchState<'_> {
    /// Returns the messages of this batch in `conversation_id` with
    /// `after < id <= up_to`, sent by others than `except`, not notices.
    fn new_by_others(
        &self,
        conversation_id: i64,
        after: i64,
        up_to: i64,
        except: i64,
    ) -> impl Iterator<Item = &StoredMessage> {
        self.messages.iter().filter(move |m| {
            m.conversation_id == conversation_id
                && m.id > after
                && m.id <= up_to
                && m.sender_id != except
                && m.notice.is_none()
        })
    }
}

/// A committed batch: what is left to do is to publish its events and answer
/// its senders.
struct Committed {
    batch: Vec<WriteRequest>,
    outcomes: Vec<Result<Outcome, MessageError>>,
    events: Vec<Arc<LiveEvent>>,
}

impl Committed {
    /// Publishes the events, then answers the senders: a caller holding its
    /// answer knows its events are on the live bus, wherever the writer runs.
    fn finish(self, bus: &dyn LiveBus) {
        if !self.events.is_empty() {
            bus.publish(&self.events);
        }
        for (request, outcome) in self.batch.into_iter().zip(self.outcomes) {
            // The caller may have given up; the message is stored all the same and
            // its retry finds it.
            let _ = request.reply.send(outcome);
        }
    }
}

/// Publishes and answers committed batches in commit order, on a thread of
/// its own (`confab-publish`), for a [blocking](LogWriter::blocking) store:
/// its calls keep the writer's thread busy, so that the answers would
/// otherwise wait for the next batch, or the next batch for them.
///
/// One-to-one at 14,000 msg/s offered (200 pairs, alternating runs), with the
/// SQLite writer's statements on the writer's thread: answering each batch
/// before the next one began gave p50 9.9 / 8.2 ms, against 4.2 / 4.6 with
/// SQLite on sqlx's thread and the answers beside it.
#[derive(Debug)]
struct Publisher {
    batches: std::sync::mpsc::Sender<Committed>,
    thread: std::thread::JoinHandle<()>,
    bus: Arc<dyn LiveBus>,
}

impl Publisher {
    fn start(bus: Arc<dyn LiveBus>) -> std::io::Result<Self> {
        let (batches, committed) = std::sync::mpsc::channel::<Committed>();
        let on_thread = Arc::clone(&bus);
        let thread = std::thread::Builder::new()
            .name("confab-publish".to_owned())
            .spawn(move || {
                for done in committed {
                    done.finish(&*on_thread);
                }
            })?;
        Ok(Self {
            batches,
            thread,
            bus,
        })
    }

    /// Hands `done` to the thread; finishes it here if the thread is gone.
    fn finish(&self, done: Committed) {
        if let Err(std::sync::mpsc::SendError(done)) = self.batches.send(done) {
            done.finish(&*self.bus);
        }
    }

    /// Waits until every batch handed over is finished.
    fn stop(self) {
        drop(self.batches);
        if self.thread.join().is_err() {
            tracing::error!("the message publisher's thread panicked");
        }
    }
}

struct Writer {
    log: Box<dyn LogWriter>,
    ids: Snowflake,
    /// Last sequence number per user, loaded with `last_seqs` on first use.
    /// Between batches it holds only committed values: a failed batch drops the
    /// users it touched.
    seqs: HashMap<i64, u64>,
    /// The membership of each conversation as of the last committed command:
    /// who gets a send's events, and who may send. Changed by notices in
    /// commit order, and filled from the send path's hints on a miss. A failed
    /// batch keeps what it installed: snapshots mirror group-svc, where the
    /// change is committed already.
    snapshots: HashMap<i64, Arc<Snapshot>>,
    bus: Arc<dyn LiveBus>,
    max_batch: usize,
    stats: Arc<WriterStats>,
    /// Batches left that look their dedup keys up before writing
    /// ([`LOOKUP_AFTER_DUPLICATE`]); otherwise an unshared store's batch
    /// writes without looking, and the unique index catches a key stored
    /// before.
    lookups_left: u32,
    /// Set for a [blocking](LogWriter::blocking) store.
    publisher: Option<Publisher>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<WriteRequest>) {
        if let Some(publisher) = self.publisher.take() {
            return self.run_beside(rx, publisher).await;
        }
        let mut batch = Vec::with_capacity(self.max_batch);
        // The last batch committed, its events not yet published nor its
        // senders answered.
        let mut committed: Option<Committed> = None;
        let bus = Arc::clone(&self.bus);
        // Waits for one command, then takes whatever else is queued: while one
        // batch is being flushed the next one gathers, with no timer.
        loop {
            if rx.is_empty()
                && let Some(done) = committed.take()
            {
                done.finish(&*bus);
            }
            if rx.recv_many(&mut batch, self.max_batch).await == 0 {
                break;
            }
            let next = std::mem::take(&mut batch);
            committed = match committed.take() {
                // The next batch's first call goes to the store first; the
                // last batch is published and answered while it runs (the
                // store's thread would otherwise wait for that).
                Some(done) => {
                    let (next, ()) =
                        tokio::join!(self.commit_batch(next), async { done.finish(&*bus) });
                    next
                }
                None => self.commit_batch(next).await,
            };
            self.trim_caches();
        }
        if let Some(done) = committed {
            done.finish(&*bus);
        }
        self.close().await;
    }

    /// The loop of [`Self::run`] for a [blocking](LogWriter::blocking) store,
    /// whose calls keep this thread busy until they are done: the batches it
    /// commits are published and answered by `publisher`, beside the next
    /// batch.
    async fn run_beside(mut self, mut rx: mpsc::Receiver<WriteRequest>, publisher: Publisher) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while rx.recv_many(&mut batch, self.max_batch).await > 0 {
            let next = std::mem::take(&mut batch);
            if let Some(done) = self.commit_batch(next).await {
                publisher.finish(done);
            }
            self.trim_caches();
        }
        publisher.stop();
        self.close().await;
    }

    /// Forgets the cached sequence numbers and snapshots when there are too
    /// many; they are loaded again as they are used.
    fn trim_caches(&mut self) {
        if self.seqs.len() > MAX_CACHED_SEQS {
            self.seqs.clear();
        }
        if self.snapshots.len() > MAX_CACHED_SNAPSHOTS {
            self.snapshots.clear();
        }
    }

    async fn close(self) {
        if let Err(error) = self.log.close().await {
            tracing::warn!(error = %error, "closing the message log failed");
        }
    }

    /// Commits `batch` and returns it with its outcomes and events, to be
    /// [finished](Committed::finish); `None` when the commit failed (its
    /// senders are answered with the error).
    async fn commit_batch(&mut self, batch: Vec<WriteRequest>) -> Option<Committed> {
        let started = Instant::now();
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut touched = HashSet::new();
        // A shared store's batches always look up: it locks heads first anyway.
        let lookup = self.log.shared() || self.lookups_left > 0;
        self.lookups_left = self.lookups_left.saturating_sub(1);
        let mut result = self
            .apply(&batch, lookup, &mut outcomes, &mut events, &mut touched)
            .await;
        if !lookup && result.as_ref().is_err_and(StoreError::is_unique_violation) {
            // A key of the batch was stored before (a retry of a message
            // committed in an earlier batch): nothing of it was kept. Run it
            // again, looking the keys up, with the sequence numbers it took
            // reloaded as after any failed batch.
            self.abandon(&touched).await;
            outcomes.clear();
            events.clear();
            touched.clear();
            self.lookups_left = LOOKUP_AFTER_DUPLICATE;
            self.stats.redone.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("confab_message_batches_redone_total").increment(1);
            result = self
                .apply(&batch, true, &mut outcomes, &mut events, &mut touched)
                .await;
        }
        if let Err(error) = result {
            self.fail_batch(batch, error, &touched).await;
            return None;
        }

        let (mut accepted, mut duplicates) = (0_u64, 0_u64);
        for outcome in &outcomes {
            match outcome {
                Ok(Outcome::Sent(sent)) if sent.duplicate => duplicates += 1,
                Ok(Outcome::Sent(_)) => accepted += 1,
                _ => {}
            }
        }
        metrics::counter!("confab_messages_accepted_total").increment(accepted);
        metrics::counter!("confab_messages_duplicate_total").increment(duplicates);
        // Rows written into users' event sequences: the cost of fan-out on write
        // (channel posts add none).
        let sequenced = events
            .iter()
            .filter(|event| matches!(event.audience, Audience::User(_)))
            .count();
        metrics::counter!("confab_message_events_total").increment(sequenced as u64);
        metrics::histogram!("confab_message_commit_batch_size").record(batch.len() as f64);
        metrics::histogram!("confab_message_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        self.stats
            .max_batch
            .fetch_max(batch.len() as u64, Ordering::Relaxed);

        Some(Committed {
            batch,
            outcomes,
            events,
        })
    }

    /// Runs the whole batch in one transaction. On success `outcomes` holds one
    /// entry per request and `events` the new events in commit order.
    ///
    /// With `lookup` the batch's dedup keys are looked up first; without, a
    /// key stored before makes the unique index refuse the insert (the caller
    /// runs the batch again with `lookup`).
    ///
    /// The statements do not grow with the batch: one dedup lookup, one lookup
    /// each of the watermarks and newest ids the receipt commands need, one of
    /// what they need of the stored messages (the senders each covers, the
    /// unread counts), one of the last seqs not in memory, one insert each of
    /// the messages, the events and the watermarks (each split only at the
    /// backend's size limit). Everything else, dedup within the batch included,
    /// is decided here in memory, in request order. The exception is rare: a
    /// notice that removes or re-adds members writes their leave points.
    async fn apply(
        &mut self,
        batch: &[WriteRequest],
        lookup: bool,
        outcomes: &mut Vec<Result<Outcome, MessageError>>,
        events: &mut Vec<Arc<LiveEvent>>,
        touched: &mut HashSet<i64>,
    ) -> Result<(), StoreError> {
        self.log.begin().await?;
        if self.log.shared() {
            self.lock_heads(batch).await?;
        }

        // The dedup key of every command that may write a message.
        let notice_keys: Vec<Option<String>> = batch
            .iter()
            .map(|request| match &request.command {
                Command::Notice(notice) if !notice.snapshot.is_channel() => notice
                    .notice
                    .as_ref()
                    .map(|_| notice_key(notice.conversation_id, notice.snapshot.version)),
                _ => None,
            })
            .collect();
        let keys: Vec<Option<(i64, &str)>> = batch
            .iter()
            .zip(&notice_keys)
            .map(
                |(request, notice_key)| match (&request.command, notice_key) {
                    (Command::Send(send), _) => Some((send.sender_id, send.client_msg_id.as_str())),
                    (Command::Notice(notice), Some(key)) => {
                        let actor = notice.notice.as_ref().map_or(0, |n| n.actor_id);
                        Some((actor, key.as_str()))
                    }
                    _ => None,
                },
            )
            .collect();
        let keys_to_find: Vec<(i64, &str)> = keys.iter().flatten().copied().collect();
        let stored = if keys_to_find.is_empty() || !lookup {
            Vec::new()
        } else {
            self.log.find_sent_many(&keys_to_find).await?
        };
        if !stored.is_empty() {
            self.lookups_left = LOOKUP_AFTER_DUPLICATE;
        }

        let mut receipt_keys = Vec::new();
        let mut receipt_conversations = Vec::new();
        for request in batch {
            if let Command::Receipts(receipt) = &request.command {
                receipt_keys.push((receipt.conversation_id, receipt.user_id));
                receipt_conversations.push(receipt.conversation_id);
            }
        }
        receipt_conversations.sort_unstable();
        receipt_conversations.dedup();
        let (marks, newest) = if receipt_keys.is_empty() {
            (HashMap::new(), HashMap::new())
        } else {
            (
                self.log.load_watermarks(&receipt_keys).await?,
                self.log.newest_ids(&receipt_conversations).await?,
            )
        };

        let mut state = BatchState {
            originals: stored
                .iter()
                .enumerate()
                .map(|(i, m)| ((m.sender_id, m.client_msg_id.as_str()), Original::Stored(i)))
                .collect(),
            messages: Vec::new(),
            pending: Vec::new(),
            leaves: Vec::new(),
            marks,
            moved: HashSet::new(),
            newest,
            answers: Vec::with_capacity(batch.len()),
            reads: Vec::new(),
            accepted_at: Instant::now(),
        };
        let sent_at_ms = confab_common::now_ms();
        for (request, key) in batch.iter().zip(&keys) {
            // In request order: ids increase in commit order in every
            // conversation, and each user's events follow the same order.
            let answer = match &request.command {
                Command::Send(send) => self.apply_send(&mut state, send, key, sent_at_ms),
                Command::Notice(notice) => self.apply_notice(&mut state, notice, key, sent_at_ms),
                Command::Receipts(receipt) => self.apply_receipts(&mut state, receipt),
            };
            state.answers.push(answer);
        }
        self.complete_receipts(&mut state).await?;

        let rows = self.number_events(&state, events, touched).await?;
        if !state.messages.is_empty() {
            self.log.insert_messages(&state.messages).await?;
        }
        if !rows.is_empty() {
            self.log.insert_events(&rows).await?;
        }
        if !state.moved.is_empty() {
            let moved: Vec<(i64, i64, Watermarks)> = state
                .moved
                .iter()
                .map(|&(conversation_id, user_id)| {
                    (
                        conversation_id,
                        user_id,
                        state.marks[&(conversation_id, user_id)],
                    )
                })
                .collect();
            self.log.save_watermarks(&moved).await?;
        }
        for change in &state.leaves {
            match change {
                LeaveChange::Record {
                    conversation_id,
                    leaves,
                    drop_receipts,
                } => {
                    self.log
                        .record_leaves(*conversation_id, leaves, *drop_receipts)
                        .await?;
                }
                LeaveChange::Clear {
                    conversation_id,
                    user_ids,
                } => self.log.clear_leaves(*conversation_id, user_ids).await?,
            }
        }

        let answers = std::mem::take(&mut state.answers);
        let message = |original: Original| match original {
            Original::Stored(i) => stored[i].clone(),
            Original::New(i) => state.messages[i].clone(),
        };
        outcomes.extend(answers.into_iter().map(|answer| match answer {
            Answer::Sent(original, duplicate) => Ok(Outcome::Sent(Sent {
                message: message(original),
                duplicate,
            })),
            Answer::Notice(written) => {
                Ok(Outcome::Notice(written.map(|(original, duplicate)| Sent {
                    message: message(original),
                    duplicate,
                })))
            }
            Answer::Receipts(moved) => Ok(Outcome::Receipts(moved)),
            Answer::Refused(error) => Err(error),
        }));
        // The acknowledgements wait for this: with synchronous = FULL the batch is
        // on disk when it returns.
        self.log.commit().await
    }

    /// In a [`shared`](LogWriter::shared) store, locks the heads of every user
    /// the batch may give an event (the members of its conversations, those a
    /// notice removes) and loads their sequence numbers, before any id is
    /// taken. Other processes number events of the same users, so what this one
    /// remembers may be stale; and two owners of one partition for a moment (a
    /// lease handover) must not interleave: one that waited for the locks takes
    /// its ids after the other's commit, so ids keep the commit order of every
    /// conversation.
    async fn lock_heads(&mut self, batch: &[WriteRequest]) -> Result<(), StoreError> {
        self.seqs.clear();
        let mut users = Vec::new();
        for request in batch {
            match &request.command {
                // Whichever of the two the command will see, unless a notice
                // of the batch comes first, whose members are added too. Not
                // installed here: that happens in command order.
                Command::Send(SendCommand {
                    conversation_id,
                    hint,
                    ..
                })
                | Command::Receipts(ReceiptCommand {
                    conversation_id,
                    hint,
                    ..
                }) => {
                    users.extend(hint.members.iter().copied());
                    if let Some(current) = self.snapshots.get(conversation_id) {
                        users.extend(current.members.iter().copied());
                    }
                }
                Command::Notice(notice) => {
                    users.extend(
                        notice
                            .snapshot
                            .members
                            .iter()
                            .chain(&notice.removed)
                            .copied(),
                    );
                }
            }
        }
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return Ok(());
        }
        let last = self.log.last_seqs(&users).await?;
        for user_id in users {
            self.seqs
                .insert(user_id, last.get(&user_id).copied().unwrap_or(0));
        }
        Ok(())
    }

    /// Returns the writer's snapshot of a conversation, installing `hint` first
    /// when the writer has none or an older one.
    fn resolve(&mut self, conversation_id: i64, hint: &Arc<Snapshot>) -> Arc<Snapshot> {
        match self.snapshots.entry(conversation_id) {
            Entry::Occupied(mut current) => {
                if hint.version > current.get().version {
                    current.insert(Arc::clone(hint));
                }
                Arc::clone(current.get())
            }
            Entry::Vacant(slot) => Arc::clone(slot.insert(Arc::clone(hint))),
        }
    }

    fn apply_send<'k>(
        &mut self,
        state: &mut BatchState<'k>,
        send: &SendCommand,
        key: &Option<(i64, &'k str)>,
        sent_at_ms: i64,
    ) -> Answer {
        let Some(key) = *key else {
            unreachable!("every send has a dedup key");
        };
        // A retry gets its original even if the sender has left since: it tells
        // them nothing they did not know.
        if let Some(&original) = state.originals.get(&key) {
            return Answer::Sent(original, true);
        }
        let snapshot = self.resolve(send.conversation_id, &send.hint);
        // Channels have no member list; the send path checked the poster's role.
        if !snapshot.is_channel() && !snapshot.has_member(send.sender_id) {
            return Answer::Refused(MessageError::ConversationNotFound);
        }
        let index = state.messages.len();
        let message = StoredMessage {
            id: self.ids.next_id(),
            conversation_id: send.conversation_id,
            sender_id: send.sender_id,
            sender_device: send.sender_device.clone(),
            client_msg_id: send.client_msg_id.clone(),
            sent_at_ms,
            text: send.text.clone(),
            notice: None,
        };
        state.newest.insert(message.conversation_id, message.id);
        state.messages.push(message);
        state.originals.insert(key, Original::New(index));
        if snapshot.is_channel() {
            state.pending.push(Pending {
                audience: Audience::Channel(send.conversation_id),
                payload: PendingPayload::ChannelPost(index),
                origin_device: Some(send.sender_device.clone()),
                accepted_at: send.accepted_at,
            });
        } else {
            for &user_id in snapshot.members.iter() {
                let origin_device = (user_id == send.sender_id).then(|| send.sender_device.clone());
                state.pending.push(Pending {
                    audience: Audience::User(user_id),
                    payload: PendingPayload::Message(index),
                    origin_device,
                    accepted_at: send.accepted_at,
                });
            }
        }
        Answer::Sent(Original::New(index), false)
    }

    fn apply_notice<'k>(
        &mut self,
        state: &mut BatchState<'k>,
        command: &NoticeCommand,
        key: &Option<(i64, &'k str)>,
        sent_at_ms: i64,
    ) -> Answer {
        let conversation_id = command.conversation_id;
        let current = self.snapshots.get(&conversation_id).map(|s| s.version);
        let stale = current.is_some_and(|version| version > command.snapshot.version);
        if !stale {
            self.snapshots
                .insert(conversation_id, Arc::clone(&command.snapshot));
        }
        let mut written = None;
        let leave_point = match (*key, &command.notice) {
            (Some(key), Some(notice)) => {
                if let Some(&original) = state.originals.get(&key) {
                    // A retry: the original wrote the leave points as well.
                    return Answer::Notice(Some((original, true)));
                }
                let index = state.messages.len();
                let message = StoredMessage {
                    id: self.ids.next_id(),
                    conversation_id,
                    sender_id: notice.actor_id,
                    sender_device: String::new(),
                    client_msg_id: key.1.to_owned(),
                    sent_at_ms,
                    text: String::new(),
                    notice: Some(notice.clone()),
                };
                let id = message.id;
                state.newest.insert(conversation_id, id);
                state.messages.push(message);
                state.originals.insert(key, Original::New(index));
                // The members after the change, and those it removed: they learn
                // of it, and it is the last thing they get.
                let mut recipients: Vec<i64> = command
                    .snapshot
                    .members
                    .iter()
                    .chain(&command.removed)
                    .copied()
                    .collect();
                recipients.sort_unstable();
                recipients.dedup();
                for user_id in recipients {
                    state.pending.push(Pending {
                        audience: Audience::User(user_id),
                        payload: PendingPayload::Message(index),
                        origin_device: None,
                        accepted_at: state.accepted_at,
                    });
                }
                written = Some((Original::New(index), false));
                id
            }
            // Channels (and a change without a notice) write no message. A
            // stale channel change (a retry overtaken by a newer one) would move
            // leave points of users who may be back: it changes nothing.
            _ if stale => return Answer::Notice(None),
            // A fresh id is larger than every committed message's and smaller
            // than every later one's: a leave point without a message.
            _ => self.ids.next_id(),
        };
        if !command.added.is_empty() {
            state.leaves.push(LeaveChange::Clear {
                conversation_id,
                user_ids: command.added.clone(),
            });
        }
        if !command.removed.is_empty() {
            state.leaves.push(LeaveChange::Record {
                conversation_id,
                leaves: command
                    .removed
                    .iter()
                    .map(|&user_id| (user_id, leave_point))
                    .collect(),
                // Channel receipt counts are SQL counts over the table: only
                // current subscribers may have a row.
                drop_receipts: command.snapshot.is_channel(),
            });
        }
        Answer::Notice(written)
    }

    /// Moves the watermarks of a receipt command. What it needs of the stored
    /// messages (the senders its watermarks newly cover, the unread count) is
    /// read later for the whole batch, in [`Self::complete_receipts`]; this
    /// batch's own messages are counted here, as of the command's place in it.
    fn apply_receipts(&mut self, state: &mut BatchState<'_>, command: &ReceiptCommand) -> Answer {
        let (conversation_id, user_id) = (command.conversation_id, command.user_id);
        let snapshot = self.resolve(conversation_id, &command.hint);
        // Channels have no member list; the service checked with group-svc.
        if !snapshot.is_channel() && !snapshot.has_member(user_id) {
            return Answer::Refused(MessageError::ConversationNotFound);
        }
        let key = (conversation_id, user_id);
        let old = state.marks.get(&key).copied().unwrap_or_default();
        let newest = state.newest.get(&conversation_id).copied().unwrap_or(0);
        // Watermarks never pass the newest message, never move back, and
        // reading implies delivery.
        let read_up_to = old.read_up_to.max(command.read_up_to.min(newest));
        let delivered_up_to = old
            .delivered_up_to
            .max(command.delivered_up_to.min(newest))
            .max(read_up_to);
        let new = Watermarks {
            delivered_up_to,
            read_up_to,
        };
        debug_assert!(new.read_up_to <= new.delivered_up_to);
        let read_moved = new.read_up_to > old.read_up_to;
        if new != old {
            state.marks.insert(key, new);
            state.moved.insert(key);
        }

        // A delivery leaves what is unread as it is: the count (up to the cap
        // of index entries) is taken only for a command that asked to read.
        let counted = command.read_up_to > 0;
        let mut read = ReceiptRead {
            query: ReceiptQuery {
                conversation_id,
                user_id,
                senders: None,
                unread_after: counted.then_some(new.read_up_to),
            },
            events_at: state.pending.len(),
            receipt: Receipt {
                conversation_id,
                user_id,
                delivered_up_to: new.delivered_up_to,
                read_up_to: new.read_up_to,
            },
            senders: Vec::new(),
            read_state_at: None,
            answer_at: state.answers.len(),
        };
        if new != old && !snapshot.is_channel() {
            // Messages newly covered by either watermark (read never passes
            // delivered, so one range holds both).
            let after = if read_moved {
                old.read_up_to
            } else {
                old.delivered_up_to
            };
            read.query.senders = Some((after, new.delivered_up_to));
            read.senders = state
                .new_by_others(conversation_id, after, new.delivered_up_to, user_id)
                .map(|m| m.sender_id)
                .collect();
        }
        // This batch's messages before the command; the stored ones are added
        // in `complete_receipts`.
        let unread_count = counted.then(|| {
            let in_batch = state
                .new_by_others(conversation_id, new.read_up_to, i64::MAX, user_id)
                .count();
            u32::try_from(in_batch).unwrap_or(u32::MAX).min(UNREAD_CAP)
        });
        if read_moved {
            // Every device of the reader clears its badge.
            read.read_state_at = Some(state.pending.len());
            state.pending.push(Pending {
                audience: Audience::User(user_id),
                payload: PendingPayload::ReadState(ReadState {
                    conversation_id,
                    read_up_to: new.read_up_to,
                    // Counted: the read watermark moves only on a command to read.
                    unread_count: unread_count.unwrap_or_default(),
                }),
                origin_device: None,
                accepted_at: state.accepted_at,
            });
        }
        if read.query.asks() {
            state.reads.push(read);
        }
        Answer::Receipts(ReceiptsMoved {
            marks: new,
            unread_count,
        })
    }

    /// Reads what the batch's receipt commands need of the stored messages, in
    /// one call, and completes them: the receipt events for the senders go in
    /// at each command's place, and the stored unread messages are added to
    /// the counts.
    async fn complete_receipts(&mut self, state: &mut BatchState<'_>) -> Result<(), StoreError> {
        if state.reads.is_empty() {
            return Ok(());
        }
        let queries: Vec<ReceiptQuery> = state.reads.iter().map(|read| read.query).collect();
        let facts = self.log.receipt_facts(&queries, UNREAD_CAP).await?;
        let reads = std::mem::take(&mut state.reads);
        let mut pending = Vec::with_capacity(state.pending.len() + reads.len());
        let mut earlier = std::mem::take(&mut state.pending)
            .into_iter()
            .enumerate()
            .peekable();
        for (read, fact) in reads.into_iter().zip(facts) {
            let add = |count: u32| count.saturating_add(fact.unread).min(UNREAD_CAP);
            if let Some(Answer::Receipts(moved)) = state.answers.get_mut(read.answer_at) {
                moved.unread_count = moved.unread_count.map(add);
            }
            while let Some((_, event)) = earlier.next_if(|(i, _)| *i < read.events_at) {
                pending.push(event);
            }
            let mut senders = read.senders;
            senders.extend(fact.senders);
            senders.sort_unstable();
            senders.dedup();
            for sender_id in senders {
                pending.push(Pending {
                    audience: Audience::User(sender_id),
                    payload: PendingPayload::Receipt(read.receipt),
                    origin_device: None,
                    accepted_at: state.accepted_at,
                });
            }
            if let Some(at) = read.read_state_at
                && let Some((_, mut event)) = earlier.next_if(|(i, _)| *i == at)
            {
                if let PendingPayload::ReadState(read_state) = &mut event.payload {
                    read_state.unread_count = add(read_state.unread_count);
                }
                pending.push(event);
            }
        }
        pending.extend(earlier.map(|(_, event)| event));
        state.pending = pending;
        Ok(())
    }

    /// Numbers the batch's pending events per user, in commit order, and returns
    /// their rows; `events` gets them ready to publish.
    async fn number_events(
        &mut self,
        state: &BatchState<'_>,
        events: &mut Vec<Arc<LiveEvent>>,
        touched: &mut HashSet<i64>,
    ) -> Result<Vec<EventRow>, StoreError> {
        let unknown: HashSet<i64> = state
            .pending
            .iter()
            .filter_map(|pending| match pending.audience {
                Audience::User(user_id) if !self.seqs.contains_key(&user_id) => Some(user_id),
                _ => None,
            })
            .collect();
        if !unknown.is_empty() {
            let unknown: Vec<i64> = unknown.into_iter().collect();
            let last = self.log.last_seqs(&unknown).await?;
            // Committed values (the transaction has written no event yet), so
            // they may stay in the map whatever happens to this batch.
            for user_id in unknown {
                self.seqs
                    .insert(user_id, last.get(&user_id).copied().unwrap_or(0));
            }
        }

        let mut rows = Vec::with_capacity(state.pending.len());
        events.reserve(state.pending.len());
        for pending in &state.pending {
            let (seq, kind) = match (&pending.payload, pending.audience) {
                (PendingPayload::ChannelPost(index), _) => {
                    // In nobody's sequence: subscribers fetch channels by history.
                    let post = event::Kind::ChannelPost((&state.messages[*index]).into());
                    (0, post)
                }
                (payload, Audience::User(user_id)) => {
                    let seq = self.next_seq(user_id, touched);
                    let (message_id, row_payload, kind) = match payload {
                        PendingPayload::Message(index) => {
                            let message = &state.messages[*index];
                            let kind = event::Kind::Message(message.into());
                            (message.id, EventPayload::Message, kind)
                        }
                        PendingPayload::Receipt(receipt) => (
                            0,
                            EventPayload::Receipt(*receipt),
                            event::Kind::Receipt(*receipt),
                        ),
                        PendingPayload::ReadState(read) => (
                            0,
                            EventPayload::ReadState(*read),
                            event::Kind::ReadState(*read),
                        ),
                        PendingPayload::ChannelPost(_) => unreachable!("matched above"),
                    };
                    rows.push(EventRow {
                        user_id,
                        seq,
                        message_id,
                        payload: row_payload,
                    });
                    (seq, kind)
                }
                (_, Audience::Channel(_) | Audience::Watchers(_)) => {
                    unreachable!("the writer addresses users and channels only")
                }
            };
            events.push(Arc::new(LiveEvent {
                audience: pending.audience,
                event: Event {
                    seq,
                    kind: Some(kind),
                },
                origin_device: pending.origin_device.clone(),
                accepted_at: pending.accepted_at,
            }));
        }
        Ok(rows)
    }

    /// Returns the next sequence number of `user_id` and records it as used. The
    /// user's last number must be in `seqs` already (`number_events` loads the
    /// missing ones first).
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

    /// Rolls the open transaction back and forgets the sequence numbers it
    /// handed out to `touched`: they were never stored, and the next batch
    /// reloads these users from the database.
    async fn abandon(&mut self, touched: &HashSet<i64>) {
        if let Err(rollback_error) = self.log.rollback().await {
            tracing::error!(error = %rollback_error, "rollback of the message batch failed");
        }
        for user_id in touched {
            self.seqs.remove(user_id);
        }
    }

    async fn fail_batch(
        &mut self,
        batch: Vec<WriteRequest>,
        error: StoreError,
        touched: &HashSet<i64>,
    ) {
        self.abandon(touched).await;
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
mod tests;
