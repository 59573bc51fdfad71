//! The distributed mode's send path: a durable log on NATS JetStream in front of
//! the group-commit writer (DESIGN.md sections 3 to 5).
//!
//! - **Front** ([`LogFront`], the `Messages` service of every message process).
//!   A write (`Send`, `AppendNotice`, `UpdateReceipts`) becomes a [`LogRecord`]
//!   appended to stream `CONFAB_LOG` on subject `confab.log.<partition>`, the
//!   partition of its conversation, with an acknowledged publish; a send carries
//!   `Nats-Msg-Id = <sender>:<client_msg_id>`, so that JetStream drops a retry
//!   within its duplicate window. The front then waits for the partition
//!   owner's answer on its own reply subject and only then answers the caller:
//!   an acknowledgement means the message is in the log *and* committed in the
//!   message store. Reads go straight to the store.
//! - **Owner.** Each partition is owned by one message process at a time, through
//!   a lease in the KV bucket `confab_log_partitions` (key `p<n>`, renewed every
//!   third of its TTL; a process that cannot renew stops consuming before the
//!   lease can expire). The owner reads its partitions through durable pull
//!   consumers (`writer-<n>`), prepares each record in log order (validation,
//!   membership) and queues it for its writer in that order, so the writer's
//!   group commit assigns ids in log order: one ordering point per conversation.
//!   After the commit it answers the front and acknowledges the record; a crash
//!   before that leaves the record unacknowledged, and the next owner replays it
//!   (the writer's own dedup, by `(sender, client_msg_id)` forever, makes the
//!   replay harmless). Processes share the partitions: each takes at most its
//!   fair share (partitions / live message processes, counted by member keys
//!   `m.<node>` in the same bucket) and gives back what is above it.
//! - **Fan-out** happens in the owner's writer transaction: the message, and an
//!   event in every member's sequence. Several owners may number events of the
//!   same user; the store serializes them per user (PostgreSQL row locks on the
//!   user's head), so each sequence stays gap-free. The committed events go to
//!   the gateway nodes through the live bus (`confab_common::nats_bus`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, AckKind, consumer, kv, stream};
use confab_proto::bus::v1::{LogError, LogOutcome, LogRecord, log_outcome, log_record};
use confab_proto::message::v1::messages_server::Messages;
use confab_proto::message::v1::{
    AppendNoticeRequest, AppendNoticeResponse, HistoryRequest, HistoryResponse,
    LastMessagesRequest, LastMessagesResponse, ReceiptsRequest, SendRequest, SendResponse,
    SyncRequest, SyncResponse, UnreadCountsRequest, UnreadCountsResponse, UpdateReceiptsRequest,
    UpdateReceiptsResponse,
};
use confab_proto::v1::ReceiptsResponse;
use futures::StreamExt as _;
use parking_lot::Mutex;
use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

use crate::error::MessageError;
use crate::grpc::{notice_response, receipts_response, send_response};
use crate::writer::{self, Command, Outcome, Queued};
use crate::{MessageService, SendInput};

/// The JetStream stream holding the log.
pub const STREAM: &str = "CONFAB_LOG";
/// The KV bucket of partition leases and message-process membership.
pub const LEASE_BUCKET: &str = "confab_log_partitions";
/// Core NATS subject on which owners announce committed membership changes, so
/// that every message process drops its cached view of the conversation.
const MEMBERS_CHANGED: &str = "confab.members.changed";
/// Records a partition owner holds between reading and acknowledging: bounds
/// its memory when the writer or the store is slow.
const MAX_IN_FLIGHT: usize = 4096;

