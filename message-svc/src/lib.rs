//! message-svc: the send path, message ids, dedup, group commit, history, the
//! per-user event sequence, membership notices and receipts (DESIGN.md sections
//! 3 to 6).
//!
//! - [`config`]: [`MessageConfig`], built by the binary.
//! - [`error`]: [`MessageError`] and its mapping to gRPC statuses.
//! - `members`: the membership cache in front of group-svc (snapshots of
//!   conversations, roles of channel subscribers).
//! - `writer`: the group-commit writer, the one task that writes, assigns ids
//!   and per-user sequence numbers, holds the authoritative membership snapshot
//!   of every conversation, acknowledges after commit and publishes the
//!   committed events on the live bus.
//! - `notices`: `AppendNotice`, membership changes written in order with the
//!   messages, and the leave points of former members.
//! - `receipts`: delivered and read watermarks, receipt aggregates and unread
//!   counts.
//! - `store`: the storage traits and domain types; `store/sqlite` the SQLite
//!   backend.
//! - `grpc`: the generated `Messages` trait implemented on [`MessageService`]:
//!   conversions and error mapping only.
//!
//! [`MessageService`] ties these together: it validates, checks membership, hands
//! sends to the writer and serves reads from the store's read pool.

use std::sync::Arc;
use std::time::Instant;

use confab_common::bus::LiveBus;
use confab_common::channel::GrpcChannel;
use confab_proto::group::v1::groups_client::GroupsClient;
use parking_lot::RwLock;
use tokio::sync::watch;

pub mod config;
pub mod error;
mod grpc;
pub mod log;
mod members;
mod notices;
mod receipts;
mod store;
mod writer;

#[cfg(test)]
mod testing;

pub use config::MessageConfig;
pub use error::MessageError;
pub use log::{LogConfig, LogFront};
pub use store::StoreError;

use confab_proto::v1::Role;
use members::MemberCache;
use store::{HistoryQuery, MessageStore, Page, StoredMessage, SyncPage};
use writer::{SendCommand, Sent, WriterHandle, WriterStats};

/// Longest accepted `client_msg_id`, in characters.
const MAX_CLIENT_MSG_ID_CHARS: usize = 64;
/// History page size when the caller asks for 0, and the most it may ask for.
const HISTORY_DEFAULT_LIMIT: u32 = 50;
const HISTORY_MAX_LIMIT: u32 = 200;
/// Sync page size when the caller asks for 0, and the most it may ask for.
const SYNC_DEFAULT_LIMIT: u32 = 500;
const SYNC_MAX_LIMIT: u32 = 1000;
/// Most conversations one `LastMessages` call may name.
const LAST_MESSAGES_MAX_IDS: usize = 1000;

/// The message service; implements the generated `Messages` trait. Cheap to clone.
#[derive(Clone, Debug)]
pub struct MessageService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: MessageConfig,
    /// Who may send to and read a conversation.
    members: MemberCache,
    /// The read side; never waits for the writer.
    store: Arc<dyn MessageStore>,
    /// The way to the writer; `None` once shutdown has begun, so that new sends
    /// are refused while queued ones still commit.
    writer: RwLock<Option<WriterHandle>>,
    /// Turns `true` when the writer task has finished.
    writer_done: watch::Receiver<bool>,
    /// Commit counters, for tests.
    #[cfg_attr(not(test), allow(dead_code))]
    stats: Arc<WriterStats>,
}

