//! The in-memory mirror of the NATS KV state that lookups read: every live device
//! of `confab_sessions`, and when each node-id lease of `confab_node_ids` was
//! last written. No NATS in here: the watch tasks and the request handlers feed
//! it, so its rules are tested without a server.
//!
//! Writes arrive twice: once from the request handler that made them (so that the
//! process sees its own writes at once) and once from the watch. Revisions order
//! them: a device's slot only ever moves to a higher revision, and a device removed
//! by this process leaves a tombstone until the watch has passed that revision, so
//! that a late watch event of the removed connection cannot bring it back.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::registry::LiveDevice;

/// The connection a device is registered with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connection {
    /// The gateway node holding the connection.
    pub(crate) node: String,
    /// Set by the gateway per connection; tells a device's connections apart.
    pub(crate) connection_id: u64,
}

/// Where a change comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// This process wrote it and applies it before answering.
    Local,
    /// The bucket watch delivered it (in revision order).
    Watch,
}

/// One device's last known state.
#[derive(Debug, Clone)]
struct Slot {
    /// The KV revision this state comes from.
    revision: u64,
    /// `None`: removed by this process, kept until the watch passes `revision`.
    connection: Option<Connection>,
}

/// One node-id lease key.
#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    /// When this process last saw the key written.
    written_at: Instant,
}

/// Devices and node liveness, as last seen.
#[derive(Debug)]
pub(crate) struct Mirror {
    /// A node is alive while one of its lease keys was written less than this long
    /// ago: the bucket's max age, after which an unrenewed key is gone.
    node_ttl: Duration,
    /// User id -> device id -> state; users without a slot have no entry.
    users: HashMap<i64, BTreeMap<String, Slot>>,
    /// Lease key (node id) -> holder and time of its last write.
    leases: HashMap<String, Lease>,
    /// Holder -> the latest write of any of its keys: the index lookups read.
    holders: HashMap<String, Instant>,
}

impl Mirror {
    /// Returns an empty mirror.
    pub(crate) fn new(node_ttl: Duration) -> Self {
        Self {
            node_ttl,
            users: HashMap::new(),
            leases: HashMap::new(),
            holders: HashMap::new(),
        }
    }

    /// Applies a device's state at `revision`: `Some` registered, `None` removed.
    /// Older news than what the slot holds is ignored.
    pub(crate) fn apply_device(
        &mut self,
        user_id: i64,
        device_id: &str,
        revision: u64,
        connection: Option<Connection>,
        source: Source,
    ) {
        let removal = connection.is_none();
        let devices = self.users.entry(user_id).or_default();
        let newer = devices.get(device_id).is_none_or(|slot| {
            // A local removal names the revision it removed, which the slot may hold.
            revision > slot.revision
                || (revision == slot.revision && removal && source == Source::Local)
        });
        if !newer {
            // The watch has reached the tombstone's revision: everything it delivers
            // from now on is newer, so the tombstone has done its job.
            let reached_tombstone = devices
                .get(device_id)
                .is_some_and(|s| s.connection.is_none() && s.revision == revision);
            if source == Source::Watch && reached_tombstone {
                devices.remove(device_id);
            }
        } else if removal && source == Source::Watch {
            devices.remove(device_id);
        } else {
            let slot = Slot {
                revision,
                connection,
            };
            devices.insert(device_id.to_owned(), slot);
        }
        if devices.is_empty() {
            self.users.remove(&user_id);
        }
    }

    /// Records a write of lease key `key` by `holder`, seen at `now`.
    pub(crate) fn lease_written(&mut self, key: &str, holder: &str, now: Instant) {
        let lease = Lease {
            holder: holder.to_owned(),
            written_at: now,
        };
        if let Some(old) = self.leases.insert(key.to_owned(), lease)
            && old.holder != holder
        {
            self.reindex(&old.holder);
        }
        self.holders.insert(holder.to_owned(), now);
    }

    /// Records that lease key `key` was deleted or purged.
    pub(crate) fn lease_removed(&mut self, key: &str) {
        if let Some(old) = self.leases.remove(key) {
            self.reindex(&old.holder);
        }
    }

    /// Recomputes the latest write of `holder` from its remaining keys.
    fn reindex(&mut self, holder: &str) {
        let latest = self
            .leases
            .values()
            .filter(|lease| lease.holder == holder)
            .map(|lease| lease.written_at)
            .max();
        match latest {
            Some(at) => self.holders.insert(holder.to_owned(), at),
            None => self.holders.remove(holder),
        };
    }

    /// Returns whether `node` held a live lease at `now`.
    pub(crate) fn node_alive(&self, node: &str, now: Instant) -> bool {
        self.holders
            .get(node)
            .is_some_and(|&at| now.saturating_duration_since(at) < self.node_ttl)
    }

