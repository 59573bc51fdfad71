//! What can go wrong in session-svc, and how each cause reaches a gRPC client.

use confab_common::ErrorCode;

/// A refused or failed session-svc request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The request names no device.
    #[error("device id must not be empty")]
    EmptyDevice,
    /// The request names no gateway node.
    #[error("node must not be empty")]
    EmptyNode,
    /// Every Snowflake node id is leased.
    #[error("all {0} node ids are leased")]
    NodeIdsExhausted(u16),
    /// A NATS KV operation failed or timed out; the caller may retry.
    #[error("nats kv {action} failed: {reason}")]
    Nats {
        /// What was being done, e.g. "put session".
        action: &'static str,
        /// The client library's error, with its source chain.
        reason: String,
    },
    /// The node-id bucket exists without a maximum age, so a lease would never
    /// expire and a crashed process would keep its id forever.
    #[error("bucket {0} has no max age; node-id leases would never expire")]
    LeaseBucketWithoutMaxAge(&'static str),
    /// AcquireNodeId over gRPC in the distributed mode: a lease held by
    /// session-svc on a caller's behalf outlives neither session-svc nor tells the
    /// caller when it is lost, so processes lease their ids themselves.
    #[error("node ids are leased on nats kv by each process (NodeLease) in the distributed mode")]
    NodeIdsNotServed,
}

impl SessionError {
    /// Wraps a NATS client error, keeping its text (and source chain) for the log
    /// and the client.
    pub(crate) fn nats(action: &'static str, error: &dyn std::error::Error) -> Self {
        Self::Nats {
            action,
            reason: error.to_string(),
        }
    }

    /// Returns the client-facing code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::EmptyDevice | Self::EmptyNode => ErrorCode::BadRequest,
            Self::NodeIdsExhausted(_) => ErrorCode::TooLarge,
            Self::Nats { .. } => ErrorCode::Unavailable,
            Self::LeaseBucketWithoutMaxAge(_) | Self::NodeIdsNotServed => ErrorCode::Internal,
        }
    }
}

impl From<SessionError> for tonic::Status {
    fn from(error: SessionError) -> Self {
        match error {
            // No ErrorCode means "not offered by this deployment"; UNIMPLEMENTED does.
            SessionError::NodeIdsNotServed => tonic::Status::unimplemented(error.to_string()),
            SessionError::Nats { .. } => {
                tracing::warn!(error = %error, "session store unavailable");
                error.code().status(error.to_string())
            }
            SessionError::LeaseBucketWithoutMaxAge(_) => confab_common::error::internal(&error),
            _ => error.code().status(error.to_string()),
        }
    }
}
