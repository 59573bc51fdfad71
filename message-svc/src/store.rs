//! Storage of messages and per-user event sequences, behind two small traits: the
//! read side ([`MessageStore`], shared by every reader) and the write side
//! ([`LogWriter`], owned by the one writer task). One file per backend:
//! [`sqlite`] (the embedded mode) and [`postgres`] (the distributed mode, where
//! several message processes write one database); ScyllaDB later. `common` holds
//! what the two SQL backends share: the statements both dialects spell alike and
//! the logic around every statement (paging, row decoding, payload encoding).
//! `tests` is the conformance suite every backend runs.

use std::collections::HashMap;

use confab_proto::v1::{Notice, ReadState, Receipt};
use std::future::Future;
use std::pin::Pin;

mod common;
pub(crate) mod postgres;
pub(crate) mod sqlite;
#[cfg(test)]
pub(crate) mod tests;

/// A boxed future, so that the store traits can be used as trait objects.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An SQL statement failed.
    #[error("sql statement failed")]
    Sql(#[from] sqlx::Error),
    /// A statement of the SQLite writer's own connection failed.
    #[error("sqlite statement failed")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored notice, receipt or read state does not decode.
    #[error("stored protobuf does not decode")]
    Decode(#[from] prost::DecodeError),
    /// The schema could not be created or updated.
    #[error("schema migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// New events of a user do not continue that user's sequence gap-free from
    /// its stored head: another writer numbered the same user (a cached sequence
    /// number in a shared store). Nothing of the transaction is kept.
    #[error("event sequence does not continue from the stored head")]
    SequenceBroken {
        /// The user whose sequence would have broken.
        user_id: i64,
    },
    /// A thread of the writer's (its own, its publisher's, the SQLite
    /// checkpointer's) or its runtime could not be started.
    #[error("a thread of the message writer could not be started")]
    Start(#[source] std::io::Error),
}

impl StoreError {
    /// Returns whether a unique index refused a row: on the message writer's
    /// path, a dedup key stored before (or, never expected, a sequence number
    /// taken twice).
    pub fn is_unique_violation(&self) -> bool {
        match self {
            Self::Sql(sqlx::Error::Database(error)) => {
                error.kind() == sqlx::error::ErrorKind::UniqueViolation
            }
            // As sqlx reads SQLite's codes: a unique index or a primary key.
            Self::Sqlite(rusqlite::Error::SqliteFailure(error, _)) => matches!(
                error.extended_code,
                rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
                    | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
            ),
            _ => false,
        }
    }

    /// Returns whether the failed transaction may simply be run again: the
    /// database aborted it because of concurrent writers (PostgreSQL's deadlock
    /// `40P01` or serialization failure `40001`), and nothing of it was kept.
    ///
    /// Connection errors are not retryable: a COMMIT whose answer was lost may
    /// have succeeded.
    pub fn is_retryable(&self) -> bool {
        /// SQLSTATE of `serialization_failure` and `deadlock_detected`.
        const RETRYABLE: [&str; 2] = ["40001", "40P01"];
        match self {
            Self::Sql(sqlx::Error::Database(error)) => error
                .code()
                .is_some_and(|code| RETRYABLE.contains(&code.as_ref())),
            _ => false,
        }
    }
}

/// A message as stored; every field but `client_msg_id` and `text` is set by the
/// server.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredMessage {
    /// Snowflake id; orders the messages of one conversation.
    pub(crate) id: i64,
    pub(crate) conversation_id: i64,
    pub(crate) sender_id: i64,
    /// The device the message came from.
    pub(crate) sender_device: String,
    /// The sender's idempotency key; unique per sender, forever.
    pub(crate) client_msg_id: String,
    /// Server time at which the writer accepted the message.
    pub(crate) sent_at_ms: i64,
    /// Empty for notices.
    pub(crate) text: String,
    /// Set on what the server writes for a change of membership or metadata.
    pub(crate) notice: Option<Notice>,
}

impl From<&StoredMessage> for confab_proto::v1::Message {
    fn from(message: &StoredMessage) -> Self {
        Self {
            id: message.id,
            conversation_id: message.conversation_id,
            sender_id: message.sender_id,
            sender_device: message.sender_device.clone(),
            client_msg_id: message.client_msg_id.clone(),
            sent_at_ms: message.sent_at_ms,
            text: message.text.clone(),
            notice: message.notice.clone(),
        }
    }
}

impl From<StoredMessage> for confab_proto::v1::Message {
    fn from(message: StoredMessage) -> Self {
        Self {
            id: message.id,
            conversation_id: message.conversation_id,
            sender_id: message.sender_id,
            sender_device: message.sender_device,
            client_msg_id: message.client_msg_id,
            sent_at_ms: message.sent_at_ms,
            text: message.text,
            notice: message.notice,
        }
    }
}

/// One entry of a user's event sequence.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UserEvent {
    /// Gap-free, strictly increasing per user, starting at 1.
    pub(crate) seq: u64,
    pub(crate) kind: UserEventKind,
}