    /// Returns the devices of `user_ids` whose node is alive at `now`, user by user
    /// in the order asked (each user once), devices ordered by id.
    pub(crate) fn lookup(&self, user_ids: &[i64], now: Instant) -> Vec<LiveDevice> {
        let mut seen = HashSet::with_capacity(user_ids.len());
        let mut found = Vec::new();
        for &user_id in user_ids {
            if !seen.insert(user_id) {
                continue;
            }
            let Some(devices) = self.users.get(&user_id) else {
                continue;
            };
            for (device_id, slot) in devices {
                let Some(connection) = &slot.connection else {
                    continue;
                };
                if !self.node_alive(&connection.node, now) {
                    continue;
                }
                found.push(LiveDevice {
                    user_id,
                    device_id: device_id.clone(),
                    node: connection.node.clone(),
                });
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    fn on(node: &str, connection_id: u64) -> Option<Connection> {
        Some(Connection {
            node: node.into(),
            connection_id,
        })
    }

    fn device(user_id: i64, device_id: &str, node: &str) -> LiveDevice {
        LiveDevice {
            user_id,
            device_id: device_id.into(),
            node: node.into(),
        }
    }

    fn mirror_with_live(nodes: &[&str], now: Instant) -> Mirror {
        let mut mirror = Mirror::new(TTL);
        for (id, node) in nodes.iter().enumerate() {
            mirror.lease_written(&id.to_string(), node, now);
        }
        mirror
    }

    /// A watch event older than the slot (our own newer write) changes nothing; a
    /// newer one replaces it.
    #[test]
    fn older_revisions_are_ignored() {
        let now = Instant::now();
        let mut mirror = mirror_with_live(&["gw-a", "gw-b"], now);
        mirror.apply_device(1, "phone", 5, on("gw-b", 2), Source::Local);
        mirror.apply_device(1, "phone", 3, on("gw-a", 1), Source::Watch);
        assert_eq!(mirror.lookup(&[1], now), vec![device(1, "phone", "gw-b")]);
        mirror.apply_device(1, "phone", 5, on("gw-b", 2), Source::Watch);
        mirror.apply_device(1, "phone", 8, on("gw-a", 3), Source::Watch);
        assert_eq!(mirror.lookup(&[1], now), vec![device(1, "phone", "gw-a")]);
    }

    /// A device this process removed stays removed while the watch replays its
    /// put; the tombstone goes once the watch reaches the delete.
    #[test]
    fn local_removal_survives_late_watch_events() {
        let now = Instant::now();
        let mut mirror = mirror_with_live(&["gw-a"], now);
        mirror.apply_device(1, "phone", 4, on("gw-a", 1), Source::Local);
        // Removed at revision 4 (the delete itself gets a later revision).
        mirror.apply_device(1, "phone", 4, None, Source::Local);
        mirror.apply_device(1, "phone", 3, on("gw-a", 0), Source::Watch);
        assert!(mirror.lookup(&[1], now).is_empty());
        assert_eq!(mirror.users.len(), 1, "tombstone kept");
        mirror.apply_device(1, "phone", 4, on("gw-a", 1), Source::Watch);
        assert!(mirror.lookup(&[1], now).is_empty());
        assert!(mirror.users.is_empty(), "tombstone gone at its revision");
        mirror.apply_device(1, "phone", 5, None, Source::Watch);
        assert!(mirror.lookup(&[1], now).is_empty());

        // A removal of what the watch delivered first waits for the delete event.
        mirror.apply_device(2, "phone", 6, on("gw-a", 1), Source::Watch);
        mirror.apply_device(2, "phone", 6, None, Source::Local);
        assert!(mirror.lookup(&[2], now).is_empty());
        mirror.apply_device(2, "phone", 7, None, Source::Watch);
        assert!(mirror.users.is_empty());
    }

    /// Devices of a node whose lease was not written within the ttl, or was
    /// deleted, are left out of lookups; a renewal brings them back.
    #[test]
    fn devices_of_dead_nodes_are_hidden() {
        let start = Instant::now();
        let mut mirror = mirror_with_live(&["gw-a", "gw-b"], start);
        mirror.apply_device(1, "phone", 1, on("gw-a", 1), Source::Watch);
        mirror.apply_device(1, "web", 2, on("gw-b", 1), Source::Watch);
        mirror.apply_device(2, "phone", 3, on("gw-c", 1), Source::Watch);
        let expected = vec![device(1, "phone", "gw-a"), device(1, "web", "gw-b")];
        assert_eq!(mirror.lookup(&[2, 1, 1], start), expected);

        let later = start + TTL;
        assert!(mirror.lookup(&[1], later).is_empty());
        mirror.lease_written("0", "gw-a", later);
        assert_eq!(mirror.lookup(&[1], later), vec![device(1, "phone", "gw-a")]);

        mirror.lease_removed("0");
        assert!(!mirror.node_alive("gw-a", later));
        assert!(!mirror.holders.contains_key("gw-a"));
    }

    /// A key taken over by another holder no longer keeps the old holder alive,
    /// but the old holder's other keys still do.
    #[test]
    fn key_taken_over_reindexes_old_holder() {
        let start = Instant::now();
        let mut mirror = Mirror::new(TTL);
        mirror.lease_written("0", "gw-a", start);
        mirror.lease_written("0", "gw-b", start + TTL / 2);
        assert!(!mirror.node_alive("gw-a", start));
        mirror.lease_written("1", "gw-a", start);
        mirror.lease_written("2", "gw-a", start + TTL / 2);
        mirror.lease_removed("2");
        assert!(mirror.node_alive("gw-a", start));
        assert!(!mirror.node_alive("gw-a", start + TTL));
    }
}
