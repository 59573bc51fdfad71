//! The live bus of the distributed mode: live events travel from the processes
//! that commit them (message-svc, presence-svc) to the gateway nodes over core
//! NATS.
//!
//! Subjects:
//! - `confab.node.<node>`: the events of the users whose devices `<node>` holds
//!   (session-svc `LookupUsers` says which node holds which device).
//! - `confab.live.all`: channel posts and presence changes; every gateway gets
//!   them and its hub keeps those its connections follow.
//!
//! Each NATS message is one `confab.bus.v1.LiveBatch`, in publish order.
//!
//! Core NATS delivers at most once, and events of one user can come from several
//! publishing processes. Nothing here retries a lost event: the gateway engine
//! notices a gap in a user's sequence and fills it from the store, and the
//! gateway's `Hub::resync_all` makes every connection do so after the NATS
//! connection comes back. Channel posts and
//! presence changes are in no sequence: one lost on the way is lost.
//!
//! Node names are subject tokens, so they are restricted to `[A-Za-z0-9_-]`
//! ([`is_valid_node`]); the binary refuses others at start-up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confab_proto::bus::v1::{AudienceKind, LiveBatch, LiveEnvelope};
use confab_proto::session::v1::LookupUsersRequest;
use confab_proto::session::v1::sessions_client::SessionsClient;
use prost::Message as _;
// tonic re-exports tokio-stream for its generated code; this crate has no direct
// dependency on a stream library, and merging two subscriptions needs one.
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;

use crate::bus::{Audience, LiveBus, LiveEvent};
use crate::channel::GrpcChannel;

/// Subject of the events every gateway node gets (channel posts, presence).
pub const BROADCAST_SUBJECT: &str = "confab.live.all";

/// Events [`NatsBus::publish`] holds before it drops new ones.
pub const QUEUE_CAPACITY: usize = 65_536;

/// Events the publishing task takes from the queue at once: one session-svc
/// lookup for all of them.
const MAX_BATCH: usize = 1_024;

/// Attempts of one session-svc lookup before the batch's user events are dropped.
const LOOKUP_ATTEMPTS: u32 = 3;

/// Wait before the second lookup attempt; doubled for each further one.
const LOOKUP_BACKOFF: Duration = Duration::from_millis(50);

/// Longest wait for one lookup answer.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Shortest interval between two warnings about the same kind of loss.
const WARN_INTERVAL_MS: i64 = 10_000;

/// Room left in each NATS message for the protocol's own bytes.
const PAYLOAD_HEADROOM: usize = 1_024;

/// Returns the subject of the events for the devices `node` holds:
/// `confab.node.<node>`.
///
/// `node` must satisfy [`is_valid_node`]; another name would not be one subject
/// token.
pub fn node_subject(node: &str) -> String {
    debug_assert!(
        is_valid_node(node),
        "node name {node:?} is not a subject token"
    );
    format!("confab.node.{node}")
}

