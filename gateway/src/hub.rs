//! The live devices held by this node, and delivery of committed events to them.
//!
//! Every connection registers here with a bounded queue. Publishing never blocks:
//! a device whose queue is full is disconnected as a slow consumer and resumes
//! from its cursor when it reconnects, so no process ever buffers without limit
//! (DESIGN.md section 2).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use confab_common::bus::{LiveBus, LiveEvent};
use parking_lot::RwLock;
use tokio::sync::mpsc;

/// Why the hub dropped a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kicked {
    /// Its queue was full: the device reads too slowly.
    SlowConsumer,
    /// The same device connected again; the newer connection wins.
    Replaced,
}

/// A connection's end of the hub.
#[derive(Debug)]
pub struct Registration {
    /// Unique per connection on this node.
    pub connection_id: u64,
    /// Live events for this device, in sequence order.
    pub events: mpsc::Receiver<Arc<LiveEvent>>,
    /// Set before the hub drops the sending side of `events`.
    pub kicked: Arc<OnceLock<Kicked>>,
}

#[derive(Debug)]
struct Slot {
    connection_id: u64,
    device_id: String,
    events: mpsc::Sender<Arc<LiveEvent>>,
    kicked: Arc<OnceLock<Kicked>>,
}

/// The live devices of this node, by user.
#[derive(Debug, Default)]
pub struct Hub {
    next_connection: AtomicU64,
    users: RwLock<HashMap<i64, Vec<Slot>>>,
}

impl Hub {
    /// Returns an empty hub.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a live connection of `device_id`, replacing an older connection of
    /// the same device.
    pub fn register(&self, user_id: i64, device_id: &str, capacity: usize) -> Registration {
        let connection_id = self.next_connection.fetch_add(1, Ordering::Relaxed) + 1;
        let (sender, events) = mpsc::channel(capacity.max(1));
        let kicked = Arc::new(OnceLock::new());
        let slot = Slot {
            connection_id,
            device_id: device_id.to_owned(),
            events: sender,
            kicked: kicked.clone(),
        };
        let mut users = self.users.write();
        let slots = users.entry(user_id).or_default();
        if let Some(old) = slots.iter().position(|s| s.device_id == device_id) {
            let old = slots.swap_remove(old);
            let _ = old.kicked.set(Kicked::Replaced);
        }
        slots.push(slot);
        Registration {
            connection_id,
            events,
            kicked,
        }
    }

    /// Removes a connection; does nothing when it was replaced or kicked already.
    pub fn unregister(&self, user_id: i64, connection_id: u64) {
        let mut users = self.users.write();
        if let Some(slots) = users.get_mut(&user_id) {
            slots.retain(|s| s.connection_id != connection_id);
            if slots.is_empty() {
                users.remove(&user_id);
            }
        }
    }

    /// Returns how many connections this node holds.
    pub fn connections(&self) -> usize {
        self.users.read().values().map(Vec::len).sum()
    }

    fn kick(&self, victims: &[(i64, u64)]) {
        let mut users = self.users.write();
        for &(user_id, connection_id) in victims {
            let Some(slots) = users.get_mut(&user_id) else {
                continue;
            };
            if let Some(i) = slots.iter().position(|s| s.connection_id == connection_id) {
                let slot = slots.swap_remove(i);
                let _ = slot.kicked.set(Kicked::SlowConsumer);
                tracing::info!(user_id, connection_id, "disconnecting slow consumer");
            }
            if slots.is_empty() {
                users.remove(&user_id);
            }
        }
    }
}

impl LiveBus for Hub {
    fn publish(&self, events: &[Arc<LiveEvent>]) {
        let mut overflowed = Vec::new();
        {
            let users = self.users.read();
            for event in events {
                let Some(slots) = users.get(&event.user_id) else {
                    continue;
                };
                for slot in slots {
                    if let Err(mpsc::error::TrySendError::Full(_)) =
                        slot.events.try_send(event.clone())
                    {
                        overflowed.push((event.user_id, slot.connection_id));
                    }
                }
            }
        }
        if !overflowed.is_empty() {
            overflowed.sort_unstable();
            overflowed.dedup();
            self.kick(&overflowed);
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
            user_id,
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
        let mut b = hub.register(2, "b", 8);
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
        let mut slow = hub.register(1, "slow", 2);
        let mut fast = hub.register(1, "fast", 16);
        hub.publish(&[event(1, 1), event(1, 2), event(1, 3)]);
        assert_eq!(slow.kicked.get(), Some(&Kicked::SlowConsumer));
        assert_eq!(hub.connections(), 1);
        // The queued events drain, then the queue reports closed.
        assert!(slow.events.try_recv().is_ok());
        assert!(slow.events.try_recv().is_ok());
        assert!(matches!(
            slow.events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(fast.events.try_recv().unwrap().event.seq, 1);
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
