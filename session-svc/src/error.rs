//! What can go wrong in session-svc, and how each cause reaches a gRPC client.

use confab_common::ErrorCode;

/// A refused session-svc request.
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
}

impl SessionError {
    /// Returns the client-facing code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::EmptyDevice | Self::EmptyNode => ErrorCode::BadRequest,
            Self::NodeIdsExhausted(_) => ErrorCode::TooLarge,
        }
    }
}

impl From<SessionError> for tonic::Status {
    fn from(error: SessionError) -> Self {
        error.code().status(error.to_string())
    }
}
