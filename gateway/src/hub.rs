//! The live devices held by this node, and delivery of events to them.
//!
//! Every connection registers here with a bounded queue. Publishing never blocks:
//! a device whose queue is full is disconnected as a slow consumer and resumes
//! from its cursor when it reconnects, so no process ever buffers without limit
//! (DESIGN.md section 2).
//!
//! Besides its user's events, a connection can follow *topics*: the channels it
//! has open (their posts are fan-out on read) and the users whose presence it
//! watches. Both are ephemeral and per connection.
//!
//! When live events may have been lost on the way here (the NATS connection of
//! the distributed mode dropped for a while), [`Hub::resync_all`] asks every
//! connection to fetch what it missed from the store.
//!
//! **Logout.** Every connection records the session and mint time of the token
//! it authenticated with. [`Hub::revoke`] closes the user's connections that a
//! revocation covers (reason `logged_out`), and publishes the revocation on the
//! cluster bus (when one is set: the distributed mode) as an internal event
//! for the user, so that every node holding one of the user's devices does the
//! same when the event reaches its hub. Such an event is acted on here and
//! never queued for a client.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use std::time::Instant;

use confab_common::bus::{Audience, LiveBus, LiveEvent};
use confab_proto::v1::{Event, Revocation, event};
use parking_lot::RwLock;
use tokio::sync::Notify;

/// Why the hub dropped a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// Its queue was full: the device reads too slowly.
    SlowConsumer,
    /// The same device connected again; the newer connection wins.
    Replaced,
    /// The user logged out of the session (or of every device) whose token the
    /// connection used.
    LoggedOut,
}

/// A connection's end of the hub.
#[derive(Debug)]
pub struct Registration {
    /// Unique per connection on this node.
    pub connection_id: u64,
    /// Live events for this device, in sequence order.
    ///
    /// A flume channel rather than tokio's: its queue is allocated with the
    /// first event, where tokio's takes about 800 bytes (cache-padded state and
    /// a first block of 32 slots) from every idle connection.
    pub events: flume::Receiver<Arc<LiveEvent>>,
    /// Set before the hub drops the sending side of `events`.
    pub kicked: Arc<OnceLock<Kicked>>,
    /// Notified when live events may have been lost: the connection then
    /// catches up from the store after the last event it sent. A notification
    /// that comes while nobody waits is kept until the next wait.
    pub resync: Arc<Notify>,
}

/// Something a connection follows besides its user's own events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Topic {
    /// The posts of an open channel.
    Channel(i64),
    /// The presence of a user.
    Presence(i64),
}

#[derive(Debug)]
struct Slot {
    connection_id: u64,
    device_id: String,
    events: flume::Sender<Arc<LiveEvent>>,
    kicked: Arc<OnceLock<Kicked>>,
    /// The connection's side of [`Registration::resync`].
    resync: Arc<Notify>,
    /// What this connection follows.
    topics: Vec<Topic>,
    /// The session of the token the connection authenticated with (empty:
    /// none); a logout of that session closes it.
    session: String,
    /// When that token was minted (ms since the Unix epoch); a logout from all
    /// devices closes connections whose token is older.
    issued_at_ms: i64,
}

/// The live devices of this node, by user, and who follows which topic.
#[derive(Debug, Default)]
pub struct Hub {
    next_connection: AtomicU64,
    users: RwLock<HashMap<i64, Vec<Slot>>>,
    /// Topic -> the (user, connection) pairs that follow it. Lock order: `users`
    /// before `followers`.
    followers: RwLock<HashMap<Topic, HashSet<(i64, u64)>>>,
    /// Where revocations go for the other nodes (the distributed mode's NATS
    /// bus); unset in the embedded mode, where this hub is the only one.
    cluster: OnceLock<Arc<dyn LiveBus>>,
}

/// Channels one connection may have open at once.
pub const MAX_OPEN_CHANNELS: usize = 32;
/// Users one connection may watch the presence of.
pub const MAX_WATCHED_USERS: usize = 256;