/// Settings of the log; the defaults are safe for one JetStream server.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Number of partitions of the log: the unit of ownership (fixed for the
    /// life of a deployment: a conversation's partition is its id's hash modulo
    /// this).
    pub partitions: u32,
    /// JetStream replicas of the stream (1 for one server; 3 in a cluster makes
    /// an appended record survive the loss of a machine).
    pub replicas: usize,
    /// How long records stay in the log once written (the store holds history).
    pub max_age: Duration,
    /// JetStream's duplicate window for `Nats-Msg-Id`; Confab's own dedup (in
    /// the store) holds beyond it, forever.
    pub duplicate_window: Duration,
    /// How long a record may stay unacknowledged with its consumer before
    /// JetStream redelivers it: after a partition owner dies, its records wait
    /// this long. A redelivery of a record still in work is harmless (the
    /// writer dedups sends and notices, watermarks only move forward).
    pub ack_wait: Duration,
    /// Most unacknowledged records per partition consumer.
    pub max_ack_pending: i64,
    /// Lifetime of a partition lease without renewal: how long the partitions of
    /// a dead process wait for a new owner.
    pub lease_ttl: Duration,
    /// How long the front waits for the owner's answer before telling the caller
    /// to retry (the record stays in the log and is committed later).
    pub answer_timeout: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            partitions: 16,
            replicas: 1,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(5),
            max_ack_pending: 10_000,
            lease_ttl: Duration::from_secs(4),
            answer_timeout: Duration::from_secs(10),
        }
    }
}

/// Setting up the log failed.
#[derive(Debug, thiserror::Error)]
#[error("message log set-up failed: {0}")]
pub struct LogSetupError(String);

fn setup_error(what: &str, error: impl std::fmt::Display) -> LogSetupError {
    LogSetupError(format!("{what}: {error}"))
}

/// The `Messages` service of a message process in the distributed mode; owns
/// the partition leases and consumers of the process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct LogFront {
    inner: Arc<FrontInner>,
}

#[derive(Debug)]
struct FrontInner {
    /// The local service: reads, and the writer the owned partitions feed.
    service: MessageService,
    js: jetstream::Context,
    client: async_nats::Client,
    config: LogConfig,
    /// `confab.reply.<node id>`: this process's answers arrive under it.
    reply_prefix: String,
    next_request: AtomicU64,
    /// Callers waiting for an owner's answer, by request number.
    waiting: Mutex<HashMap<u64, oneshot::Sender<LogOutcome>>>,
    /// Stops the reply router, the membership listener and the partitions.
    cancel: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
}

impl LogFront {
    /// Creates the stream and the lease bucket if missing, subscribes to this
    /// process's replies and starts taking partitions.
    ///
    /// `node_id` is the process's leased Snowflake node id (unique among live
    /// processes), `node` its name.
    ///
    /// # Errors
    ///
    /// Fails when NATS refuses the stream, the bucket or a subscription.
    pub async fn start(
        service: MessageService,
        client: async_nats::Client,
        node_id: u16,
        node: &str,
        config: LogConfig,
    ) -> Result<Self, LogSetupError> {
        let js = jetstream::new(client.clone());
        let stream = ensure_stream(&js, &config).await?;
        let leases = js
            .create_or_update_key_value(kv::Config {
                bucket: LEASE_BUCKET.to_owned(),
                history: 1,
                max_age: config.lease_ttl,
                storage: stream::StorageType::File,
                num_replicas: config.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| setup_error("lease bucket", e))?;
        let reply_prefix = format!("confab.reply.{node_id}");
        let replies = client
            .subscribe(format!("{reply_prefix}.*"))
            .await
            .map_err(|e| setup_error("reply subscription", e))?;
        let changes = client
            .subscribe(MEMBERS_CHANGED)
            .await
            .map_err(|e| setup_error("membership subscription", e))?;
        let front = Self {
            inner: Arc::new(FrontInner {
                service,
                js,
                client,
                config,
                reply_prefix,
                next_request: AtomicU64::new(1),
                waiting: Mutex::new(HashMap::new()),
                cancel: CancellationToken::new(),
                tasks: Mutex::new(JoinSet::new()),
            }),
        };
        let mut tasks = front.inner.tasks.lock();
        tasks.spawn(route_replies(Arc::clone(&front.inner), replies));
        tasks.spawn(forget_changes(Arc::clone(&front.inner), changes));
        let partitions = Partitions {
            front: Arc::clone(&front.inner),
            leases,
            stream,
            node: node.to_owned(),
        };
        tasks.spawn(partitions.run());
        drop(tasks);
        Ok(front)
    }

    /// Gives back the partitions (after their in-flight records are committed
    /// and acknowledged) and stops every task of the log.
    pub async fn shutdown(&self) {
        self.inner.cancel.cancel();
        let mut tasks = std::mem::take(&mut *self.inner.tasks.lock());
        while tasks.join_next().await.is_some() {}
    }

    /// Appends a record for `conversation_id` and waits for its owner's answer.
    async fn submit(
        &self,
        conversation_id: i64,
        kind: log_record::Kind,
        msg_id: Option<String>,
    ) -> Result<log_outcome::Kind, Status> {
        let inner = &self.inner;
        let request = inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        inner.waiting.lock().insert(request, tx);
        // Removes the entry whatever happens below.
        let _waiting = WaitingGuard { inner, request };
        let record = LogRecord {
            kind: Some(kind),
            reply_to: format!("{}.{request}", inner.reply_prefix),
            accepted_at_us: now_us(),
        };
        let subject = format!(
            "confab.log.{}",
            partition_of(conversation_id, inner.config.partitions)
        );
        let payload = bytes::Bytes::from(record.encode_to_vec());
        let ack = append(&inner.js, &subject, payload.clone(), msg_id.as_deref()).await?;
        if ack.duplicate {
            // A retry of a send JetStream still remembers: the original's answer
            // went to whoever appended it. Append ours without the id: the
            // writer finds the original by its client_msg_id and answers us.
            metrics::counter!("confab_log_duplicate_appends_total").increment(1);
            let unique = format!("{}:{request}", msg_id.unwrap_or_default());
            append(&inner.js, &subject, payload, Some(&unique)).await?;
        }
        match tokio::time::timeout(inner.config.answer_timeout, rx).await {
            Ok(Ok(LogOutcome { kind: Some(kind) })) => Ok(kind),
            Ok(Ok(LogOutcome { kind: None })) => {
                Err(Status::internal("the partition owner sent an empty answer"))
            }
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("confab_log_answer_timeouts_total").increment(1);
                Err(Status::unavailable(
                    "the message is in the log but not yet committed; retry with the same client_msg_id",
                ))
            }
        }
    }
}

