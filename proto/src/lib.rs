//! Protobuf contracts of Confab, generated at build time from `proto/confab/**`.
//!
//! - [`v1`]: the public edge API (`Edge`, `Accounts`, `Conversations`) and the
//!   types every service shares (`Message`, `Event`, ...).
//! - [`group`], [`message`], [`session`], [`presence`]: the internal services.
//! - [`bus`]: the records of the durable log and the live events on NATS. Their generated
//!   traits are the interfaces of the services; callers use the generated clients.
//! - [`codec`]: the prost codec the generated code uses, with small buffers.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors, for gRPC reflection and the
//!   proto3 JSON mapping.

#![allow(unreachable_pub, missing_debug_implementations)]

pub mod codec;

/// Public edge API and shared types (`confab.v1`).
pub mod v1 {
    tonic::include_proto!("confab.v1");
}

/// group-svc (`confab.group.v1`).
pub mod group {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("confab.group.v1");
    }
}

/// message-svc (`confab.message.v1`).
pub mod message {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("confab.message.v1");
    }
}

/// session-svc (`confab.session.v1`).
pub mod session {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("confab.session.v1");
    }
}

/// presence-svc (`confab.presence.v1`).
pub mod presence {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("confab.presence.v1");
    }
}

/// What travels on NATS in the distributed mode (`confab.bus.v1`): log records
/// and live events. Internal only.
pub mod bus {
    /// Version 1 of the contract.
    pub mod v1 {
        tonic::include_proto!("confab.bus.v1");
    }
}

/// The encoded `FileDescriptorSet` of every Confab proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/confab_descriptor.bin"));