impl Hub {
    /// Returns an empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a live connection of `device_id`, in no session, replacing an
    /// older connection of the same device.
    pub fn register(&self, user_id: i64, device_id: &str, capacity: usize) -> Registration {
        self.register_in_session(user_id, device_id, capacity, "", 0)
    }

    /// Registers a live connection of `device_id` authenticated with a token of
    /// `session` minted at `issued_at_ms`, replacing an older connection of the
    /// same device.
    pub fn register_in_session(
        &self,
        user_id: i64,
        device_id: &str,
        capacity: usize,
        session: &str,
        issued_at_ms: i64,
    ) -> Registration {
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
        let (sender, events) = flume::bounded(capacity.max(1));
        let kicked = Arc::new(OnceLock::new());
        let resync = Arc::new(Notify::new());
        let slot = Slot {
            connection_id,
            device_id: device_id.to_owned(),
            events: sender,
            kicked: kicked.clone(),
            resync: resync.clone(),
            topics: Vec::new(),
            session: session.to_owned(),
            issued_at_ms,
        };
        let mut users = self.users.write();
        // Most users hold one connection here: a vector of one, not of four.
        let slots = users
            .entry(user_id)
            .or_insert_with(|| Vec::with_capacity(1));
        let replaced = slots
            .iter()
            .position(|s| s.device_id == device_id)
            .map(|old| slots.swap_remove(old));
        slots.push(slot);
        drop(users);
        if let Some(old) = replaced {
            let _ = old.kicked.set(Kicked::Replaced);
            self.unfollow(user_id, old.connection_id, &old.topics);
        }
        Registration {
            connection_id,
            events,
            kicked,
            resync,
        }
    }

    /// Sends revocations to the other nodes through `bus` from now on (the
    /// distributed mode); a second call is ignored.
    pub fn set_cluster_bus(&self, bus: Arc<dyn LiveBus>) {
        let _ = self.cluster.set(bus);
    }

    /// Records that a connection now runs on a token of `session` minted at
    /// `issued_at_ms` (it reauthenticated).
    pub fn reauthenticated(
        &self,
        user_id: i64,
        connection_id: u64,
        session: &str,
        issued_at_ms: i64,
    ) {
        self.with_slot(user_id, connection_id, |slot| {
            slot.session = session.to_owned();
            slot.issued_at_ms = issued_at_ms;
        });
    }

    /// Closes the connections of `user_id` that `revocation` covers, on this
    /// node at once and, through the cluster bus, on the others.
    pub fn revoke(&self, user_id: i64, revocation: Revocation) {
        self.close_revoked(user_id, &revocation);
        if let Some(bus) = self.cluster.get() {
            let event = LiveEvent {
                audience: Audience::User(user_id),
                event: Event {
                    seq: 0,
                    kind: Some(event::Kind::Revocation(revocation)),
                },
                origin_device: None,
                accepted_at: Instant::now(),
            };
            bus.publish(&[Arc::new(event)]);
        }
    }

    /// Closes the connections of `user_id` opened with a token `revocation`
    /// covers: of its session, or, without one, minted before its moment.
    fn close_revoked(&self, user_id: i64, revocation: &Revocation) {
        let covered = |slot: &Slot| {
            if revocation.session_id.is_empty() {
                slot.issued_at_ms < revocation.before_ms
            } else {
                slot.session == revocation.session_id
            }
        };
        let mut closed = Vec::new();
        {
            let mut users = self.users.write();
            let Some(slots) = users.get_mut(&user_id) else {
                return;
            };
            let mut i = 0;
            while i < slots.len() {
                if covered(&slots[i]) {
                    let slot = slots.swap_remove(i);
                    let _ = slot.kicked.set(Kicked::LoggedOut);
                    closed.push((slot.connection_id, slot.topics));
                } else {
                    i += 1;
                }
            }
            if slots.is_empty() {
                users.remove(&user_id);
            }
        }
        for (connection_id, topics) in closed {
            tracing::info!(user_id, connection_id, "closing logged-out connection");
            self.unfollow(user_id, connection_id, &topics);
        }
    }