/// Drops a waiting caller's entry when its request ends, answered or not.
struct WaitingGuard<'a> {
    inner: &'a FrontInner,
    request: u64,
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.inner.waiting.lock().remove(&self.request);
    }
}

/// Appends `payload` to the log with an acknowledged publish, retrying a lost
/// acknowledgement with the same message id.
async fn append(
    js: &jetstream::Context,
    subject: &str,
    payload: bytes::Bytes,
    msg_id: Option<&str>,
) -> Result<jetstream::publish::PublishAck, Status> {
    const ATTEMPTS: u32 = 3;
    let mut last_error = None;
    for attempt in 0..ATTEMPTS {
        let mut publish = jetstream::message::PublishMessage::build().payload(payload.clone());
        if let Some(id) = msg_id {
            publish = publish.message_id(id);
        }
        let result = match js.send_publish(subject.to_owned(), publish).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match result {
            Ok(ack) => return Ok(ack),
            Err(error) => {
                tracing::warn!(error = %error, attempt, "append to the message log failed");
                last_error = Some(error);
                tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
            }
        }
    }
    metrics::counter!("confab_log_append_failures_total").increment(1);
    Err(Status::unavailable(format!(
        "the message log is unavailable ({}); retry with the same client_msg_id",
        last_error.map_or_else(String::new, |e| e.to_string())
    )))
}

/// Creates the log's stream, or updates its settings.
async fn ensure_stream(
    js: &jetstream::Context,
    config: &LogConfig,
) -> Result<stream::Stream, LogSetupError> {
    let settings = stream::Config {
        name: STREAM.to_owned(),
        subjects: vec!["confab.log.*".to_owned()],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        num_replicas: config.replicas,
        max_age: config.max_age,
        duplicate_window: config.duplicate_window,
        ..Default::default()
    };
    if js.get_stream(STREAM).await.is_ok() {
        js.update_stream(settings)
            .await
            .map_err(|e| setup_error("stream update", e))?;
    } else {
        js.create_stream(settings)
            .await
            .map_err(|e| setup_error("stream creation", e))?;
    }
    js.get_stream(STREAM)
        .await
        .map_err(|e| setup_error("stream", e))
}

/// Hands each owner's answer to the caller waiting for it.
async fn route_replies(inner: Arc<FrontInner>, mut replies: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            () = inner.cancel.cancelled() => return,
            message = replies.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        let request = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|token| token.parse::<u64>().ok());
        let (Some(request), Ok(outcome)) = (request, LogOutcome::decode(message.payload)) else {
            tracing::warn!(subject = %message.subject, "undecodable answer on the reply subject");
            continue;
        };
        if let Some(waiter) = inner.waiting.lock().remove(&request) {
            let _ = waiter.send(outcome);
        }
    }
}

