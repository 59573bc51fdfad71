//! Who is online: each user's live connections with the time of their last
//! heartbeat, and the bookkeeping that batches last-seen writes.
//!
//! Pure and synchronous: the caller holds the lock, passes the time in, and
//! publishes or writes what the methods return. Rules:
//!
//! - A `Heartbeat` for an unknown connection registers it; a user is online
//!   while they have a connection, and a connection lives while it heartbeated
//!   within the window ([`Tracker::expire`] drops the silent ones).
//! - A user's *last seen* is the wall-clock time of their latest heartbeat; it
//!   is what watchers see once the last connection went away.
//! - Heartbeats never write. A user's row is due for a write when their last
//!   seen differs from what the store holds *and* their previous write is a
//!   window old: the store sees at most one write per user per window, however
//!   often they heartbeat or flap ([`Tracker::take_writes`]).
//! - A user is forgotten once offline with nothing left to write and their
//!   last write a window old; the store answers for them from then on.
//! - With a store that keeps leases (the distributed mode), last seen is due
//!   only once the user is offline (their lease carries it meanwhile), and an
//!   online user's lease is due when they come online and then once per lease
//!   period ([`Tracker::lease`], [`Tracker::take_leases`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::store::{OnlineLease, StoredPresence, Visibility};

/// One live connection of a user.
#[derive(Debug)]
struct Connection {
    /// The gateway node holding it: connection ids are unique per node only.
    node: Arc<str>,
    connection_id: u64,
    /// Its latest heartbeat; it is dropped once this is a window old.
    last_heartbeat: Instant,
}

/// What the tracker holds per user.
#[derive(Debug)]
struct UserState {
    /// Live connections; usually one or two, so a vector beats a map.
    connections: Vec<Connection>,
    /// Wall-clock ms of the latest heartbeat of any connection (or the stored
    /// value before the first one).
    last_seen_ms: i64,
    /// The last seen the store holds as far as we know, so that an unchanged
    /// value is never rewritten. `i64::MIN` after a failed write: retry.
    stored_ms: i64,
    /// When this user's row was last written; `None` before the first write by
    /// this process. Spaces writes a window apart.
    written_at: Option<Instant>,
    /// The user's privacy choice, to hide last seen in pushed events.
    visibility: Visibility,
    /// Wall-clock ms of the heartbeat that brought the user online (their
    /// lease's "online since").
    online_since_ms: i64,
    /// When this user's lease was last queued for a write; spaces renewals a
    /// lease period apart. Set when they come online.
    lease_at: Option<Instant>,
}

/// A user whose last connection went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WentOffline {
    pub(crate) user_id: i64,
    pub(crate) last_seen_ms: i64,
    pub(crate) visibility: Visibility,
}

/// A tracked user's presence, unfiltered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Seen {
    pub(crate) online: bool,
    pub(crate) last_seen_ms: i64,
    pub(crate) visibility: Visibility,
}

/// The user is not tracked yet: load their row from the store, pass it to
/// [`Tracker::load`], then try again.
#[derive(Debug)]
pub(crate) struct NotLoaded;

/// Live connections and pending last-seen writes of the users in memory.
#[derive(Debug)]
pub(crate) struct Tracker {
    users: HashMap<i64, UserState>,
    /// Node names, interned: every connection of a node shares one allocation.
    nodes: HashSet<Arc<str>>,
    /// See `PresenceConfig::window`.
    window: Duration,
    /// Users with at least one connection, for the gauge and the benchmark.
    online: usize,
    /// Whether last seen is written while the user is online (a store without
    /// leases); with leases, only once they are offline.
    last_seen_while_online: bool,
}

impl Tracker {
    /// Returns an empty tracker; `last_seen_while_online` is false for a store
    /// with leases (see the module docs).
    pub(crate) fn new(window: Duration, last_seen_while_online: bool) -> Self {
        Self {
            users: HashMap::new(),
            nodes: HashSet::new(),
            window,
            online: 0,
            last_seen_while_online,
        }
    }