/// What an entry of a user's event sequence announces.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum UserEventKind {
    /// A new message (or notice) in one of the user's conversations.
    Message(StoredMessage),
    /// Another member's watermarks moved past messages the user sent.
    Receipt(Receipt),
    /// The user's own read watermark moved.
    ReadState(ReadState),
}

impl UserEvent {
    /// Returns the message the event announces; panics on other kinds.
    #[cfg(test)]
    pub(crate) fn message(&self) -> &StoredMessage {
        match &self.kind {
            UserEventKind::Message(message) => message,
            other => panic!("not a message event: {other:?}"),
        }
    }
}

impl From<UserEventKind> for confab_proto::v1::event::Kind {
    fn from(kind: UserEventKind) -> Self {
        match kind {
            UserEventKind::Message(message) => Self::Message(message.into()),
            UserEventKind::Receipt(receipt) => Self::Receipt(receipt),
            UserEventKind::ReadState(state) => Self::ReadState(state),
        }
    }
}

/// One row of a user's event sequence, as the writer appends it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EventRow {
    pub(crate) user_id: i64,
    pub(crate) seq: u64,
    /// The message of a message event; 0 for the others.
    pub(crate) message_id: i64,
    /// The receipt or read state of the other kinds (prost-encoded in the row).
    pub(crate) payload: EventPayload,
}

/// What a non-message event row carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum EventPayload {
    /// A message event: the row references `message_id`.
    Message,
    Receipt(Receipt),
    ReadState(ReadState),
}

/// A member's watermarks in one conversation (DESIGN.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Watermarks {
    pub(crate) delivered_up_to: i64,
    /// Never above `delivered_up_to`: reading implies delivery.
    pub(crate) read_up_to: i64,
}

/// Watermarks by (conversation id, user id).
pub(crate) type WatermarkMap = HashMap<(i64, i64), Watermarks>;

/// Most messages an unread count counts; beyond it a client shows "10000+".
pub(crate) const UNREAD_CAP: u32 = 10_000;

/// A page of a longer result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// Whether more items exist beyond this page, in the direction of the scan.
    pub(crate) has_more: bool,
}

/// A page of a user's event sequence, with the sequence's head.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SyncPage {
    pub(crate) events: Page<UserEvent>,
    /// The user's last assigned sequence number when the page was read (0 when
    /// none): a device whose cursor is beyond it holds a cursor this server never
    /// issued, and must not wait for events up to it.
    pub(crate) head: u64,
}

/// Which part of a conversation's history to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HistoryQuery {
    pub(crate) conversation_id: i64,
    /// Only messages with a smaller id.
    pub(crate) before: Option<i64>,
    /// Only messages with a larger id.
    pub(crate) after: Option<i64>,
    /// Only messages with an id up to this one (a former member's leave point).
    pub(crate) up_to: Option<i64>,
    /// Page size, already clamped by the caller (at least 1).
    pub(crate) limit: u32,
}

/// The read side: history, sync and last messages. Never touches the writer.
pub(crate) trait MessageStore: Send + Sync + std::fmt::Debug + 'static {
    /// Returns a page of the conversation, newest first.
    ///
    /// With only `after`, the scan runs upwards from `after` (the page holds the
    /// `limit` messages right after it, and `has_more` says whether newer ones
    /// exist); otherwise it runs downwards from `before` (or the newest message),
    /// and `has_more` says whether older ones exist. Either way the page is
    /// returned newest first.
    fn history(
        &self,
        query: HistoryQuery,
    ) -> BoxFuture<'_, Result<Page<StoredMessage>, StoreError>>;

    /// Returns up to `limit` events of `user_id` with `seq > after`, in seq order,
    /// and the user's last assigned sequence number (the head).
    ///
    /// The page and the head are one consistent view: the page never holds an
    /// event beyond the head, and `has_more` is false only when the page ends at
    /// the head (or the cursor is at or beyond it).
    fn sync(
        &self,
        user_id: i64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<SyncPage, StoreError>>;

    /// Returns the newest message of each conversation that has one.
    fn last_messages<'a>(
        &'a self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>>;

    /// Returns the leave point of a former member: the newest message id they may
    /// still read, or `None` when they never left (or were added back).
    fn leave_point(
        &self,
        conversation_id: i64,
        user_id: i64,
    ) -> BoxFuture<'_, Result<Option<i64>, StoreError>>;

    /// Returns the message `message_id` if it is in `conversation_id`.
    fn message(
        &self,
        conversation_id: i64,
        message_id: i64,
    ) -> BoxFuture<'_, Result<Option<StoredMessage>, StoreError>>;

    /// Returns the watermarks of every user with a row in the conversation, by
    /// user id; at most `limit` rows, `except` left out.
    fn watermarks(
        &self,
        conversation_id: i64,
        except: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(i64, Watermarks)>, StoreError>>;

    /// Returns how many users other than `except` have delivered and read up to
    /// `message_id` or beyond, counted in SQL (channels, fan-out on read).
    fn receipt_counts(
        &self,
        conversation_id: i64,
        message_id: i64,
        except: i64,
    ) -> BoxFuture<'_, Result<(u32, u32), StoreError>>;

    /// Returns, per named conversation, `user_id`'s read watermark and the number
    /// of messages after it sent by others, without a notice, at most
    /// [`UNREAD_CAP`].
    fn unread_counts<'a>(
        &'a self,
        user_id: i64,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<Vec<ReadState>, StoreError>>;
}

/// What a receipt command reads of the stored messages of its conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReceiptQuery {
    pub(crate) conversation_id: i64,
    /// The user whose watermarks moved: their own messages are left out.
    pub(crate) user_id: i64,
    /// `(after, up_to)`: the senders of the messages (not notices) with
    /// `after < id <= up_to` are asked for; `None` asks for none.
    pub(crate) senders: Option<(i64, i64)>,
    /// The messages by others (not notices) after this id are counted; `None`
    /// counts none.
    pub(crate) unread_after: Option<i64>,
}

