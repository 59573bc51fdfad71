//! The in-memory registry of the embedded mode: which gateway node holds each live
//! device, and which Snowflake node ids are leased.
//!
//! The distributed mode keeps the devices in NATS KV (`kv`) with the same
//! semantics, and leases node ids per process (`lease`).

use std::collections::{HashMap, HashSet};

use confab_common::ids::MAX_NODES;
use parking_lot::{Mutex, RwLock};

use crate::SessionError;

/// A device with a live connection, and the gateway node holding it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveDevice {
    pub(crate) user_id: i64,
    pub(crate) device_id: String,
    /// The gateway node holding the connection.
    pub(crate) node: String,
}

/// One connection of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Connection {
    node: String,
    /// Set by the gateway per connection; tells a device's successive connections
    /// apart.
    connection_id: u64,
}

/// The live devices of every user.
#[derive(Debug, Default)]
pub(crate) struct DeviceRegistry {
    /// User id -> its devices' current connections, ordered by device id, so
    /// that lookups answer in a stable order. Users without a live device have
    /// no entry, so the map holds only online users. A user has a few devices:
    /// a sorted vector sized to them costs a fraction of a map's node (a
    /// `BTreeMap` leaf is about 600 bytes for one device).
    users: RwLock<HashMap<i64, Vec<(String, Connection)>>>,
}

impl DeviceRegistry {
    /// Records that `device` is connected through `connection_id`, replacing any
    /// older connection of the same (user, device): the device reconnected.
    ///
    /// # Errors
    ///
    /// [`SessionError::EmptyDevice`] or [`SessionError::EmptyNode`].
    pub(crate) fn register(
        &self,
        device: LiveDevice,
        connection_id: u64,
    ) -> Result<(), SessionError> {
        validate(&device.device_id, &device.node)?;
        let connection = Connection {
            node: device.node,
            connection_id,
        };
        let mut users = self.users.write();
        let devices = users
            .entry(device.user_id)
            .or_insert_with(|| Vec::with_capacity(1));
        match devices.binary_search_by(|(id, _)| id.as_str().cmp(&device.device_id)) {
            Ok(at) => {
                let old = std::mem::replace(&mut devices[at].1, connection);
                tracing::debug!(
                    user_id = device.user_id,
                    old_node = %old.node,
                    old_connection_id = old.connection_id,
                    "device reconnected; older connection replaced"
                );
            }
            Err(at) => devices.insert(at, (device.device_id, connection)),
        }
        Ok(())
    }

    /// Removes the device if `(node, connection_id)` is its current connection;
    /// returns whether it did. A late unregister of an older connection changes
    /// nothing. The node is compared too, because two gateway nodes may hand out the
    /// same connection id.
    ///
    /// # Errors
    ///
    /// [`SessionError::EmptyDevice`] or [`SessionError::EmptyNode`].
    pub(crate) fn unregister(
        &self,
        device: &LiveDevice,
        connection_id: u64,
    ) -> Result<bool, SessionError> {
        validate(&device.device_id, &device.node)?;
        let mut users = self.users.write();
        let Some(devices) = users.get_mut(&device.user_id) else {
            return Ok(false);
        };
        let at = devices.binary_search_by(|(id, _)| id.as_str().cmp(&device.device_id));
        let current = at.ok().filter(|&at| {
            let (_, c) = &devices[at];
            c.connection_id == connection_id && c.node == device.node
        });
        let Some(at) = current else {
            return Ok(false);
        };
        devices.remove(at);
        if devices.is_empty() {
            users.remove(&device.user_id);
        }
        Ok(true)
    }

    /// Returns the live devices of `user_ids`, user by user in the order asked
    /// (each user once), devices ordered by id.
    pub(crate) fn lookup(&self, user_ids: &[i64]) -> Vec<LiveDevice> {
        let users = self.users.read();
        let mut seen = HashSet::with_capacity(user_ids.len());
        let mut found = Vec::new();
        for &user_id in user_ids {
            if !seen.insert(user_id) {
                continue;
            }
            let Some(devices) = users.get(&user_id) else {
                continue;
            };
            found.extend(devices.iter().map(|(device_id, connection)| LiveDevice {
                user_id,
                device_id: device_id.clone(),
                node: connection.node.clone(),
            }));
        }
        found
    }
}

/// Refuses a request that names no device or no node.
pub(crate) fn validate(device_id: &str, node: &str) -> Result<(), SessionError> {
    if device_id.is_empty() {
        return Err(SessionError::EmptyDevice);
    }
    if node.is_empty() {
        return Err(SessionError::EmptyNode);
    }
    Ok(())
}

/// Snowflake node-id leases. Embedded mode: a lease lasts as long as the process,
/// which is the only holder of its ids.
#[derive(Debug)]
pub(crate) struct NodeIdLeases {
    /// Index = node id; the holder's name (for diagnostics) once leased.
    holders: Mutex<Vec<Option<String>>>,
}

