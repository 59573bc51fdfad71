//! What can go wrong in group-svc, and how each cause reaches a gRPC client.

use confab_common::ErrorCode;

/// A failed group-svc operation.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The username breaks the naming rules; the reason says which one.
    #[error("invalid username: {0}")]
    InvalidUsername(&'static str),
    /// The password is too short or too long.
    #[error("password must be 8 to 128 bytes")]
    InvalidPassword,
    /// Another account has this username.
    #[error("username taken")]
    UsernameTaken,
    /// Unknown user, wrong password or passwordless user: one cause, so that a
    /// client cannot tell which.
    #[error("wrong username or password")]
    WrongCredentials,
    /// No user with this id or name.
    #[error("no such user")]
    NoSuchUser,

    /// A token minted before the user logged out (of its session or of all).
    #[error("token revoked")]
    TokenRevoked,
    /// No conversation with this id.
    #[error("no such conversation")]
    NoSuchConversation,
    /// A direct conversation was asked for between a user and themselves.
    #[error("a direct conversation needs two distinct users")]
    SameUser,
    /// Only groups and channels are created this way.
    #[error("kind must be group or channel")]
    InvalidKind,
    /// The conversation name breaks the rules; the reason says which one.
    #[error("invalid name: {0}")]
    InvalidName(&'static str),
    /// The topic is too long.
    #[error("topic must be at most 500 characters")]
    InvalidTopic,
    /// The avatar URL is neither empty nor a short enough http(s) URL.
    #[error("avatar url must be empty or an http(s) url of at most 2048 characters")]
    InvalidAvatarUrl,
    /// Initial members were given for a channel.
    #[error("a channel starts with its owner only; others join")]
    ChannelMembers,
    /// A role other than admin or member was asked for.
    #[error("role must be admin or member")]
    InvalidRole,
    /// The owner's role was to change (ownership transfer is not offered).
    #[error("the owner's role cannot change")]
    OwnerRoleFixed,
    /// A change of a direct conversation's membership or metadata.
    #[error("the members and metadata of a direct conversation cannot change")]
    DirectIsFixed,
    /// The user is not a member of the conversation.
    #[error("not a member")]
    NotAMember,
    /// A member lacks the right; the message says which rule refused.
    #[error("{0}")]
    Forbidden(&'static str),
    /// The change would take the conversation past its configured size.
    #[error("a {kind} holds at most {max} members")]
    TooManyMembers {
        /// "group" or "channel".
        kind: &'static str,
        max: u32,
    },
    /// The database failed.
    #[error("database error")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Argon2 failed for a reason other than a wrong password (a corrupt stored
    /// hash, bad parameters).
    #[error("password hashing failed: {0}")]
    Hashing(argon2::password_hash::Error),
    /// A blocking hashing task panicked or was cancelled.
    #[error("hashing task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A stored row breaks an invariant the code relies on.
    #[error("inconsistent data: {0}")]
    Inconsistent(&'static str),
}

impl GroupError {
    /// Returns the client-facing code of this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidUsername(_)
            | Self::InvalidPassword
            | Self::SameUser
            | Self::InvalidKind
            | Self::InvalidName(_)
            | Self::InvalidTopic
            | Self::InvalidAvatarUrl
            | Self::ChannelMembers
            | Self::InvalidRole
            | Self::OwnerRoleFixed
            | Self::DirectIsFixed => ErrorCode::BadRequest,
            Self::UsernameTaken => ErrorCode::AlreadyExists,
            Self::WrongCredentials | Self::TokenRevoked => ErrorCode::Unauthenticated,
            Self::NoSuchUser | Self::NoSuchConversation | Self::NotAMember => ErrorCode::NotFound,
            Self::Forbidden(_) => ErrorCode::PermissionDenied,
            Self::TooManyMembers { .. } => ErrorCode::TooLarge,
            Self::Database(_)
            | Self::Migrate(_)
            | Self::Hashing(_)
            | Self::Task(_)
            | Self::Inconsistent(_) => ErrorCode::Internal,
        }
    }
}

impl From<GroupError> for tonic::Status {
    fn from(error: GroupError) -> Self {
        match error.code() {
            // Logged once here, at the boundary; the client gets a clean message.
            ErrorCode::Internal => confab_common::error::internal(&error),
            code => code.status(error.to_string()),
        }
    }
}