/// Drops the cached membership of conversations whose membership an owner
/// changed.
async fn forget_changes(inner: Arc<FrontInner>, mut changes: async_nats::Subscriber) {
    loop {
        let message = tokio::select! {
            () = inner.cancel.cancelled() => return,
            message = changes.next() => match message {
                Some(message) => message,
                None => return,
            },
        };
        match AppendNoticeRequest::decode(message.payload) {
            Ok(AppendNoticeRequest {
                change: Some(change),
            }) => {
                inner.service.forget_change(&change);
            }
            _ => tracing::warn!("undecodable membership change announcement"),
        }
    }
}

/// Returns the partition of a conversation: a hash of its id (Snowflake ids
/// carry a sequence in their low bits, mostly 0, so the id itself spreads badly).
pub fn partition_of(conversation_id: i64, partitions: u32) -> u32 {
    // splitmix64's finalizer.
    let mut x = conversation_id as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x % u64::from(partitions.max(1))) as u32
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Returns the `Instant` of a wall-clock time taken by another process.
fn instant_of(unix_us: i64) -> Instant {
    let age_us = now_us().saturating_sub(unix_us).max(0) as u64;
    Instant::now()
        .checked_sub(Duration::from_micros(age_us))
        .unwrap_or_else(Instant::now)
}

/// The partition leases of this process, and a consumer per owned partition.
struct Partitions {
    front: Arc<FrontInner>,
    leases: kv::Store,
    stream: stream::Stream,
    node: String,
}

/// A partition this process owns.
struct Owned {
    /// Revision of the lease entry, for the conditional renewal.
    revision: u64,
    /// The lease is ours until then (renewals move it).
    valid_until: Instant,
    /// Stops the partition's consumer.
    stop: CancellationToken,
    consumer: tokio::task::JoinHandle<()>,
}

