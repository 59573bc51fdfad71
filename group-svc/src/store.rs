//! Storage of users, conversations and membership: the records the store returns,
//! and the backends.
//!
//! - `backend`: [`Store`], the storage contract: one enum over the two backends
//!   (SQLite for the embedded mode, PostgreSQL for the distributed mode) whose
//!   methods hold the logic once and call the backend module for each statement.
//! - `change`: [`Change`], the transaction of one membership or metadata change.
//! - `sqlite` and `postgres`: one module per backend, with the statements whose SQL
//!   differs (id lists, multi-row inserts) and its migrations (`migrations/` and
//!   `migrations-postgres/`).
//! - `portable`: the statements whose SQL is the same on both backends, written once
//!   and expanded into each backend module.
//! - `rows`: the conversion of result rows into records.

mod backend;
mod change;
mod portable;
mod postgres;
mod rows;
mod sqlite;

pub(crate) use backend::{MAX_USERS_PER_INSERT, Store};
pub(crate) use change::Change;
pub(crate) use postgres::migrate as migrate_postgres;

/// A user account, without its credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    /// Snowflake id.
    pub(crate) id: i64,
    /// Lowercase, unique.
    pub(crate) username: String,
    /// When the account was made, in milliseconds since the Unix epoch.
    pub(crate) created_at_ms: i64,
}

/// A conversation, with its members unless it is a channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conversation {
    /// Snowflake id.
    pub(crate) id: i64,
    /// Direct, group or channel; never changes.
    pub(crate) kind: ConversationKind,
    /// Ascending. Empty for channels, which may have a million members: see
    /// `member_count` and the paged member list.
    pub(crate) member_ids: Vec<i64>,
    /// When it was created, in milliseconds since the Unix epoch.
    pub(crate) created_at_ms: i64,
    /// Empty for direct conversations.
    pub(crate) metadata: Metadata,
    /// Every member, the owner included.
    pub(crate) member_count: u32,
    /// 1 at creation; one more with every change of membership or metadata.
    pub(crate) version: i64,
}

/// What a group or channel shows of itself, as validated by `groups::validate_*`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Metadata {
    /// 1 to 100 characters, trimmed, no control characters; empty for direct
    /// conversations.
    pub(crate) name: String,
    /// At most 500 characters.
    pub(crate) topic: String,
    /// Empty, or an http(s) URL.
    pub(crate) avatar_url: String,
}

/// What sort of conversation it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConversationKind {
    /// Exactly two members; at most one per unordered pair of users.
    Direct,
    /// Members chat; admins manage membership and metadata.
    Group,
    /// Admins post, members read; users join by themselves.
    Channel,
}

impl ConversationKind {
    /// Returns the value stored in `conversations.kind`.
    pub(crate) fn as_db(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Group => "group",
            Self::Channel => "channel",
        }
    }

    /// Parses a `conversations.kind` value.
    pub(crate) fn from_db(value: &str) -> Option<Self> {
        match value {
            "direct" => Some(Self::Direct),
            "group" => Some(Self::Group),
            "channel" => Some(Self::Channel),
            _ => None,
        }
    }
}

/// A member's rights in a conversation, stored in `members.role`.
///
/// Direct conversations only use [`Role::Member`]; a group or channel has exactly one
/// [`Role::Owner`] while it has members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// Chats in a group; reads (only) in a channel.
    Member,
    /// Also adds and removes members and changes metadata.
    Admin,
    /// Also appoints and demotes admins.
    Owner,
}

impl Role {
    /// Returns the value stored in `members.role`.
    pub(crate) fn as_db(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    /// Parses a `members.role` value.
    pub(crate) fn from_db(value: &str) -> Option<Self> {
        match value {
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }

    /// Returns whether this role manages membership and metadata.
    pub(crate) fn is_admin(self) -> bool {
        self >= Self::Admin
    }
}

/// One member of a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    /// The member's user id.
    pub(crate) user_id: i64,
    /// What the member may do.
    pub(crate) role: Role,
    /// When the user became a member, in milliseconds since the Unix epoch; decides
    /// who succeeds an owner who leaves.
    pub(crate) joined_at_ms: i64,
}

/// A group or channel about to be created.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewConversation<'a> {
    /// Snowflake id.
    pub(crate) id: i64,
    /// Group or channel.
    pub(crate) kind: ConversationKind,
    /// Also the owner's and first members' `joined_at_ms`.
    pub(crate) created_at_ms: i64,
    /// Validated name, topic and avatar URL; empty for direct conversations.
    pub(crate) metadata: &'a Metadata,
}