    /// Starts tracking `user_id` from their stored row, unless tracked already.
    pub(crate) fn load(&mut self, user_id: i64, stored: StoredPresence) {
        self.users.entry(user_id).or_insert(UserState {
            // Usually one connection: a vector of one, not of four.
            connections: Vec::with_capacity(1),
            last_seen_ms: stored.last_seen_ms,
            stored_ms: stored.last_seen_ms,
            written_at: None,
            visibility: stored.visibility,
            online_since_ms: 0,
            lease_at: None,
        });
    }

    /// Records a heartbeat of a connection (registering it if new) and returns
    /// whether the user came online with it.
    ///
    /// # Errors
    ///
    /// [`NotLoaded`] when the user is not tracked yet.
    pub(crate) fn heartbeat(
        &mut self,
        user_id: i64,
        node: &str,
        connection_id: u64,
        now: Instant,
        now_ms: i64,
    ) -> Result<bool, NotLoaded> {
        let Some(user) = self.users.get_mut(&user_id) else {
            return Err(NotLoaded);
        };
        user.last_seen_ms = user.last_seen_ms.max(now_ms);
        let known = user
            .connections
            .iter_mut()
            .find(|c| c.connection_id == connection_id && &*c.node == node);
        if let Some(connection) = known {
            connection.last_heartbeat = now;
            return Ok(false);
        }
        let node = match self.nodes.get(node) {
            Some(interned) => Arc::clone(interned),
            None => {
                let interned: Arc<str> = node.into();
                self.nodes.insert(Arc::clone(&interned));
                interned
            }
        };
        let came_online = user.connections.is_empty();
        if came_online {
            user.online_since_ms = now_ms;
        }
        user.connections.push(Connection {
            node,
            connection_id,
            last_heartbeat: now,
        });
        if came_online {
            self.online += 1;
        }
        Ok(came_online)
    }

    /// Forgets a connection; returns the user if it was their last.
    pub(crate) fn disconnect(
        &mut self,
        user_id: i64,
        node: &str,
        connection_id: u64,
    ) -> Option<WentOffline> {
        let user = self.users.get_mut(&user_id)?;
        let before = user.connections.len();
        user.connections
            .retain(|c| !(c.connection_id == connection_id && &*c.node == node));
        if before == 0 || !user.connections.is_empty() {
            return None;
        }
        self.online -= 1;
        Some(went_offline(user_id, user))
    }