    /// Makes every live connection catch up from the store after the last event
    /// it sent, soon; for when live events may have been lost (the bus
    /// reconnected after a disconnect). Events that then arrive live as well are
    /// skipped by sequence number.
    pub fn resync_all(&self) {
        let users = self.users.read();
        for slot in users.values().flatten() {
            slot.resync.notify_one();
        }
        tracing::info!(
            connections = users.values().map(Vec::len).sum::<usize>(),
            "resync of every live connection requested"
        );
    }

    /// Sends the channel's posts to this connection from now on. Returns false
    /// when the connection has [`MAX_OPEN_CHANNELS`] open already.
    pub fn open_channel(&self, user_id: i64, connection_id: u64, channel_id: i64) -> bool {
        let topic = Topic::Channel(channel_id);
        let opened = self
            .with_slot(user_id, connection_id, |slot| {
                if slot.topics.contains(&topic) {
                    return true;
                }
                let open = slot
                    .topics
                    .iter()
                    .filter(|t| matches!(t, Topic::Channel(_)));
                if open.count() >= MAX_OPEN_CHANNELS {
                    return false;
                }
                slot.topics.push(topic);
                true
            })
            .unwrap_or(false);
        if opened {
            self.follow(user_id, connection_id, &[topic]);
        }
        opened
    }

    /// Stops sending the channel's posts to this connection.
    pub fn close_channel(&self, user_id: i64, connection_id: u64, channel_id: i64) {
        let topic = Topic::Channel(channel_id);
        self.with_slot(user_id, connection_id, |slot| {
            slot.topics.retain(|t| *t != topic)
        });
        self.unfollow(user_id, connection_id, &[topic]);
    }

    /// Closes a channel for every connection of a user who is no longer a
    /// subscriber.
    pub fn close_channel_for_user(&self, user_id: i64, channel_id: i64) {
        let topic = Topic::Channel(channel_id);
        let connections: Vec<u64> = {
            let mut users = self.users.write();
            let Some(slots) = users.get_mut(&user_id) else {
                return;
            };
            slots
                .iter_mut()
                .filter(|slot| slot.topics.contains(&topic))
                .map(|slot| {
                    slot.topics.retain(|t| *t != topic);
                    slot.connection_id
                })
                .collect()
        };
        for connection_id in connections {
            self.unfollow(user_id, connection_id, &[topic]);
        }
    }

    /// Replaces the users whose presence this connection watches (at most
    /// [`MAX_WATCHED_USERS`]; the rest are ignored).
    pub fn watch_presence(&self, user_id: i64, connection_id: u64, watched: &[i64]) {
        let new: Vec<Topic> = watched
            .iter()
            .take(MAX_WATCHED_USERS)
            .map(|&id| Topic::Presence(id))
            .collect();
        let Some(old) = self.with_slot(user_id, connection_id, |slot| {
            let old: Vec<Topic> = slot
                .topics
                .iter()
                .copied()
                .filter(|t| matches!(t, Topic::Presence(_)))
                .collect();
            slot.topics.retain(|t| !matches!(t, Topic::Presence(_)));
            slot.topics.extend(new.iter().copied());
            old
        }) else {
            return;
        };
        self.unfollow(user_id, connection_id, &old);
        self.follow(user_id, connection_id, &new);
    }

    /// Runs `f` on a connection's slot, if it is still registered.
    fn with_slot<T>(
        &self,
        user_id: i64,
        connection_id: u64,
        f: impl FnOnce(&mut Slot) -> T,
    ) -> Option<T> {
        let mut users = self.users.write();
        let slot = users
            .get_mut(&user_id)?
            .iter_mut()
            .find(|s| s.connection_id == connection_id)?;
        Some(f(slot))
    }

    fn follow(&self, user_id: i64, connection_id: u64, topics: &[Topic]) {
        let mut followers = self.followers.write();
        for topic in topics {
            followers
                .entry(*topic)
                .or_default()
                .insert((user_id, connection_id));
        }
    }

