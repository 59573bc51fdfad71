//! session-svc: which gateway node holds which device, and Snowflake node-id
//! leases (DESIGN.md sections 2, 3 and 11).
//!
//! - [`SessionService`] (this file): the service, cheap to clone, over one of two
//!   backends; serve it through the generated `SessionsServer`.
//! - `registry`: the embedded mode's in-memory state: live devices and node-id
//!   leases. No tonic in there.
//! - `kv`: the distributed mode's device registry on NATS KV, read through an
//!   in-memory mirror kept by watching the buckets.
//! - [`lease`]: node-id leases on NATS KV ([`NodeLease`]), taken by every process
//!   of the distributed mode at start.
//! - `grpc`: the generated `Sessions` trait on top: protobuf <-> domain, errors ->
//!   statuses, nothing else.
//! - `error`: [`SessionError`], the causes of refusal, and their gRPC codes.

mod error;
mod grpc;
mod kv;
pub mod lease;
mod registry;
#[cfg(test)]
mod testing;

use std::sync::Arc;
use std::time::Duration;

use crate::kv::NatsRegistry;
use crate::registry::{DeviceRegistry, LiveDevice, NodeIdLeases};

pub use crate::error::SessionError;
pub use crate::kv::SESSIONS_BUCKET;
pub use crate::lease::{NODE_IDS_BUCKET, NodeLease};

/// Live devices and node-id leases; implements the generated
/// `confab_proto::session::v1::sessions_server::Sessions` trait. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct SessionService {
    backend: Arc<Backend>,
}

/// Where the state lives: one of two fixed implementations, so an enum rather
/// than a trait object.
#[derive(Debug)]
enum Backend {
    /// The embedded mode: this process is the only one.
    Memory {
        /// Which gateway node holds each live device.
        devices: DeviceRegistry,
        /// Snowflake node ids handed out to processes.
        node_ids: NodeIdLeases,
    },
    /// The distributed mode: devices in NATS KV, shared by every session-svc
    /// process. Node ids are not served: processes lease them with [`NodeLease`].
    /// Boxed: the NATS handles are large, the in-memory maps are not.
    Nats(Box<NatsRegistry>),
}

impl Default for Backend {
    fn default() -> Self {
        Self::Memory {
            devices: DeviceRegistry::default(),
            node_ids: NodeIdLeases::default(),
        }
    }
}

impl SessionService {
    /// Returns an in-memory service with no live device and no leased node id.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns a service keeping devices in the NATS KV bucket [`SESSIONS_BUCKET`]
    /// and counting a device only while its node holds a lease in
    /// [`NODE_IDS_BUCKET`] (`node_ttl`: the lease ttl, used when this call creates
    /// that bucket). Creates missing buckets, and waits (up to a few seconds) until
    /// its mirror holds what the buckets hold.
    ///
    /// # Errors
    ///
    /// [`SessionError::Nats`] when NATS fails, and
    /// [`SessionError::LeaseBucketWithoutMaxAge`].
    pub async fn with_nats(
        js: async_nats::jetstream::Context,
        node_ttl: Duration,
    ) -> Result<Self, SessionError> {
        let registry = NatsRegistry::open(js, node_ttl).await?;
        Ok(Self {
            backend: Arc::new(Backend::Nats(Box::new(registry))),
        })
    }

    /// Records that `device` is connected through `connection_id`, replacing any
    /// older connection of the same (user, device).
    async fn register(&self, device: LiveDevice, connection_id: u64) -> Result<(), SessionError> {
        match &*self.backend {
            Backend::Memory { devices, .. } => devices.register(device, connection_id),
            Backend::Nats(registry) => registry.register(device, connection_id).await,
        }
    }

    /// Removes the device if `(node, connection_id)` is its current connection;
    /// returns whether it did.
    async fn unregister(
        &self,
        device: &LiveDevice,
        connection_id: u64,
    ) -> Result<bool, SessionError> {
        match &*self.backend {
            Backend::Memory { devices, .. } => devices.unregister(device, connection_id),
            Backend::Nats(registry) => registry.unregister(device, connection_id).await,
        }
    }

    /// Returns the live devices of `user_ids`, user by user in the order asked.
    fn lookup(&self, user_ids: &[i64]) -> Vec<LiveDevice> {
        match &*self.backend {
            Backend::Memory { devices, .. } => devices.lookup(user_ids),
            Backend::Nats(registry) => registry.lookup(user_ids),
        }
    }

    /// Leases a node id to `holder` for the life of this process (embedded mode
    /// only; see [`SessionError::NodeIdsNotServed`]).
    fn lease_node_id(&self, holder: &str) -> Result<u16, SessionError> {
        match &*self.backend {
            Backend::Memory { node_ids, .. } => node_ids.acquire(holder),
            Backend::Nats(_) => Err(SessionError::NodeIdsNotServed),
        }
    }
}