    /// Drops every connection whose last heartbeat is a window old (at `now`)
    /// and returns the users who went offline by it.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<WentOffline> {
        let window = self.window;
        let mut offline = Vec::new();
        for (&user_id, user) in &mut self.users {
            if user.connections.is_empty() {
                continue;
            }
            user.connections
                .retain(|c| now.saturating_duration_since(c.last_heartbeat) < window);
            if user.connections.is_empty() {
                offline.push(went_offline(user_id, user));
            }
        }
        self.online -= offline.len();
        offline
    }

    /// Drops every connection (shutdown) and returns the users who were online.
    pub(crate) fn disconnect_all(&mut self) -> Vec<WentOffline> {
        let mut offline = Vec::new();
        for (&user_id, user) in &mut self.users {
            if !user.connections.is_empty() {
                user.connections.clear();
                offline.push(went_offline(user_id, user));
            }
        }
        self.online = 0;
        offline
    }

    /// Returns the `(user_id, last_seen_ms)` rows due for a write at `now` and
    /// marks them written; with `force` (shutdown), every changed row is due.
    pub(crate) fn take_writes(&mut self, now: Instant, force: bool) -> Vec<(i64, i64)> {
        let window = self.window;
        let mut rows = Vec::new();
        for (&user_id, user) in &mut self.users {
            if !self.last_seen_while_online && !user.connections.is_empty() {
                continue;
            }
            let changed = user.last_seen_ms != user.stored_ms;
            let spaced = user
                .written_at
                .is_none_or(|at| now.saturating_duration_since(at) >= window);
            if changed && (spaced || force) {
                rows.push((user_id, user.last_seen_ms));
                user.stored_ms = user.last_seen_ms;
                user.written_at = Some(now);
            }
        }
        rows
    }

    /// Returns the lease of `user_id` if online, and marks it written at `now`
    /// (a user coming online: their lease is due at once).
    pub(crate) fn lease(&mut self, user_id: i64, now: Instant) -> Option<OnlineLease> {
        let user = self.users.get_mut(&user_id)?;
        if user.connections.is_empty() {
            return None;
        }
        user.lease_at = Some(now);
        Some(lease_of(user_id, user))
    }

    /// Returns the leases of the online users whose last lease write is
    /// `period` old at `now` (or never happened), and marks them written.
    pub(crate) fn take_leases(&mut self, now: Instant, period: Duration) -> Vec<OnlineLease> {
        let mut leases = Vec::new();
        for (&user_id, user) in &mut self.users {
            let due = user
                .lease_at
                .is_none_or(|at| now.saturating_duration_since(at) >= period);
            if !user.connections.is_empty() && due {
                user.lease_at = Some(now);
                leases.push(lease_of(user_id, user));
            }
        }
        leases
    }

    /// Marks `rows` (from [`take_writes`](Self::take_writes)) unwritten, so that
    /// they are retried once due again.
    pub(crate) fn write_failed(&mut self, rows: &[(i64, i64)]) {
        for &(user_id, last_seen_ms) in rows {
            if let Some(user) = self.users.get_mut(&user_id)
                && user.stored_ms == last_seen_ms
            {
                user.stored_ms = i64::MIN;
            }
        }
    }

    /// Forgets the offline users with nothing to write whose last write is a
    /// window old (keeping them that long keeps a flapping user to one write
    /// per window).
    pub(crate) fn evict(&mut self, now: Instant) {
        let window = self.window;
        self.users.retain(|_, user| {
            let idle = user.connections.is_empty() && user.last_seen_ms == user.stored_ms;
            let spaced = user
                .written_at
                .is_none_or(|at| now.saturating_duration_since(at) >= window);
            !(idle && spaced)
        });
    }

    /// Returns what is known of a tracked user.
    pub(crate) fn seen(&self, user_id: i64) -> Option<Seen> {
        let user = self.users.get(&user_id)?;
        Some(Seen {
            online: !user.connections.is_empty(),
            last_seen_ms: user.last_seen_ms,
            visibility: user.visibility,
        })
    }

    /// Updates a tracked user's privacy choice (untracked users are read from
    /// the store when they come back).
    pub(crate) fn set_visibility(&mut self, user_id: i64, visibility: Visibility) {
        if let Some(user) = self.users.get_mut(&user_id) {
            user.visibility = visibility;
        }
    }

    /// Returns how many users are online.
    pub(crate) fn online_users(&self) -> usize {
        self.online
    }

    /// Returns how many users are held in memory.
    #[cfg(test)]
    pub(crate) fn tracked_users(&self) -> usize {
        self.users.len()
    }
}

fn lease_of(user_id: i64, user: &UserState) -> OnlineLease {
    OnlineLease {
        user_id,
        since_ms: user.online_since_ms,
        last_heartbeat_ms: user.last_seen_ms,
    }
}

