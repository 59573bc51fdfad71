//! Storage of messages and per-user event sequences, behind two small traits: the
//! read side ([`MessageStore`], shared by every reader) and the write side
//! ([`LogWriter`], owned by the one writer task). One file per backend:
//! [`sqlite`] now; PostgreSQL and ScyllaDB later.

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

    /// Returns up to `limit` events of `user_id` with `seq > after`, in seq order.
    fn sync(
        &self,
        user_id: i64,
        after: u64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Page<UserEvent>, StoreError>>;

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
/// open transaction.
pub(crate) trait LogWriter: Send + std::fmt::Debug + 'static {
    /// Opens a write transaction.
    fn begin(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Returns the message `sender_id` sent with `client_msg_id`, if any.
    fn find_sent<'a>(
        &'a mut self,
        sender_id: i64,
        client_msg_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<StoredMessage>, StoreError>>;

    /// Returns the last event sequence number of `user_id` (0 when none).
    fn last_seq(&mut self, user_id: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Inserts a new message.
    fn insert_message<'a>(
        &'a mut self,
        message: &'a StoredMessage,
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Appends a new-message event to the sequence of `user_id`.
    fn insert_event(
        &mut self,
        user_id: i64,
        seq: u64,
        message_id: i64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Commits the open transaction; when this returns `Ok`, it is durable.
    fn commit(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Rolls back the open transaction, if any.
    fn rollback(&mut self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Closes the backend's connection.
    fn close(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
}
