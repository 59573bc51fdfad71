//! Storage of messages and per-user event sequences, behind two small traits: the
//! read side ([`MessageStore`], shared by every reader) and the write side
//! ([`LogWriter`], owned by the one writer task). One file per backend:
//! [`sqlite`] now; PostgreSQL and ScyllaDB later.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

pub(crate) mod sqlite;

/// A boxed future, so that the store traits can be used as trait objects.
pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A storage backend failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An SQL statement failed.
    #[error("sql statement failed")]
    Sql(#[from] sqlx::Error),
}

/// A message as stored; every field but `client_msg_id` and `text` is set by the
/// server.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub(crate) text: String,
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
        }
    }
}

/// One entry of a user's event sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserEvent {
    /// Gap-free, strictly increasing per user, starting at 1.
    pub(crate) seq: u64,
    /// The new message the event announces (the only event kind so far).
    pub(crate) message: StoredMessage,
}

/// A page of a longer result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Page<T> {
    pub(crate) items: Vec<T>,
    /// Whether more items exist beyond this page, in the direction of the scan.
    pub(crate) has_more: bool,
}

/// A page of a user's event sequence, with the sequence's head.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

/// The write side, owned by the one writer task: the steps of one group commit.
///
/// Every write happens between [`begin`](LogWriter::begin) and
/// [`commit`](LogWriter::commit); reads through this trait see the writes of the
/// open transaction. Every method takes the whole batch, so that a commit costs a
/// number of statements that does not grow with the number of messages (a
/// backend splits a call only where its statements have a size limit).
pub(crate) trait LogWriter: Send + std::fmt::Debug + 'static {
    /// Opens a write transaction.
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Returns the stored messages among `keys` (sender id, client_msg_id), in no
    /// particular order; keys never sent are left out.
    fn find_sent_many<'a>(
        &'a mut self,
        keys: &'a [(i64, &'a str)],
    ) -> BoxFuture<'a, Result<Vec<StoredMessage>, StoreError>>;

    /// Returns the last event sequence number of each of `user_ids` that has one;
    /// users without events are left out (their last number is 0).
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

    /// Appends new-message events: `(user_id, seq, message_id)` each.
    fn insert_events<'a>(
        &'a mut self,
        events: &'a [(i64, u64, i64)],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Commits the open transaction; when this returns `Ok`, it is durable.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Rolls back the open transaction, if any.
    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Closes the backend's connection.
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
}
