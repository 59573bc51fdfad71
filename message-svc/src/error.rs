//! Why a message-service call failed, and how each cause reaches a gRPC client.

use std::sync::Arc;

use confab_common::ErrorCode;

use crate::store::StoreError;

/// What went wrong in the message service.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(&'static str),
    /// The message text is longer than the configured limit.
    #[error("message text exceeds {max} bytes")]
    TextTooLarge {
        /// The configured limit, in bytes.
        max: usize,
    },
    /// The conversation does not exist, or the caller is not a member: the two
    /// are indistinguishable on purpose, so that nobody learns which conversations
    /// exist (DESIGN.md section 13, invariant 5).
    #[error("no such conversation")]
    ConversationNotFound,
    /// The message does not exist in the conversation.
    #[error("no such message")]
    MessageNotFound,
    /// The caller is a member but may not do this (a subscriber posting in a
    /// channel).
    #[error("{0}")]
    PermissionDenied(&'static str),
    /// group-svc could not tell who the members are.
    #[error("membership lookup failed")]
    GroupsUnavailable(#[source] tonic::Status),
    /// The service is shutting down and accepts no more sends.
    #[error("message service is shutting down")]
    ShuttingDown,
    /// A read or the schema set-up failed.
    #[error("message store failed")]
    Store(#[from] StoreError),
    /// The group commit holding this send failed; nothing of the batch was stored.
    /// Logged once by the writer for the whole batch.
    #[error("commit of the message batch failed")]
    CommitFailed(#[source] Arc<StoreError>),
}

impl MessageError {
    /// Returns the client-facing code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidArgument(_) => ErrorCode::BadRequest,
            Self::TextTooLarge { .. } => ErrorCode::TooLarge,
            Self::ConversationNotFound | Self::MessageNotFound => ErrorCode::NotFound,
            Self::PermissionDenied(_) => ErrorCode::PermissionDenied,
            Self::GroupsUnavailable(_) | Self::ShuttingDown => ErrorCode::Unavailable,
            Self::Store(_) | Self::CommitFailed(_) => ErrorCode::Internal,
        }
    }
}

impl From<MessageError> for tonic::Status {
    fn from(error: MessageError) -> Self {
        match &error {
            // The writer logged the failure once for its whole batch.
            MessageError::CommitFailed(_) => ErrorCode::Internal.status(""),
            MessageError::Store(_) => confab_common::error::internal(&error),
            MessageError::GroupsUnavailable(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "group-svc unavailable");
                error.code().status(error.to_string())
            }
            _ => error.code().status(error.to_string()),
        }
    }
}
