//! The live bus: how message-svc hands committed events to the gateway nodes that
//! hold the recipients' devices.
//!
//! The embedded mode delivers in process (the gateway's connection hub implements
//! [`LiveBus`]); the distributed mode will publish on each node's NATS subject.
//! Publishing never blocks and never buffers without bound: a device that cannot
//! keep up is disconnected and resumes from its cursor.

use std::sync::Arc;
use std::time::Instant;

use confab_proto::v1::Event;

/// Who a live event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every live device of this user; the event is in the user's sequence.
    User(i64),
    /// Every connection that has this channel open (a channel post: fan-out on
    /// read, in nobody's sequence).
    Channel(i64),
    /// Every connection that watches this user's presence (ephemeral, in
    /// nobody's sequence).
    Watchers(i64),
}

/// One event on its way to live devices.
#[derive(Debug)]
pub struct LiveEvent {
    /// Whose devices get it.
    pub audience: Audience,
    /// The event, with its sequence number (0 for channel posts).
    pub event: Event,
    /// Device that caused the event; it gets the event too (its cursor must not
    /// skip a number), but the send-to-deliver latency excludes it.
    pub origin_device: Option<String>,
    /// When the send path accepted the message, for the send-to-deliver metric.
    pub accepted_at: Instant,
}

/// Delivers committed events to live devices.
pub trait LiveBus: Send + Sync + std::fmt::Debug + 'static {
    /// Hands over events, in sequence order per user and in commit order per
    /// channel. Must not block.
    fn publish(&self, events: &[Arc<LiveEvent>]);
}