    fn unfollow(&self, user_id: i64, connection_id: u64, topics: &[Topic]) {
        let mut followers = self.followers.write();
        for topic in topics {
            if let Some(set) = followers.get_mut(topic) {
                set.remove(&(user_id, connection_id));
                if set.is_empty() {
                    followers.remove(topic);
                }
            }
        }
    }

    /// Removes a connection; does nothing when it was replaced or kicked already.
    pub fn unregister(&self, user_id: i64, connection_id: u64) {
        let mut users = self.users.write();
        let mut topics = Vec::new();
        if let Some(slots) = users.get_mut(&user_id) {
            if let Some(i) = slots.iter().position(|s| s.connection_id == connection_id) {
                topics = slots.swap_remove(i).topics;
            }
            if slots.is_empty() {
                users.remove(&user_id);
            }
        }
        drop(users);
        self.unfollow(user_id, connection_id, &topics);
    }

    /// Returns how many live connections `user_id` holds on this node besides
    /// one of `device_id` (which a new connection of that device would replace).
    pub fn connections_of(&self, user_id: i64, device_id: &str) -> usize {
        self.users.read().get(&user_id).map_or(0, |slots| {
            slots.iter().filter(|s| s.device_id != device_id).count()
        })
    }

    /// Returns how many connections this node holds.
    pub fn connections(&self) -> usize {
        self.users.read().values().map(Vec::len).sum()
    }

    fn kick(&self, victims: &[(i64, u64)]) {
        let mut closed = Vec::new();
        {
            let mut users = self.users.write();
            for &(user_id, connection_id) in victims {
                let Some(slots) = users.get_mut(&user_id) else {
                    continue;
                };
                if let Some(i) = slots.iter().position(|s| s.connection_id == connection_id) {
                    let slot = slots.swap_remove(i);
                    let _ = slot.kicked.set(Kicked::SlowConsumer);
                    tracing::info!(user_id, connection_id, "disconnecting slow consumer");
                    closed.push((user_id, connection_id, slot.topics));
                }
                if slots.is_empty() {
                    users.remove(&user_id);
                }
            }
        }
        for (user_id, connection_id, topics) in closed {
            self.unfollow(user_id, connection_id, &topics);
        }
    }

    /// Queues `event` for one connection; records it in `overflowed` when full.
    fn offer(slot: &Slot, user_id: i64, event: &Arc<LiveEvent>, overflowed: &mut Vec<(i64, u64)>) {
        if let Err(flume::TrySendError::Full(_)) = slot.events.try_send(event.clone()) {
            overflowed.push((user_id, slot.connection_id));
        }
    }
}