impl MessageService {
    /// Opens the message store at `config.db_path` (creating it if needed) and
    /// starts the writer.
    ///
    /// # Errors
    ///
    /// Fails when the database cannot be opened or its schema created.
    pub async fn open(
        config: MessageConfig,
        groups: GroupsClient<GrpcChannel>,
        bus: Arc<dyn LiveBus>,
    ) -> Result<Self, MessageError> {
        let (store, log) = store::sqlite::open(&config.db_path).await?;
        let (handle, writer_done, stats) = writer::spawn(
            Box::new(log),
            writer::Home::OwnThread,
            config.node_id,
            config.max_batch,
            bus,
        )?;
        tracing::info!(path = %config.db_path.display(), node_id = config.node_id, "message store open");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                members: MemberCache::new(groups),
                store: Arc::new(store),
                writer: RwLock::new(Some(handle)),
                writer_done,
                stats,
            }),
        })
    }

    /// Opens the message store on PostgreSQL (the distributed mode: several
    /// message processes share it) and starts the writer. The schema must exist
    /// ([`migrate_postgres`]); `config.db_path` is not used.
    ///
    /// # Errors
    ///
    /// Fails when the writer's connection cannot be had.
    pub async fn open_postgres(
        config: MessageConfig,
        pool: sqlx::PgPool,
        groups: GroupsClient<GrpcChannel>,
        bus: Arc<dyn LiveBus>,
    ) -> Result<Self, MessageError> {
        let (store, log) = store::postgres::open(pool).await?;
        // PostgreSQL's answers come through the runtime's own I/O driver.
        let (handle, writer_done, stats) = writer::spawn(
            Box::new(log),
            writer::Home::Runtime,
            config.node_id,
            config.max_batch,
            bus,
        )?;
        tracing::info!(node_id = config.node_id, "message store open on PostgreSQL");
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                members: MemberCache::new(groups),
                store: Arc::new(store),
                writer: RwLock::new(Some(handle)),
                writer_done,
                stats,
            }),
        })
    }

    /// Stops accepting sends, commits and acknowledges what is queued, and waits
    /// for the writer to finish.
    pub async fn shutdown(&self) {
        // Dropping our handle lets the writer stop once the sends that already
        // hold one have been queued and committed.
        drop(self.inner.writer.write().take());
        let mut done = self.inner.writer_done.clone();
        // An error means the writer task is gone already.
        let _ = done.wait_for(|done| *done).await;
    }

    /// Forgets the cached members of `conversation_id`. `AppendNotice` does this
    /// for every change it is told of; this is for changes it is not.
    pub fn invalidate_members(&self, conversation_id: i64) {
        self.inner.members.invalidate(conversation_id, &[]);
    }

    /// Returns a handle to the writer, cloned out of the lock (a command may
    /// wait for room in the queue).
    pub(crate) fn writer(&self) -> Result<WriterHandle, MessageError> {
        self.inner
            .writer
            .read()
            .clone()
            .ok_or(MessageError::ShuttingDown)
    }

    /// Validates a send, checks membership and waits until the message is
    /// durable (or found to be a retry).
    async fn send(&self, request: SendInput) -> Result<Sent, MessageError> {
        let command = self.prepare_send(request, Instant::now()).await?;
        writer::submit(&self.writer()?, command).await
    }

    /// Checks a send's fields and size, without looking at membership.
    pub(crate) fn validate_send(&self, request: &SendInput) -> Result<(), MessageError> {
        let client_msg_id_chars = request.client_msg_id.chars().count();
        if !(1..=MAX_CLIENT_MSG_ID_CHARS).contains(&client_msg_id_chars) {
            return Err(MessageError::InvalidArgument(
                "client_msg_id must be 1-64 characters",
            ));
        }
        if request.sender_device.is_empty() {
            return Err(MessageError::InvalidArgument("sender_device is required"));
        }
        if request.text.is_empty() {
            return Err(MessageError::InvalidArgument("message text is empty"));
        }
        if request.text.len() > self.inner.config.max_text_bytes {
            return Err(MessageError::TextTooLarge {
                max: self.inner.config.max_text_bytes,
            });
        }
        Ok(())
    }

    /// Validates a send and checks membership: the writer's command, not yet
    /// queued. `accepted_at` is when the send path first saw the request.
    pub(crate) async fn prepare_send(
        &self,
        request: SendInput,
        accepted_at: Instant,
    ) -> Result<SendCommand, MessageError> {
        self.validate_send(&request)?;
        let members = &self.inner.members;
        let hint = members.snapshot(request.conversation_id).await?;
        if hint.is_channel() {
            match members
                .role(request.conversation_id, request.sender_id)
                .await?
            {
                Some(Role::Admin | Role::Owner) => {}
                Some(_) => {
                    return Err(MessageError::PermissionDenied(
                        "only admins post in a channel",
                    ));
                }
                None => return Err(MessageError::ConversationNotFound),
            }
        } else if !hint.has_member(request.sender_id) {
            // A fast refusal; the writer checks again at commit time, in order
            // with the membership changes.
            return Err(MessageError::ConversationNotFound);
        }
        Ok(SendCommand {
            sender_id: request.sender_id,
            sender_device: request.sender_device,
            conversation_id: request.conversation_id,
            client_msg_id: request.client_msg_id,
            text: request.text,
            hint,
            accepted_at,
        })
    }

    /// Returns a page of a conversation's history, newest first: all of it to a
    /// member, up to their leave point to a former member.
    async fn history(
        &self,
        user_id: i64,
        conversation_id: i64,
        before: i64,
        after: i64,
        limit: u32,
    ) -> Result<Page<StoredMessage>, MessageError> {
        let up_to = match self
            .inner
            .members
            .check_member(conversation_id, user_id)
            .await
        {
            Ok(_) => None,
            Err(MessageError::ConversationNotFound) => Some(
                self.inner
                    .store
                    .leave_point(conversation_id, user_id)
                    .await?
                    .ok_or(MessageError::ConversationNotFound)?,
            ),
            Err(error) => return Err(error),
        };
        let query = HistoryQuery {
            conversation_id,
            before: (before > 0).then_some(before),
            after: (after > 0).then_some(after),
            up_to,
            limit: clamp_limit(limit, HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT),
        };
        Ok(self.inner.store.history(query).await?)
    }

    /// Returns the events of `user_id` after the cursor `after`, in order, and
    /// the user's head.
    async fn sync(&self, user_id: i64, after: u64, limit: u32) -> Result<SyncPage, MessageError> {
        let limit = clamp_limit(limit, SYNC_DEFAULT_LIMIT, SYNC_MAX_LIMIT);
        Ok(self.inner.store.sync(user_id, after, limit).await?)
    }

    /// Returns the newest message of each named conversation that has one.
    async fn last_messages(
        &self,
        mut conversation_ids: Vec<i64>,
    ) -> Result<Vec<StoredMessage>, MessageError> {
        if conversation_ids.len() > LAST_MESSAGES_MAX_IDS {
            return Err(MessageError::InvalidArgument(
                "at most 1000 conversation ids per call",
            ));
        }
        conversation_ids.sort_unstable();
        conversation_ids.dedup();
        Ok(self.inner.store.last_messages(&conversation_ids).await?)
    }

    /// Returns the number of committed batches so far.
    #[cfg(test)]
    fn commit_count(&self) -> u64 {
        self.inner
            .stats
            .commits
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Returns the size of the largest committed batch so far.
    #[cfg(test)]
    fn max_batch_seen(&self) -> u64 {
        self.inner
            .stats
            .max_batch
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Creates or updates the message store's schema on PostgreSQL (`confab
/// migrate`, or at start when configured). Idempotent.
///
/// # Errors
///
/// Fails when a migration fails.
pub async fn migrate_postgres(pool: &sqlx::PgPool) -> Result<(), MessageError> {
    Ok(store::postgres::migrate(pool).await?)
}

/// A send as it arrives, before validation.
#[derive(Debug)]
pub(crate) struct SendInput {
    pub(crate) sender_id: i64,
    pub(crate) sender_device: String,
    pub(crate) conversation_id: i64,
    pub(crate) client_msg_id: String,
    pub(crate) text: String,
}

/// Returns `limit`, or `default` for 0, at most `max`.
fn clamp_limit(limit: u32, default: u32, max: u32) -> u32 {
    if limit == 0 { default } else { limit.min(max) }
}

#[cfg(test)]
mod tests {
    use confab_proto::message::v1::messages_server::Messages;
    use confab_proto::message::v1::{
        HistoryRequest, LastMessagesRequest, SendRequest, SyncRequest,
    };
    use tonic::{Code, Request};

    use super::*;
    use crate::testing::{GroupSvc, RecordingBus, open_service, open_service_with};

    fn send_request(
        sender_id: i64,
        conversation_id: i64,
        client_msg_id: &str,
        text: &str,
    ) -> Request<SendRequest> {
        Request::new(SendRequest {
            sender_id,
            sender_device: "phone".into(),
            conversation_id,
            client_msg_id: client_msg_id.into(),
            text: text.into(),
        })
    }

    async fn history(
        service: &MessageService,
        user_id: i64,
        conversation_id: i64,
        before: i64,
        after: i64,
        limit: u32,
    ) -> (Vec<i64>, bool) {
        let response = Messages::history(
            service,
            Request::new(HistoryRequest {
                user_id,
                conversation_id,
                before,
                after,
                limit,
            }),
        )
        .await
        .unwrap()
        .into_inner();
        (
            response.messages.iter().map(|m| m.id).collect(),
            response.has_more,
        )
    }

    async fn sync_len(service: &MessageService, user_id: i64) -> usize {
        let request = Request::new(SyncRequest {
            user_id,
            after: 0,
            limit: 0,
        });
        Messages::sync(service, request)
            .await
            .unwrap()
            .into_inner()
            .events
            .len()
    }

    /// Bad client_msg_id, empty text or device, and oversized text are refused with
    /// their codes and store nothing.
    #[tokio::test]
    async fn bad_input_refused_and_nothing_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus.clone()).await;
        let (user, direct) = (groups.u[1], groups.direct);
        let cases = [
            (
                send_request(user, direct, "", "hi"),
                Code::InvalidArgument,
                "client_msg_id must be 1-64 characters",
            ),
            (
                send_request(user, direct, &"x".repeat(65), "hi"),
                Code::InvalidArgument,
                "client_msg_id must be 1-64 characters",
            ),
            (
                send_request(user, direct, "ok", ""),
                Code::InvalidArgument,
                "message text is empty",
            ),
            (
                send_request(user, direct, "ok", &"x".repeat(16 * 1024 + 1)),
                Code::ResourceExhausted,
                "message text exceeds 16384 bytes",
            ),
        ];
        for (request, code, message) in cases {
            let status = Messages::send(&service, request).await.unwrap_err();
            assert_eq!((status.code(), status.message()), (code, message));
        }
        let mut no_device = send_request(user, direct, "ok", "hi");
        no_device.get_mut().sender_device.clear();
        assert_eq!(
            Messages::send(&service, no_device)
                .await
                .unwrap_err()
                .code(),
            Code::InvalidArgument
        );
        // 64 characters of 2 bytes each, and exactly the byte limit, are fine.
        let ok = send_request(user, direct, &"é".repeat(64), &"x".repeat(16 * 1024));
        Messages::send(&service, ok).await.unwrap();
        assert_eq!(sync_len(&service, user).await, 1);
        assert_eq!(bus.events.lock().len(), 2);
    }

    /// A non-member gets the same NOT_FOUND as an unknown conversation, for sends
    /// and history; a failing group-svc is UNAVAILABLE.
    #[tokio::test]
    async fn members_only() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let &GroupSvc {
            u,
            direct,
            trio,
            group,
            ..
        } = &groups;
        let outsider = Messages::send(&service, send_request(u[3], direct, "a", "hi"))
            .await
            .unwrap_err();
        let unknown = Messages::send(&service, send_request(u[1], 99, "a", "hi"))
            .await
            .unwrap_err();
        assert_eq!(
            (outsider.code(), outsider.message()),
            (Code::NotFound, "no such conversation")
        );
        assert_eq!(
            (unknown.code(), unknown.message()),
            (outsider.code(), outsider.message())
        );
        let history = HistoryRequest {
            user_id: u[3],
            conversation_id: direct,
            ..Default::default()
        };
        let status = Messages::history(&service, Request::new(history))
            .await
            .unwrap_err();
        assert_eq!(
            (status.code(), status.message()),
            (Code::NotFound, "no such conversation")
        );
        assert_eq!(sync_len(&service, u[3]).await, 0);
        assert_eq!(sync_len(&service, u[1]).await, 0);
        // A member of the conversation is let in.
        Messages::send(&service, send_request(u[3], trio, "a", "hi"))
            .await
            .unwrap();
        // group-svc failing (its database down) on a conversation not cached
        // yet: UNAVAILABLE, and nothing stored.
        groups.database_down().await;
        let broken = Messages::send(&service, send_request(u[1], group, "a", "hi"))
            .await
            .unwrap_err();
        assert_eq!(broken.code(), Code::Unavailable);
        assert_eq!(sync_len(&service, u[1]).await, 1, "the member's send only");
    }

    /// History through the gRPC layer: newest first, before/after/limit/has_more,
    /// limit 0 means 50.
    #[tokio::test]
    async fn history_pages() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, trio) = (groups.u, groups.trio);
        let mut ids = Vec::new();
        for i in 0..7 {
            let sender = u[1 + i % 3];
            let response =
                Messages::send(&service, send_request(sender, trio, &format!("m{i}"), "hi"))
                    .await
                    .unwrap();
            ids.push(response.into_inner().message.unwrap().id);
        }
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "ids increase in commit order"
        );
        let newest_first: Vec<i64> = ids.iter().rev().copied().collect();
        assert_eq!(
            history(&service, u[3], trio, 0, 0, 0).await,
            (newest_first.clone(), false)
        );
        assert_eq!(
            history(&service, u[3], trio, 0, 0, 3).await,
            (newest_first[..3].to_vec(), true)
        );
        assert_eq!(
            history(&service, u[3], trio, ids[4], 0, 3).await,
            (newest_first[3..6].to_vec(), true)
        );
        assert_eq!(
            history(&service, u[3], trio, ids[1], 0, 3).await,
            (vec![ids[0]], false)
        );
        assert_eq!(
            history(&service, u[3], trio, 0, ids[1], 2).await,
            (vec![ids[3], ids[2]], true)
        );
        assert_eq!(
            history(&service, u[3], trio, 0, ids[4], 5).await,
            (vec![ids[6], ids[5]], false)
        );
    }

    /// LastMessages returns the newest message per conversation, and refuses more
    /// than 1000 ids.
    #[tokio::test]
    async fn last_messages() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let &GroupSvc {
            u,
            direct,
            trio,
            channel,
            ..
        } = &groups;
        Messages::send(&service, send_request(u[1], direct, "a", "first"))
            .await
            .unwrap();
        Messages::send(&service, send_request(u[2], direct, "b", "second"))
            .await
            .unwrap();
        Messages::send(&service, send_request(u[3], trio, "c", "third"))
            .await
            .unwrap();
        let request = Request::new(LastMessagesRequest {
            conversation_ids: vec![direct, trio, channel, direct],
        });
        let last = Messages::last_messages(&service, request)
            .await
            .unwrap()
            .into_inner()
            .messages;
        let texts: Vec<&str> = last.iter().map(|m| m.text.as_str()).collect();
        assert_eq!(texts, vec!["second", "third"]);
        let too_many = Request::new(LastMessagesRequest {
            conversation_ids: (0..1001).collect(),
        });
        let status = Messages::last_messages(&service, too_many)
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }

    /// Shutdown acknowledges the sends queued before it and refuses later ones;
    /// after reopening the file, sequences continue without reuse.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_then_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, mut live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, direct) = (groups.u, groups.direct);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..50 {
            let service = service.clone();
            tasks.spawn(async move {
                Messages::send(&service, send_request(u[1], direct, &format!("m{i}"), "hi")).await
            });
        }
        // Shut down while sends are in flight: once the first is committed.
        live.recv().await.unwrap();
        service.shutdown().await;
        let mut acked = 0;
        while let Some(result) = tasks.join_next().await {
            match result.unwrap() {
                Ok(_) => acked += 1,
                Err(status) => assert_eq!(status.code(), Code::Unavailable),
            }
        }
        let late = Messages::send(&service, send_request(u[1], direct, "late", "hi"))
            .await
            .unwrap_err();
        assert_eq!(late.code(), Code::Unavailable);
        println!(
            "{acked} of 50 sends acknowledged before shutdown, {} commits",
            service.commit_count()
        );
        assert!(acked >= 1 && service.max_batch_seen() >= 1);
        drop(service);

        let (bus, _live) = RecordingBus::new();
        let service = open_service_with(&dir, bus, &groups).await;
        assert_eq!(sync_len(&service, u[2]).await, acked);
        let response = Messages::send(&service, send_request(u[2], direct, "after", "hi"))
            .await
            .unwrap()
            .into_inner();
        assert!(!response.duplicate);
        let events = Messages::sync(
            &service,
            Request::new(SyncRequest {
                user_id: u[1],
                after: 0,
                limit: 0,
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .events;
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=acked as u64 + 1).collect::<Vec<_>>());
        service.shutdown().await;
    }

    /// Invalidating a conversation's members makes the next send ask group-svc
    /// again (the cache itself is exercised by every other test).
    #[tokio::test]
    async fn invalidate_members_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, direct) = (groups.u, groups.direct);
        Messages::send(&service, send_request(u[1], direct, "a", "hi"))
            .await
            .unwrap();
        service.invalidate_members(direct);
        Messages::send(&service, send_request(u[2], direct, "b", "hi"))
            .await
            .unwrap();
        assert_eq!(sync_len(&service, u[1]).await, 2);
    }

    /// Sync returns the user's head: 0 before any event, then the last seq, also
    /// when the page stops short of it or the cursor is beyond it.
    #[tokio::test]
    async fn sync_returns_head() {
        let dir = tempfile::tempdir().unwrap();
        let (bus, _live) = RecordingBus::new();
        let (service, groups) = open_service(&dir, bus).await;
        let (u, direct) = (groups.u, groups.direct);
        let sync = |after, limit| {
            let request = Request::new(SyncRequest {
                user_id: u[2],
                after,
                limit,
            });
            let service = service.clone();
            async move {
                Messages::sync(&service, request)
                    .await
                    .unwrap()
                    .into_inner()
            }
        };
        let empty = sync(0, 0).await;
        assert_eq!((empty.events.len(), empty.head), (0, 0));
        for i in 0..3 {
            Messages::send(&service, send_request(u[1], direct, &format!("m{i}"), "hi"))
                .await
                .unwrap();
        }
        let first = sync(0, 1).await;
        assert_eq!(
            (first.events.len(), first.has_more, first.head),
            (1, true, 3)
        );
        let all = sync(0, 0).await;
        assert_eq!((all.events.len(), all.has_more, all.head), (3, false, 3));
        let beyond = sync(7, 0).await;
        assert_eq!(
            (beyond.events.len(), beyond.has_more, beyond.head),
            (0, false, 3)
        );
    }
}