/// Returns whether `node` may name a gateway node: 1 to 64 characters of
/// `[A-Za-z0-9_-]`, so that it is one NATS subject token.
pub fn is_valid_node(node: &str) -> bool {
    (1..=64).contains(&node.len())
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A [`LiveBus`] that publishes to gateway nodes over NATS.
///
/// [`publish`](LiveBus::publish) only queues; a task owned by the bus resolves
/// the nodes of the users and publishes. The task ends when the bus is dropped,
/// after publishing what is queued.
#[derive(Debug)]
pub struct NatsBus {
    /// Sending end of the queue the publishing task drains; bounded, so a stalled
    /// NATS connection costs dropped events rather than memory.
    queue: mpsc::Sender<Arc<LiveEvent>>,
    /// Limits the warnings about a full queue.
    full_warnings: WarnLimiter,
}

impl NatsBus {
    /// Returns a bus publishing on `client`, looking devices up in `sessions`,
    /// and starts its publishing task.
    ///
    /// Must be called within a Tokio runtime.
    pub fn new(client: async_nats::Client, sessions: SessionsClient<GrpcChannel>) -> Arc<Self> {
        let (queue, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let publisher = Publisher {
            client,
            sessions,
            lookup_warnings: WarnLimiter::default(),
            publish_warnings: WarnLimiter::default(),
        };
        tokio::spawn(publisher.run(receiver));
        Arc::new(Self {
            queue,
            full_warnings: WarnLimiter::default(),
        })
    }
}

impl LiveBus for NatsBus {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        let mut dropped = 0u64;
        for event in events {
            if self.queue.try_send(event.clone()).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            metrics::counter!("confab_live_dropped_total", "reason" => "queue_full")
                .increment(dropped);
            if let Some(since_last) = self.full_warnings.note(dropped) {
                tracing::warn!(
                    dropped = since_last,
                    "live queue full; events dropped (devices recover them from the store)"
                );
            }
        }
    }
}

/// The publishing task's state.
struct Publisher {
    /// Where batches go.
    client: async_nats::Client,
    /// Which node holds which device.
    sessions: SessionsClient<GrpcChannel>,
    /// Limits the warnings about failed lookups.
    lookup_warnings: WarnLimiter,
    /// Limits the warnings about failed publishes.
    publish_warnings: WarnLimiter,
}

impl Publisher {
    /// Drains the queue until every sender is gone.
    async fn run(mut self, mut queue: mpsc::Receiver<Arc<LiveEvent>>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
            self.publish_batch(&batch).await;
            batch.clear();
        }
    }

    /// Publishes one batch: one `LiveBatch` per node holding a device of one of
    /// its users, and one on the broadcast subject.
    async fn publish_batch(&mut self, batch: &[Arc<LiveEvent>]) {
        let mut user_ids: Vec<i64> = batch
            .iter()
            .filter_map(|event| match event.audience {
                Audience::User(user_id) => Some(user_id),
                Audience::Channel(_) | Audience::Watchers(_) => None,
            })
            .collect();
        user_ids.sort_unstable();
        user_ids.dedup();
        let user_events = batch.iter().filter(|event| is_user(event)).count();
        let nodes = if user_ids.is_empty() {
            Some(HashMap::new())
        } else {
            self.lookup(user_ids).await
        };
        if nodes.is_none() {
            metrics::counter!("confab_live_dropped_total", "reason" => "lookup_failed")
                .increment(user_events as u64);
        }

        let mut per_node: HashMap<&str, Vec<LiveEnvelope>> = HashMap::new();
        let mut broadcast = Vec::new();
        for event in batch {
            match event.audience {
                Audience::User(user_id) => {
                    let Some(held_by) = nodes.as_ref().and_then(|nodes| nodes.get(&user_id)) else {
                        continue;
                    };
                    let envelope = envelope(event);
                    for node in held_by {
                        per_node
                            .entry(node.as_str())
                            .or_default()
                            .push(envelope.clone());
                    }
                }
                Audience::Channel(_) | Audience::Watchers(_) => broadcast.push(envelope(event)),
            }
        }
        for (node, envelopes) in per_node {
            self.send(&node_subject(node), envelopes).await;
        }
        if !broadcast.is_empty() {
            self.send(BROADCAST_SUBJECT, broadcast).await;
        }
    }

    /// Returns the nodes holding a device of each user (users without a live
    /// device are absent), or `None` when session-svc did not answer after
    /// [`LOOKUP_ATTEMPTS`] tries.
    async fn lookup(&mut self, user_ids: Vec<i64>) -> Option<HashMap<i64, Vec<String>>> {
        let mut backoff = LOOKUP_BACKOFF;
        for attempt in 1..=LOOKUP_ATTEMPTS {
            let request = LookupUsersRequest {
                user_ids: user_ids.clone(),
            };
            let answer = tokio::time::timeout(LOOKUP_TIMEOUT, self.sessions.lookup_users(request));
            let failure = match answer.await {
                Ok(Ok(response)) => return Some(nodes_by_user(response.into_inner().devices)),
                Ok(Err(status)) => status.to_string(),
                Err(_) => "timed out".to_owned(),
            };
            if attempt == LOOKUP_ATTEMPTS {
                if let Some(batches) = self.lookup_warnings.note(1) {
                    tracing::warn!(
                        users = user_ids.len(),
                        batches,
                        error = %failure,
                        "device lookup failed; live user events dropped (devices recover them from the store)"
                    );
                }
                break;
            }
            tracing::debug!(attempt, error = %failure, "device lookup failed; retrying");
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        None
    }

    /// Publishes `envelopes` on `subject`, in order, in as few NATS messages as
    /// the server's payload limit allows.
    async fn send(&self, subject: &str, envelopes: Vec<LiveEnvelope>) {
        let limit = self
            .client
            .server_info()
            .max_payload
            .saturating_sub(PAYLOAD_HEADROOM)
            .max(PAYLOAD_HEADROOM);
        for chunk in chunks(envelopes, limit) {
            let count = chunk.events.len() as u64;
            let payload = chunk.encode_to_vec();
            match self
                .client
                .publish(subject.to_owned(), payload.into())
                .await
            {
                Ok(()) => metrics::counter!("confab_live_published_total").increment(count),
                Err(error) => {
                    metrics::counter!("confab_live_dropped_total", "reason" => "publish_failed")
                        .increment(count);
                    if let Some(failures) = self.publish_warnings.note(1) {
                        tracing::warn!(subject, failures, %error, "live publish failed");
                    }
                }
            }
        }
    }
}

fn is_user(event: &LiveEvent) -> bool {
    matches!(event.audience, Audience::User(_))
}

/// Groups the live devices by user: the distinct nodes holding each user's
/// devices. Invalid node names are skipped (they cannot be subjects).
fn nodes_by_user(devices: Vec<confab_proto::session::v1::LiveDevice>) -> HashMap<i64, Vec<String>> {
    let mut nodes: HashMap<i64, Vec<String>> = HashMap::new();
    for device in devices {
        if !is_valid_node(&device.node) {
            tracing::warn!(node = %device.node, user_id = device.user_id, "device on an invalid node name; skipped");
            continue;
        }
        let held_by = nodes.entry(device.user_id).or_default();
        if !held_by.contains(&device.node) {
            held_by.push(device.node);
        }
    }
    nodes
}

/// Splits `envelopes` into batches whose encoding stays under `limit` bytes
/// (an envelope larger than that alone goes alone), keeping their order.
fn chunks(envelopes: Vec<LiveEnvelope>, limit: usize) -> Vec<LiveBatch> {
    let mut batches = Vec::new();
    let mut current = LiveBatch::default();
    let mut size = 0;
    for envelope in envelopes {
        // One byte of field tag plus the length prefix.
        let len = envelope.encoded_len();
        let framed = 1 + prost::length_delimiter_len(len) + len;
        if !current.events.is_empty() && size + framed > limit {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += framed;
        current.events.push(envelope);
    }
    if !current.events.is_empty() {
        batches.push(current);
    }
    batches
}

/// Returns the wire form of `event`.
fn envelope(event: &LiveEvent) -> LiveEnvelope {
    let (kind, id) = match event.audience {
        Audience::User(id) => (AudienceKind::User, id),
        Audience::Channel(id) => (AudienceKind::Channel, id),
        Audience::Watchers(id) => (AudienceKind::Watchers, id),
    };
    LiveEnvelope {
        audience_kind: kind as i32,
        audience_id: id,
        event: Some(event.event.clone()),
        origin_device: event.origin_device.clone().unwrap_or_default(),
        accepted_at_us: wall_clock_us(event.accepted_at),
    }
}

/// Returns the wall-clock time of `instant`, in Unix microseconds.
fn wall_clock_us(instant: Instant) -> i64 {
    let wall = SystemTime::now()
        .checked_sub(instant.elapsed())
        .unwrap_or(UNIX_EPOCH);
    wall.duration_since(UNIX_EPOCH).map_or(0, |since| {
        i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
    })
}

/// Returns the [`Instant`] of a wall-clock time in Unix microseconds; a time in
/// the future (clock skew between machines) or beyond what `Instant` reaches
/// back to counts as now.
fn instant_of(accepted_at_us: i64) -> Instant {
    let now_us = wall_clock_us(Instant::now());
    let age = u64::try_from(now_us.saturating_sub(accepted_at_us)).unwrap_or(0);
    let now = Instant::now();
    now.checked_sub(Duration::from_micros(age)).unwrap_or(now)
}

/// Returns the event an envelope carries, or `None` when it names no audience
/// or carries no event.
fn live_event(envelope: LiveEnvelope) -> Option<LiveEvent> {
    let id = envelope.audience_id;
    let audience = match AudienceKind::try_from(envelope.audience_kind).ok()? {
        AudienceKind::User => Audience::User(id),
        AudienceKind::Channel => Audience::Channel(id),
        AudienceKind::Watchers => Audience::Watchers(id),
        AudienceKind::Unspecified => return None,
    };
    Some(LiveEvent {
        audience,
        event: envelope.event?,
        origin_device: Some(envelope.origin_device).filter(|device| !device.is_empty()),
        accepted_at: instant_of(envelope.accepted_at_us),
    })
}

/// Subscribes to the events for `node` (`confab.node.<node>`) and to the
/// broadcast subject (`confab.live.all`), and hands every event received to
/// `local` (the node's hub), in the order of each subject.
///
/// A message that does not decode is logged and dropped. The returned task runs
/// until the client closes; abort it to stop early.
///
/// # Errors
///
/// Fails when a subscription cannot be made (an invalid node name, a closed
/// client).
pub async fn subscribe_node(
    client: async_nats::Client,
    node: &str,
    local: Arc<dyn LiveBus>,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    if !is_valid_node(node) {
        return Err(async_nats::SubscribeError::new(
            async_nats::SubscribeErrorKind::InvalidSubject,
        ));
    }
    let own = client.subscribe(node_subject(node)).await?;
    let broadcast = client.subscribe(BROADCAST_SUBJECT).await?;
    let mut messages = own.merge(broadcast);
    let node = node.to_owned();
    Ok(tokio::spawn(async move {
        let malformed = WarnLimiter::default();
        while let Some(message) = messages.next().await {
            let batch = match LiveBatch::decode(message.payload) {
                Ok(batch) => batch,
                Err(error) => {
                    metrics::counter!("confab_live_dropped_total", "reason" => "malformed")
                        .increment(1);
                    if let Some(count) = malformed.note(1) {
                        tracing::warn!(%node, subject = %message.subject, count, %error, "undecodable live batch dropped");
                    }
                    continue;
                }
            };
            let received = batch.events.len();
            let events: Vec<Arc<LiveEvent>> = batch
                .events
                .into_iter()
                .filter_map(live_event)
                .map(Arc::new)
                .collect();
            metrics::counter!("confab_live_received_total").increment(events.len() as u64);
            if events.len() < received {
                let skipped = (received - events.len()) as u64;
                metrics::counter!("confab_live_dropped_total", "reason" => "malformed")
                    .increment(skipped);
                if let Some(count) = malformed.note(skipped) {
                    tracing::warn!(%node, count, "live events without audience or event dropped");
                }
            }
            if !events.is_empty() {
                local.publish(&events);
            }
        }
    }))
}

/// Lets one warning through per [`WARN_INTERVAL_MS`] and counts what happened
/// in between, so a flood of losses does not become a flood of logs.
#[derive(Debug, Default)]
struct WarnLimiter {
    /// When the last warning went out (ms since the Unix epoch).
    last_ms: AtomicI64,
    /// Occurrences since the last warning.
    pending: AtomicU64,
}

impl WarnLimiter {
    /// Records `count` occurrences; returns how many happened since the last
    /// warning when one is due now.
    fn note(&self, count: u64) -> Option<u64> {
        self.pending.fetch_add(count, Ordering::Relaxed);
        let now = crate::now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != 0 && now - last < WARN_INTERVAL_MS {
            return None;
        }
        // One caller wins the slot; the others keep counting.
        self.last_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.pending.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use confab_proto::v1::Event;

    use super::*;

    fn user_event(user_id: i64, seq: u64) -> LiveEvent {
        LiveEvent {
            audience: Audience::User(user_id),
            event: Event { seq, kind: None },
            origin_device: Some("phone".to_owned()),
            accepted_at: Instant::now(),
        }
    }

    /// Node names are restricted to one subject token of `[A-Za-z0-9_-]`.
    #[test]
    fn node_names_are_subject_tokens() {
        assert!(is_valid_node("gw-1_a"));
        assert_eq!(node_subject("gw-1"), "confab.node.gw-1");
        for bad in ["", "a.b", "a b", "a*", ">", "né", &"x".repeat(65)] {
            assert!(!is_valid_node(bad), "{bad:?}");
        }
    }

    /// An event survives the trip through an envelope, its age included.
    #[test]
    fn envelope_round_trip() {
        let mut event = user_event(7, 3);
        event.accepted_at = Instant::now() - Duration::from_millis(250);
        let back = live_event(envelope(&event)).expect("valid envelope");
        assert_eq!(back.audience, Audience::User(7));
        assert_eq!(back.event.seq, 3);
        assert_eq!(back.origin_device.as_deref(), Some("phone"));
        let age = back.accepted_at.elapsed();
        assert!(
            age >= Duration::from_millis(240) && age < Duration::from_secs(5),
            "{age:?}"
        );
    }

    /// An envelope without audience or event is refused; a time in the future
    /// or absurdly far back counts as now.
    #[test]
    fn odd_envelopes() {
        let mut wire = envelope(&user_event(1, 1));
        wire.audience_kind = 0;
        assert!(live_event(wire).is_none());
        let mut wire = envelope(&user_event(1, 1));
        wire.audience_kind = 99;
        assert!(live_event(wire).is_none());
        let mut wire = envelope(&user_event(1, 1));
        wire.event = None;
        assert!(live_event(wire).is_none());
        for at in [i64::MAX, i64::MIN, 0] {
            let mut wire = envelope(&user_event(1, 1));
            wire.accepted_at_us = at;
            let event = live_event(wire).expect("valid");
            assert!(event.accepted_at <= Instant::now());
        }
    }

    /// Batches stay under the payload limit and keep their order.
    #[test]
    fn chunks_keep_order_under_the_limit() {
        let envelopes: Vec<LiveEnvelope> =
            (1..=100).map(|seq| envelope(&user_event(1, seq))).collect();
        let one = envelopes[0].encoded_len() + 2;
        let batches = chunks(envelopes, one * 10);
        assert_eq!(batches.len(), 10);
        let seqs: Vec<u64> = batches
            .iter()
            .flat_map(|b| {
                b.events
                    .iter()
                    .map(|e| e.event.as_ref().map_or(0, |e| e.seq))
            })
            .collect();
        assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
        assert!(batches.iter().all(|b| b.encoded_len() <= one * 10));
        assert_eq!(chunks(Vec::new(), 10).len(), 0);
    }

    /// The first warning goes out, the next ones within the interval are counted.
    #[test]
    fn warnings_are_rate_limited() {
        let limiter = WarnLimiter::default();
        assert_eq!(limiter.note(3), Some(3));
        assert_eq!(limiter.note(2), None);
        assert_eq!(limiter.note(1), None);
        limiter.last_ms.store(1, Ordering::Relaxed);
        assert_eq!(limiter.note(1), Some(4));
    }
}
