//! Storage of users, conversations and membership: the records the store returns,
//! and the backends.
//!
//! There is one backend today, [`SqliteStore`] (`store/sqlite.rs`). Its methods are
//! the storage contract: when the PostgreSQL backend arrives it gets a file of its
//! own beside it, these methods become a trait both implement, and one conformance
//! suite runs against both. The schema in `migrations/` is already portable SQL.

mod sqlite;

pub(crate) use sqlite::SqliteStore;

/// A user account, without its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    /// Snowflake id.
    pub(crate) id: i64,
    /// Lowercase, unique.
    pub(crate) username: String,
    pub(crate) created_at_ms: i64,
}

/// A conversation and its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conversation {
    /// Snowflake id.
    pub(crate) id: i64,
    pub(crate) kind: ConversationKind,
    /// Ascending.
    pub(crate) member_ids: Vec<i64>,
    pub(crate) created_at_ms: i64,
}

/// What sort of conversation it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConversationKind {
    /// Exactly two members; at most one per unordered pair of users.
    Direct,
}

impl ConversationKind {
    /// Returns the value stored in `conversations.kind`.
    pub(crate) fn as_db(self) -> &'static str {
        match self {
            Self::Direct => "direct",
        }
    }

    /// Parses a `conversations.kind` value.
    pub(crate) fn from_db(value: &str) -> Option<Self> {
        match value {
            "direct" => Some(Self::Direct),
            _ => None,
        }
    }
}

/// A member's rights in a conversation, stored in `members.role`.
///
/// Direct conversations only use [`Role::Member`]; owners and admins are for groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Member,
}

impl Role {
    /// Returns the value stored in `members.role`.
    pub(crate) fn as_db(self) -> &'static str {
        match self {
            Self::Member => "member",
        }
    }
}