impl LiveBus for Hub {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        let mut overflowed = Vec::new();
        let mut revoked = Vec::new();
        {
            let users = self.users.read();
            let followers = self.followers.read();
            for event in events {
                // Internal: acted on, never queued for a client.
                if let Some(event::Kind::Revocation(revocation)) = &event.event.kind {
                    if let Audience::User(user_id) = event.audience {
                        revoked.push((user_id, revocation.clone()));
                    }
                    continue;
                }
                let topic = match event.audience {
                    Audience::User(user_id) => {
                        for slot in users.get(&user_id).into_iter().flatten() {
                            Self::offer(slot, user_id, event, &mut overflowed);
                        }
                        continue;
                    }
                    Audience::Channel(channel_id) => Topic::Channel(channel_id),
                    Audience::Watchers(user_id) => Topic::Presence(user_id),
                };
                for &(user_id, connection_id) in followers.get(&topic).into_iter().flatten() {
                    let slot = users
                        .get(&user_id)
                        .and_then(|slots| slots.iter().find(|s| s.connection_id == connection_id));
                    if let Some(slot) = slot {
                        Self::offer(slot, user_id, event, &mut overflowed);
                    }
                }
            }
        }
        if !overflowed.is_empty() {
            overflowed.sort_unstable();
            overflowed.dedup();
            self.kick(&overflowed);
        }
        for (user_id, revocation) in revoked {
            self.close_revoked(user_id, &revocation);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use confab_proto::v1::Event;

    use super::*;

    fn event(user_id: i64, seq: u64) -> Arc<LiveEvent> {
        Arc::new(LiveEvent {
            audience: Audience::User(user_id),
            event: Event { seq, kind: None },
            origin_device: None,
            accepted_at: Instant::now(),
        })
    }

    /// Every device of a user gets the user's events; other users get none.
    #[test]
    fn delivers_to_every_device_of_the_user() {
        let hub = Hub::new();
        let mut a1 = hub.register(1, "a1", 8);
        let mut a2 = hub.register(1, "a2", 8);
        let b = hub.register(2, "b", 8);
        hub.publish(&[event(1, 1), event(1, 2)]);
        for reg in [&mut a1, &mut a2] {
            assert_eq!(reg.events.try_recv().unwrap().event.seq, 1);
            assert_eq!(reg.events.try_recv().unwrap().event.seq, 2);
        }
        assert!(b.events.try_recv().is_err());
    }

    /// A device whose queue overflows is dropped as a slow consumer; others go on.
    #[test]
    fn slow_consumer_is_kicked() {
        let hub = Hub::new();
        let slow = hub.register(1, "slow", 2);
        let fast = hub.register(1, "fast", 16);
        hub.publish(&[event(1, 1), event(1, 2), event(1, 3)]);
        assert_eq!(slow.kicked.get(), Some(&Kicked::SlowConsumer));
        assert_eq!(hub.connections(), 1);
        // The queued events drain, then the queue reports closed.
        assert!(slow.events.try_recv().is_ok());
        assert!(slow.events.try_recv().is_ok());
        assert!(matches!(
            slow.events.try_recv(),
            Err(flume::TryRecvError::Disconnected)
        ));
        assert_eq!(fast.events.try_recv().unwrap().event.seq, 1);
    }

    /// Channel posts reach only the connections that have the channel open, until
    /// they close it or disconnect.
    #[test]
    fn channel_posts_reach_viewers_only() {
        let hub = Hub::new();
        let viewer = hub.register(1, "a", 8);
        let other_device = hub.register(1, "b", 8);
        let stranger = hub.register(2, "c", 8);
        assert!(hub.open_channel(1, viewer.connection_id, 77));
        let post = Arc::new(LiveEvent {
            audience: Audience::Channel(77),
            event: Event { seq: 0, kind: None },
            origin_device: None,
            accepted_at: Instant::now(),
        });
        hub.publish(std::slice::from_ref(&post));
        assert!(viewer.events.try_recv().is_ok());
        assert!(other_device.events.try_recv().is_err());
        assert!(stranger.events.try_recv().is_err());
        hub.close_channel(1, viewer.connection_id, 77);
        hub.publish(std::slice::from_ref(&post));
        assert!(viewer.events.try_recv().is_err());
        assert!(hub.open_channel(1, viewer.connection_id, 77));
        hub.close_channel_for_user(1, 77);
        hub.publish(std::slice::from_ref(&post));
        assert!(viewer.events.try_recv().is_err());
        assert!(hub.open_channel(1, viewer.connection_id, 77));
        hub.unregister(1, viewer.connection_id);
        assert!(hub.followers.read().is_empty());
    }

    /// A connection opens at most MAX_OPEN_CHANNELS channels.
    #[test]
    fn open_channels_are_bounded() {
        let hub = Hub::new();
        let reg = hub.register(1, "a", 8);
        for channel in 0..MAX_OPEN_CHANNELS as i64 {
            assert!(hub.open_channel(1, reg.connection_id, channel));
        }
        assert!(!hub.open_channel(1, reg.connection_id, -1));
        assert!(
            hub.open_channel(1, reg.connection_id, 0),
            "reopening is fine"
        );
    }

    /// Presence changes reach the connections watching that user; a new watch list
    /// replaces the old one.
    #[test]
    fn presence_reaches_watchers() {
        let hub = Hub::new();
        let watcher = hub.register(1, "a", 8);
        let other = hub.register(2, "b", 8);
        hub.watch_presence(1, watcher.connection_id, &[5, 6]);
        let change = |user_id| {
            Arc::new(LiveEvent {
                audience: Audience::Watchers(user_id),
                event: Event { seq: 0, kind: None },
                origin_device: None,
                accepted_at: Instant::now(),
            })
        };
        hub.publish(&[change(5), change(7)]);
        assert!(watcher.events.try_recv().is_ok());
        assert!(watcher.events.try_recv().is_err(), "7 is not watched");
        assert!(other.events.try_recv().is_err());
        hub.watch_presence(1, watcher.connection_id, &[7]);
        hub.publish(&[change(5), change(7)]);
        assert!(watcher.events.try_recv().is_ok());
        assert!(watcher.events.try_recv().is_err(), "5 is no longer watched");
        hub.unregister(1, watcher.connection_id);
        assert!(hub.followers.read().is_empty());
    }

    /// A resync request reaches every live connection, and is kept for one
    /// that is not waiting yet.
    #[test]
    fn resync_reaches_every_connection() {
        use futures::FutureExt as _;

        let hub = Hub::new();
        let a = hub.register(1, "a", 8);
        let b = hub.register(2, "b", 8);
        let gone = hub.register(3, "c", 8);
        hub.unregister(3, gone.connection_id);
        assert!(a.resync.notified().now_or_never().is_none());
        hub.resync_all();
        assert!(a.resync.notified().now_or_never().is_some());
        assert!(b.resync.notified().now_or_never().is_some());
        assert!(
            a.resync.notified().now_or_never().is_none(),
            "one request, one catch-up"
        );
        assert!(
            gone.resync.notified().now_or_never().is_none(),
            "an unregistered connection is left alone"
        );
    }

    /// A revocation of a session closes that session's connections; one of
    /// everything before a moment closes those opened with older tokens; others
    /// stay, and the revocation is never queued as an event.
    #[test]
    fn revocation_closes_covered_connections() {
        let hub = Hub::new();
        let phone = hub.register_in_session(1, "phone", 8, "s1", 100);
        let tablet = hub.register_in_session(1, "tablet", 8, "s1", 200);
        let laptop = hub.register_in_session(1, "laptop", 8, "s2", 300);
        let other = hub.register_in_session(2, "x", 8, "s1", 100);
        let revocation = |session: &str, before_ms| {
            Arc::new(LiveEvent {
                audience: Audience::User(1),
                event: Event {
                    seq: 0,
                    kind: Some(event::Kind::Revocation(Revocation {
                        session_id: session.to_owned(),
                        before_ms,
                    })),
                },
                origin_device: None,
                accepted_at: Instant::now(),
            })
        };
        hub.publish(&[revocation("s1", 0)]);
        assert_eq!(phone.kicked.get(), Some(&Kicked::LoggedOut));
        assert_eq!(tablet.kicked.get(), Some(&Kicked::LoggedOut));
        assert!(phone.events.try_recv().is_err(), "never queued");
        assert_eq!(laptop.kicked.get(), None);
        assert_eq!(other.kicked.get(), None, "another user's session");
        assert!(other.events.try_recv().is_err());

        hub.reauthenticated(1, laptop.connection_id, "s3", 1_000);
        hub.publish(&[revocation("", 1_000)]);
        assert_eq!(laptop.kicked.get(), None, "its token is not older");
        hub.revoke(
            1,
            Revocation {
                session_id: String::new(),
                before_ms: 1_001,
            },
        );
        assert_eq!(laptop.kicked.get(), Some(&Kicked::LoggedOut));
        assert!(laptop.events.try_recv().is_err());
        assert_eq!(hub.connections(), 1);
    }

    /// A device that connects again replaces its older connection.
    #[test]
    fn reconnect_replaces_older_connection() {
        let hub = Hub::new();
        let old = hub.register(1, "d", 8);
        let new = hub.register(1, "d", 8);
        assert_eq!(old.kicked.get(), Some(&Kicked::Replaced));
        hub.unregister(1, old.connection_id);
        assert_eq!(hub.connections(), 1);
        hub.unregister(1, new.connection_id);
        assert_eq!(hub.connections(), 0);
    }
}