impl ReceiptQuery {
    /// Returns whether the query asks for anything.
    pub(crate) fn asks(&self) -> bool {
        self.senders.is_some() || self.unread_after.is_some()
    }
}

/// The answer to a [`ReceiptQuery`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ReceiptFacts {
    /// The distinct senders asked for, in no particular order.
    pub(crate) senders: Vec<i64>,
    /// The unread messages, at most the cap (0 when not asked for).
    pub(crate) unread: u32,
}

/// The write side, owned by the one writer task: the steps of one group commit.
///
/// Every write happens between [`begin`](LogWriter::begin) and
/// [`commit`](LogWriter::commit); reads through this trait see the writes of the
/// open transaction. Every method takes the whole batch, so that a backend whose
/// every call is a round trip (PostgreSQL) makes a number of calls that does not
/// grow with the number of messages; SQLite, whose statements run on the
/// caller's thread, steps one prepared statement per row instead.
pub(crate) trait LogWriter: Send + std::fmt::Debug + 'static {
    /// Returns true when other processes write the same store, so the writer must
    /// not cache sequence numbers between transactions and must ask
    /// [`last_seqs`](LogWriter::last_seqs) for every user it numbers in each
    /// transaction (which also locks those users' sequences until the commit).
    fn shared(&self) -> bool {
        false
    }

    /// Returns true when every call runs to its end before it returns (its
    /// future is ready at once): the writer's thread does the store's work
    /// itself, so nothing else runs there during a call, and the writer hands
    /// each committed batch to a thread of its own to publish and answer
    /// (`writer::Publisher`).
    fn blocking(&self) -> bool {
        false
    }

    /// Opens a write transaction.
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Returns the stored messages among `keys` (sender id, client_msg_id), in no
    /// particular order; keys never sent are left out.
    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>>;

    /// Returns the last event sequence number of each of `user_ids` that has one;
    /// users without events are left out (their last number is 0). In a
    /// [`shared`](LogWriter::shared) store this also locks the users' sequences
    /// until the transaction ends, so that no other writer numbers them meanwhile.
    fn last_seqs<'a>(
        &'a mut self,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, u64>, StoreError>>;

    /// Inserts new messages; fails (and the caller rolls back) if one repeats the
    /// (sender, client_msg_id) of a stored message or of another in `messages`.
    fn insert_messages<'a>(
        &'a mut self,
        messages: &'a [StoredMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends events to users' sequences.
    fn insert_events<'a>(
        &'a mut self,
        events: &'a [EventRow],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Returns the newest message id of each of `conversation_ids` that has one.
    fn newest_ids<'a>(
        &'a mut self,
        conversation_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<HashMap<i64, i64>, StoreError>>;

    /// Returns the stored watermarks among `keys` (conversation id, user id).
    fn load_watermarks<'a>(
        &'a mut self,
        keys: &'a [(i64, i64)],
    ) -> BoxFuture<'a, Result<WatermarkMap, StoreError>>;

    /// Writes watermarks: `(conversation id, user id, watermarks)` each.
    fn save_watermarks<'a>(
        &'a mut self,
        rows: &'a [(i64, i64, Watermarks)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Answers the receipt commands' reads of the stored messages, one
    /// [`ReceiptFacts`] per query in order, with unread counts stopping at
    /// `cap`: the whole batch's in one call.
    fn receipt_facts<'a>(
        &'a mut self,
        queries: &'a [ReceiptQuery],
        cap: u32,
    ) -> BoxFuture<'a, Result<Vec<ReceiptFacts>, StoreError>>;

    /// Records leave points (`(user id, last visible id)` each) of a
    /// conversation and drops the users' watermarks when `drop_receipts`.
    fn record_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        leaves: &'a [(i64, i64)],
        drop_receipts: bool,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Forgets the leave points of users who are members again.
    fn clear_leaves<'a>(
        &'a mut self,
        conversation_id: i64,
        user_ids: &'a [i64],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Commits the open transaction; when this returns `Ok`, it is durable.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Rolls back the open transaction, if any.
    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Closes the backend's connection.
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
}
