//! session-svc: which gateway node holds which device, and Snowflake node-id
//! leases (DESIGN.md sections 2, 3 and 11).
//!
//! - [`SessionService`] (this file): the service, cheap to clone; serve it through
//!   the generated `SessionsServer`.
//! - `registry`: the embedded mode's in-memory state: live devices and node-id
//!   leases. No tonic in there; the distributed mode will offer the same operations
//!   on NATS KV.
//! - `grpc`: the generated `Sessions` trait on top: protobuf <-> domain, errors ->
//!   statuses, nothing else.
//! - `error`: [`SessionError`], the causes of refusal, and their gRPC codes.

mod error;
mod grpc;
mod registry;

use std::sync::Arc;

use crate::registry::{DeviceRegistry, NodeIdLeases};

pub use crate::error::SessionError;

/// Live devices and node-id leases, in memory; implements the generated
/// `confab_proto::session::v1::sessions_server::Sessions` trait. Clones share state.
#[derive(Debug, Clone, Default)]
pub struct SessionService {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Which gateway node holds each live device.
    devices: DeviceRegistry,
    /// Snowflake node ids handed out to processes.
    node_ids: NodeIdLeases,
}

impl SessionService {
    /// Returns a service with no live device and no leased node id.
    pub fn new() -> Self {
        Self::default()
    }
}