impl Partitions {
    async fn run(self) {
        let ttl = self.front.config.lease_ttl;
        let mut owned: HashMap<u32, Owned> = HashMap::new();
        let mut tick = tokio::time::interval(ttl / 4);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let member_key = format!("m.{}", self.node);
        loop {
            tokio::select! {
                () = self.front.cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(error) = self.leases.put(&member_key, self.node.clone().into()).await {
                tracing::warn!(error = %error, "message process membership not renewed");
            }
            self.renew(&mut owned).await;
            let fair = self.fair_share().await;
            self.rebalance(&mut owned, fair).await;
            metrics::gauge!("confab_log_partitions_owned").set(owned.len() as f64);
        }
        for (partition, lease) in owned.drain() {
            self.release(partition, lease).await;
        }
        let _ = self.leases.delete(&member_key).await;
        metrics::gauge!("confab_log_partitions_owned").set(0.0);
    }

    /// Renews every owned lease; drops the partitions whose lease is lost or
    /// about to lapse unrenewed.
    async fn renew(&self, owned: &mut HashMap<u32, Owned>) {
        let ttl = self.front.config.lease_ttl;
        let mut lost = Vec::new();
        for (&partition, lease) in owned.iter_mut() {
            let started = Instant::now();
            match self
                .leases
                .update(
                    lease_key(partition),
                    self.node.clone().into(),
                    lease.revision,
                )
                .await
            {
                Ok(revision) => {
                    lease.revision = revision;
                    lease.valid_until = started + ttl;
                }
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition, "partition lease taken by another process");
                    lost.push(partition);
                }
                Err(error) => {
                    tracing::warn!(partition, error = %error, "partition lease not renewed");
                    // Stop a safe margin before the lease could lapse.
                    if Instant::now() + ttl / 4 >= lease.valid_until {
                        lost.push(partition);
                    }
                }
            }
        }
        for partition in lost {
            if let Some(lease) = owned.remove(&partition) {
                lease.stop.cancel();
                let _ = lease.consumer.await;
                metrics::counter!("confab_log_partitions_lost_total").increment(1);
            }
        }
    }

    /// Returns how many partitions this process should own: the partitions
    /// divided by the live message processes, rounded up.
    async fn fair_share(&self) -> usize {
        let partitions = self.front.config.partitions as usize;
        let members = match self.leases.keys().await {
            Ok(keys) => {
                keys.filter_map(|key| async move { key.ok().filter(|k| k.starts_with("m.")) })
                    .count()
                    .await
            }
            Err(_) => 1,
        };
        partitions.div_ceil(members.max(1))
    }

    /// Takes free partitions up to `fair`, gives back those above it.
    async fn rebalance(&self, owned: &mut HashMap<u32, Owned>, fair: usize) {
        while owned.len() > fair {
            let Some(&partition) = owned.keys().max() else {
                break;
            };
            if let Some(lease) = owned.remove(&partition) {
                self.release(partition, lease).await;
            }
        }
        if owned.len() >= fair {
            return;
        }
        for partition in 0..self.front.config.partitions {
            if owned.len() >= fair {
                break;
            }
            if owned.contains_key(&partition) {
                continue;
            }
            let started = Instant::now();
            let Ok(revision) = self
                .leases
                .create(lease_key(partition), self.node.clone().into())
                .await
            else {
                continue;
            };
            match self.start_consumer(partition).await {
                Ok((stop, consumer)) => {
                    tracing::info!(partition, node = %self.node, "took log partition");
                    owned.insert(
                        partition,
                        Owned {
                            revision,
                            valid_until: started + self.front.config.lease_ttl,
                            stop,
                            consumer,
                        },
                    );
                }
                Err(error) => {
                    tracing::warn!(partition, error = %error, "partition consumer not started");
                    let _ = self.leases.delete(lease_key(partition)).await;
                }
            }
        }
    }

    /// Stops a partition's consumer once its in-flight records are answered,
    /// then frees the lease for another process.
    async fn release(&self, partition: u32, lease: Owned) {
        lease.stop.cancel();
        let _ = lease.consumer.await;
        if let Err(error) = self.leases.delete(lease_key(partition)).await {
            tracing::warn!(partition, error = %error, "partition lease not released");
        }
        tracing::info!(partition, node = %self.node, "gave back log partition");
    }

    async fn start_consumer(
        &self,
        partition: u32,
    ) -> Result<(CancellationToken, tokio::task::JoinHandle<()>), LogSetupError> {
        let config = &self.front.config;
        let name = format!("writer-{partition}");
        let consumer: consumer::PullConsumer = self
            .stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: format!("confab.log.{partition}"),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_ack_pending: config.max_ack_pending,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| setup_error("partition consumer", e))?;
        let stop = self.front.cancel.child_token();
        let task = tokio::spawn(consume(
            Arc::clone(&self.front),
            partition,
            consumer,
            stop.clone(),
        ));
        Ok((stop, task))
    }
}

fn lease_key(partition: u32) -> String {
    format!("p{partition}")
}

/// A record queued for the writer, waiting for its commit.
struct InFlight {
    message: jetstream::Message,
    reply_to: String,
    /// The membership change of a notice, announced after its commit.
    change: Option<AppendNoticeRequest>,
    conversation_id: i64,
    queued: Queued,
}

/// Reads one partition in log order until `stop`, queueing each record for the
/// writer; a second task answers and acknowledges them in the same order.
async fn consume(
    front: Arc<FrontInner>,
    partition: u32,
    consumer: consumer::PullConsumer,
    stop: CancellationToken,
) {
    let (in_flight, mut commits) = mpsc::channel::<InFlight>(MAX_IN_FLIGHT);
    let answering = {
        let front = Arc::clone(&front);
        tokio::spawn(async move {
            while let Some(record) = commits.recv().await {
                answer(&front, record).await;
            }
        })
    };
    'reading: while !stop.is_cancelled() {
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(256)
            .heartbeat(Duration::from_secs(2))
            .expires(Duration::from_secs(10))
            .messages()
            .await
        {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(partition, error = %error, "partition read failed; retrying");
                tokio::select! {
                    () = stop.cancelled() => break 'reading,
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue 'reading,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = stop.cancelled() => break 'reading,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => {
                    observe(partition, &message);
                    if let Some(record) = queue(&front, message).await
                        && in_flight.send(record).await.is_err()
                    {
                        break 'reading;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(partition, error = %error, "partition read error");
                }
                None => continue 'reading,
            }
        }
    }
    drop(in_flight);
    let _ = answering.await;
}