fn went_offline(user_id: i64, user: &UserState) -> WentOffline {
    WentOffline {
        user_id,
        last_seen_ms: user.last_seen_ms,
        visibility: user.visibility,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(15);

    fn tracker_with(user_ids: &[i64]) -> Tracker {
        let mut tracker = Tracker::new(WINDOW, true);
        for &user_id in user_ids {
            tracker.load(user_id, StoredPresence::default());
        }
        tracker
    }

    /// A connection is keyed by node and id: the same id on another node is
    /// another connection, and a repeated heartbeat registers nothing.
    #[test]
    fn connections_keyed_by_node_and_id() {
        let mut tracker = tracker_with(&[1]);
        let t0 = Instant::now();
        assert!(tracker.heartbeat(1, "a", 7, t0, 1_000).unwrap());
        assert!(!tracker.heartbeat(1, "a", 7, t0, 1_001).unwrap());
        assert!(!tracker.heartbeat(1, "b", 7, t0, 1_002).unwrap());
        assert_eq!(tracker.disconnect(1, "a", 7), None);
        assert_eq!(tracker.disconnect(1, "a", 7), None, "already gone");
        let offline = tracker.disconnect(1, "b", 7).unwrap();
        assert_eq!(offline.last_seen_ms, 1_002);
        assert_eq!(tracker.online_users(), 0);
        assert!(tracker.heartbeat(2, "a", 1, t0, 0).is_err());
    }

    /// A user flapping on and off writes at most once per window, and is
    /// forgotten only once written and a window old.
    #[test]
    fn flapping_user_writes_once_per_window() {
        let mut tracker = tracker_with(&[1]);
        let t0 = Instant::now();
        let mut writes = 0;
        for i in 0..20_u64 {
            let now = t0 + Duration::from_millis(500 * i);
            tracker.heartbeat(1, "a", i, now, 1_000 + i as i64).unwrap();
            tracker.disconnect(1, "a", i).unwrap();
            writes += tracker.take_writes(now, false).len();
            tracker.evict(now);
        }
        assert_eq!(writes, 1, "all within one window");
        let later = t0 + WINDOW;
        assert_eq!(tracker.take_writes(later, false), vec![(1, 1_019)]);
        tracker.evict(later);
        assert_eq!(tracker.tracked_users(), 1, "written just now");
        tracker.evict(later + WINDOW);
        assert_eq!(tracker.tracked_users(), 0);
    }

    /// With leases, an online user's lease is due when they come online and
    /// then once per period however often they heartbeat, and last seen is due
    /// only once they are offline.
    #[test]
    fn leases_spaced_and_last_seen_offline_only() {
        let mut tracker = Tracker::new(WINDOW, false);
        tracker.load(1, StoredPresence::default());
        let t0 = Instant::now();
        let period = WINDOW / 2;
        assert!(tracker.heartbeat(1, "a", 1, t0, 1_000).unwrap());
        let lease = tracker.lease(1, t0).unwrap();
        assert_eq!((lease.since_ms, lease.last_heartbeat_ms), (1_000, 1_000));
        let mut leases = 0;
        for i in 1..=150_u64 {
            let now = t0 + Duration::from_millis(100 * i);
            tracker
                .heartbeat(1, "a", 1, now, 1_000 + 100 * i as i64)
                .unwrap();
            leases += tracker.take_leases(now, period).len();
            assert!(tracker.take_writes(now, false).is_empty(), "online");
        }
        assert_eq!(leases, 2, "15 s of heartbeats, one renewal per 7.5 s");
        tracker.disconnect(1, "a", 1).unwrap();
        let now = t0 + Duration::from_secs(16);
        assert!(tracker.take_leases(now, period).is_empty(), "offline");
        assert_eq!(tracker.take_writes(now, false), vec![(1, 16_000)]);
    }

    /// A failed write is retried when due again.
    #[test]
    fn failed_write_retried() {
        let mut tracker = tracker_with(&[1]);
        let t0 = Instant::now();
        tracker.heartbeat(1, "a", 1, t0, 5).unwrap();
        let rows = tracker.take_writes(t0, false);
        tracker.write_failed(&rows);
        assert!(tracker.take_writes(t0, false).is_empty(), "spaced");
        assert_eq!(tracker.take_writes(t0 + WINDOW, false), rows);
    }
}