impl Default for NodeIdLeases {
    fn default() -> Self {
        Self {
            holders: Mutex::new(vec![None; usize::from(MAX_NODES)]),
        }
    }
}

impl NodeIdLeases {
    /// Leases the lowest free node id to `holder`.
    ///
    /// # Errors
    ///
    /// [`SessionError::NodeIdsExhausted`] when all [`MAX_NODES`] ids are leased.
    pub(crate) fn acquire(&self, holder: &str) -> Result<u16, SessionError> {
        let mut holders = self.holders.lock();
        let Some(free) = holders.iter().position(Option::is_none) else {
            return Err(SessionError::NodeIdsExhausted(MAX_NODES));
        };
        holders[free] = Some(holder.to_owned());
        let node_id = u16::try_from(free).expect("fewer than 65536 node ids");
        debug_assert!(node_id < MAX_NODES);
        tracing::info!(node_id, holder, "node id leased");
        Ok(node_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(user_id: i64, device_id: &str, node: &str) -> LiveDevice {
        LiveDevice {
            user_id,
            device_id: device_id.into(),
            node: node.into(),
        }
    }

    /// A second registration of one (user, device) replaces the first: the device
    /// reconnected, possibly through another node.
    #[test]
    fn reconnect_replaces_older_connection() {
        let registry = DeviceRegistry::default();
        registry.register(device(1, "phone", "gw-a"), 10).unwrap();
        registry.register(device(1, "phone", "gw-b"), 11).unwrap();
        assert_eq!(registry.lookup(&[1]), vec![device(1, "phone", "gw-b")]);
    }

    /// A late unregister of an older connection leaves the newer one in place; the
    /// current connection's unregister removes it.
    #[test]
    fn stale_unregister_is_ignored() {
        let registry = DeviceRegistry::default();
        registry.register(device(1, "phone", "gw-a"), 10).unwrap();
        registry.register(device(1, "phone", "gw-a"), 11).unwrap();
        assert!(
            !registry
                .unregister(&device(1, "phone", "gw-a"), 10)
                .unwrap()
        );
        assert_eq!(registry.lookup(&[1]), vec![device(1, "phone", "gw-a")]);

        // Same connection id from another node: not the current connection either.
        assert!(
            !registry
                .unregister(&device(1, "phone", "gw-b"), 11)
                .unwrap()
        );
        assert_eq!(registry.lookup(&[1]).len(), 1);

        assert!(
            registry
                .unregister(&device(1, "phone", "gw-a"), 11)
                .unwrap()
        );
        assert!(registry.lookup(&[1]).is_empty());
        assert!(
            registry.users.read().is_empty(),
            "offline users keep no entry"
        );
        assert!(
            !registry
                .unregister(&device(1, "phone", "gw-a"), 11)
                .unwrap()
        );
    }

    /// Lookup returns every live device of the users asked, each once, and nothing
    /// for users without one.
    #[test]
    fn lookup_returns_live_devices() {
        let registry = DeviceRegistry::default();
        registry.register(device(1, "phone", "gw-a"), 1).unwrap();
        registry.register(device(1, "laptop", "gw-b"), 2).unwrap();
        registry.register(device(2, "phone", "gw-a"), 3).unwrap();
        registry.register(device(3, "web", "gw-c"), 4).unwrap();

        let found = registry.lookup(&[2, 1, 4, 1]);
        let expected = vec![
            device(2, "phone", "gw-a"),
            device(1, "laptop", "gw-b"),
            device(1, "phone", "gw-a"),
        ];
        assert_eq!(found, expected);
        assert!(registry.lookup(&[]).is_empty());
    }

    /// Registrations without a device id or a node are refused and change nothing.
    #[test]
    fn empty_device_or_node_is_refused() {
        let registry = DeviceRegistry::default();
        let no_device = registry.register(device(1, "", "gw-a"), 1);
        assert_eq!(no_device, Err(SessionError::EmptyDevice));
        let no_node = registry.register(device(1, "phone", ""), 1);
        assert_eq!(no_node, Err(SessionError::EmptyNode));
        assert!(registry.lookup(&[1]).is_empty());
    }

    /// Node ids are handed out lowest first, never twice, until all 1024 are gone.
    #[test]
    fn node_ids_are_unique_until_exhausted() {
        let leases = NodeIdLeases::default();
        let ids: Vec<u16> = (0..MAX_NODES)
            .map(|i| leases.acquire(&format!("holder-{i}")).unwrap())
            .collect();
        assert_eq!(ids, (0..MAX_NODES).collect::<Vec<_>>());
        assert_eq!(
            leases.acquire("one too many"),
            Err(SessionError::NodeIdsExhausted(MAX_NODES))
        );
    }
}