/// Records the partition's lag (records in the log not yet delivered to its
/// owner) and counts redeliveries (records a dead or slow owner left
/// unacknowledged).
fn observe(partition: u32, message: &jetstream::Message) {
    let Ok(info) = message.info() else {
        return;
    };
    let partition = partition.to_string();
    metrics::gauge!("confab_log_consumer_pending", "partition" => partition.clone())
        .set(info.pending as f64);
    if info.delivered > 1 {
        metrics::counter!("confab_log_redeliveries_total", "partition" => partition).increment(1);
    }
}

/// Prepares one record and queues it for the writer; answers at once what is
/// refused before the writer.
async fn queue(front: &FrontInner, message: jetstream::Message) -> Option<InFlight> {
    let record = match LogRecord::decode(message.payload.clone()) {
        Ok(record) => record,
        Err(error) => {
            tracing::warn!(error = %error, "undecodable log record dropped");
            let _ = message.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let accepted_at = instant_of(record.accepted_at_us);
    let service = &front.service;
    let mut change = None;
    let (conversation_id, prepared) = match record.kind {
        Some(log_record::Kind::Send(send)) => (
            send.conversation_id,
            service
                .prepare_send(SendInput::from(send), accepted_at)
                .await
                .map(Command::Send),
        ),
        Some(log_record::Kind::Notice(notice)) => {
            let conversation_id = notice
                .change
                .as_ref()
                .and_then(|c| c.conversation.as_ref())
                .map_or(0, |c| c.id);
            let prepared = notice
                .change
                .clone()
                .ok_or(MessageError::InvalidArgument("change is required"))
                .and_then(|c| service.prepare_notice(c))
                .map(Command::Notice);
            change = Some(notice);
            (conversation_id, prepared)
        }
        Some(log_record::Kind::Receipts(receipts)) => (
            receipts.conversation_id,
            service
                .prepare_receipts(
                    receipts.user_id,
                    receipts.conversation_id,
                    receipts.delivered_up_to,
                    receipts.read_up_to,
                )
                .await
                .map(Command::Receipts),
        ),
        None => {
            let _ = message.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let queued = match prepared {
        Ok(command) => match service.writer() {
            Ok(handle) => writer::enqueue(&handle, command).await,
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    match queued {
        Ok(queued) => Some(InFlight {
            message,
            reply_to: record.reply_to,
            change,
            conversation_id,
            queued,
        }),
        Err(error) => {
            settle(front, &message, &record.reply_to, Err(error)).await;
            None
        }
    }
}

/// Waits for a queued record's commit, answers the front and acknowledges it.
async fn answer(front: &FrontInner, record: InFlight) {
    let outcome = record.queued.await_outcome().await;
    if outcome.is_ok()
        && let Some(change) = &record.change
    {
        // Other processes' caches may hold the conversation's old membership.
        let _ = front
            .client
            .publish(MEMBERS_CHANGED, change.encode_to_vec().into())
            .await;
    }
    let outcome = outcome.map(|outcome| match outcome {
        Outcome::Sent(sent) => log_outcome::Kind::Send(send_response(sent)),
        Outcome::Notice(written) => log_outcome::Kind::Notice(notice_response(written)),
        Outcome::Receipts(moved) => {
            log_outcome::Kind::Receipts(receipts_response(record.conversation_id, moved))
        }
    });
    settle(front, &record.message, &record.reply_to, outcome).await;
}

/// Answers the front (when someone waits) and acknowledges the record; a
/// failure the record may not fail with again later (the store or group-svc
/// unreachable, the writer stopping) is answered but not acknowledged, so the
/// record is committed on redelivery.
async fn settle(
    front: &FrontInner,
    message: &jetstream::Message,
    reply_to: &str,
    outcome: Result<log_outcome::Kind, MessageError>,
) {
    let retry_later = matches!(
        &outcome,
        Err(MessageError::CommitFailed(_)
            | MessageError::GroupsUnavailable(_)
            | MessageError::ShuttingDown
            | MessageError::Store(_))
    );
    let kind = outcome.unwrap_or_else(|error| {
        let status = Status::from(error);
        log_outcome::Kind::Error(LogError {
            code: status.code() as i32,
            message: status.message().to_owned(),
        })
    });
    if !reply_to.is_empty() {
        let payload = LogOutcome { kind: Some(kind) }.encode_to_vec();
        if let Err(error) = front
            .client
            .publish(reply_to.to_owned(), payload.into())
            .await
        {
            tracing::debug!(error = %error, "answer to the front not sent");
        }
    }
    let ack = if retry_later {
        metrics::counter!("confab_log_redeliveries_requested_total").increment(1);
        AckKind::Nak(Some(Duration::from_millis(500)))
    } else {
        AckKind::Ack
    };
    if let Err(error) = message.ack_with(ack).await {
        // Redelivered after ack_wait; the writer's dedup makes that harmless.
        tracing::warn!(error = %error, "log record not acknowledged");
    }
}

impl From<SendRequest> for SendInput {
    fn from(request: SendRequest) -> Self {
        Self {
            sender_id: request.sender_id,
            sender_device: request.sender_device,
            conversation_id: request.conversation_id,
            client_msg_id: request.client_msg_id,
            text: request.text,
        }
    }
}

/// Turns an owner's answer of the wrong kind or an error into a status.
fn unexpected(kind: log_outcome::Kind) -> Status {
    match kind {
        log_outcome::Kind::Error(error) => Status::new(Code::from(error.code), error.message),
        _ => Status::internal("the partition owner answered with another kind"),
    }
}

#[tonic::async_trait]
impl Messages for LogFront {
    async fn send(&self, request: Request<SendRequest>) -> Result<Response<SendResponse>, Status> {
        let request = request.into_inner();
        // Refuse malformed sends before they reach the log.
        let input = SendInput::from(request.clone());
        self.inner.service.validate_send(&input)?;
        let msg_id = format!("{}:{}", request.sender_id, request.client_msg_id);
        let conversation_id = request.conversation_id;
        match self
            .submit(
                conversation_id,
                log_record::Kind::Send(request),
                Some(msg_id),
            )
            .await?
        {
            log_outcome::Kind::Send(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        Messages::history(&self.inner.service, request).await
    }

    async fn sync(&self, request: Request<SyncRequest>) -> Result<Response<SyncResponse>, Status> {
        Messages::sync(&self.inner.service, request).await
    }

    async fn last_messages(
        &self,
        request: Request<LastMessagesRequest>,
    ) -> Result<Response<LastMessagesResponse>, Status> {
        Messages::last_messages(&self.inner.service, request).await
    }

    async fn append_notice(
        &self,
        request: Request<AppendNoticeRequest>,
    ) -> Result<Response<AppendNoticeResponse>, Status> {
        let request = request.into_inner();
        let conversation_id = request
            .change
            .as_ref()
            .and_then(|c| c.conversation.as_ref())
            .map(|c| c.id)
            .filter(|id| *id > 0)
            .ok_or_else(|| Status::invalid_argument("change.conversation.id is required"))?;
        match self
            .submit(conversation_id, log_record::Kind::Notice(request), None)
            .await?
        {
            log_outcome::Kind::Notice(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    async fn update_receipts(
        &self,
        request: Request<UpdateReceiptsRequest>,
    ) -> Result<Response<UpdateReceiptsResponse>, Status> {
        let request = request.into_inner();
        let conversation_id = request.conversation_id;
        match self
            .submit(conversation_id, log_record::Kind::Receipts(request), None)
            .await?
        {
            log_outcome::Kind::Receipts(response) => Ok(Response::new(response)),
            other => Err(unexpected(other)),
        }
    }

    async fn receipts(
        &self,
        request: Request<ReceiptsRequest>,
    ) -> Result<Response<ReceiptsResponse>, Status> {
        Messages::receipts(&self.inner.service, request).await
    }

    async fn unread_counts(
        &self,
        request: Request<UnreadCountsRequest>,
    ) -> Result<Response<UnreadCountsResponse>, Status> {
        Messages::unread_counts(&self.inner.service, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_spread_snowflake_ids() {
        // Snowflake ids of one millisecond range differ only in their low bits.
        let mut counts = [0_u32; 16];
        for n in 0..1600_i64 {
            let id = (1_700_000_000_000_i64 + n) << 22;
            counts[partition_of(id, 16) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 50), "{counts:?}");
        assert_eq!(partition_of(42, 1), 0);
        assert_eq!(partition_of(-7, 0), 0);
    }
}
