//! Why a presence-service call failed, and how each cause reaches a gRPC client.

use std::time::Duration;

use confab_common::ErrorCode;

use crate::store::StoreError;

/// What went wrong in the presence service.
#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// The configuration cannot work (a zero window, ttl or rate).
    #[error("{0}")]
    InvalidConfig(&'static str),
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// The conversation does not exist, or the user is not a member: the two are
    /// indistinguishable on purpose, so that nobody learns which conversations
    /// exist (DESIGN.md section 13).
    #[error("no such conversation")]
    ConversationNotFound,
    /// The user sent more typing events than the rate allows.
    #[error("typing rate limit exceeded, retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When the next typing event will be accepted.
        retry_after: Duration,
    },
    /// group-svc could not tell who shares a conversation or who is a member.
    #[error("membership lookup failed")]
    GroupsUnavailable(#[source] tonic::Status),
    /// The service is shutting down.
    #[error("presence service is shutting down")]
    ShuttingDown,
    /// A read, a write or the schema set-up failed.
    #[error("presence store failed")]
    Store(#[from] StoreError),
}

impl PresenceError {
    /// Returns the client-facing code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidConfig(_) | Self::InvalidArgument(_) => ErrorCode::BadRequest,
            Self::ConversationNotFound => ErrorCode::NotFound,
            Self::RateLimited { .. } => ErrorCode::TooLarge,
            Self::GroupsUnavailable(_) | Self::ShuttingDown => ErrorCode::Unavailable,
            Self::Store(_) => ErrorCode::Internal,
        }
    }
}

impl From<PresenceError> for tonic::Status {
    fn from(error: PresenceError) -> Self {
        match &error {
            PresenceError::Store(_) => confab_common::error::internal(&error),
            PresenceError::GroupsUnavailable(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "group-svc unavailable");
                error.code().status(error.to_string())
            }
            PresenceError::RateLimited { retry_after } => {
                // The gateway tells a rate limit from a size limit by this
                // hint, as for its own limits.
                let mut status = error.code().status(error.to_string());
                let millis = u64::try_from(retry_after.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1);
                if let Ok(value) = millis.to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", value);
                }
                status
            }
            _ => error.code().status(error.to_string()),
        }
    }
}
